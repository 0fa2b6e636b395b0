"""Quantisation of a trained run into a verified, self-describing TFLite bundle."""
