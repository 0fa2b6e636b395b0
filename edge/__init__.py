"""The runtime contract of fieldscope: what runs on the Raspberry Pi.

Everything here depends only on numpy, OpenCV, paho-mqtt and a TFLite
interpreter. It never imports TensorFlow nor the other fieldscope packages,
so that a Pi installs ``fieldscope[edge]`` and nothing else (a test enforces it).
"""

from fieldscope.edge.errors import FieldscopeError

__all__ = ["FieldscopeError"]
