"""Error types of the training side; each is a ``FieldscopeError`` so the CLI shows one line.

``EvaluationError`` is also a ``ValueError``: it always means the caller passed arrays or
files that cannot be evaluated (wrong shape, label out of range, empty), which library
users expect to catch as a ``ValueError``.
"""

from __future__ import annotations

from fieldscope.edge.errors import FieldscopeError

__all__ = ["EvaluationError", "TrainError"]


class TrainError(FieldscopeError):
    """Base of expected failures in ``fieldscope.train`` (data, model, fitting, report)."""


class EvaluationError(TrainError, ValueError):
    """Predictions, labels, histories or report files that cannot be evaluated or plotted."""
