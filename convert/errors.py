"""Error types of the conversion side; each is a ``FieldscopeError`` so the CLI shows one line."""

from __future__ import annotations

from fieldscope.edge.errors import FieldscopeError

__all__ = ["ConversionError", "FidelityError", "UnsupportedOpsError"]


class ConversionError(FieldscopeError):
    """The model, its run directory or the conversion itself cannot give a bundle."""


class UnsupportedOpsError(ConversionError):
    """The converted model needs ops (or op versions) a target edge runtime cannot run."""


class FidelityError(ConversionError):
    """The converted model is too far from the Keras model to ship; no bundle was written."""
