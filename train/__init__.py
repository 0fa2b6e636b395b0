"""Workstation side: datasets, augmentation, backbones, two-stage fitting, evaluation, plots.

May import ``fieldscope.edge`` (for the shared preprocessing), never the reverse.
"""
