"""Error types of the training side; each is a ``FieldscopeError`` so the CLI shows one line.

``EvaluationError`` is also a ``ValueError``: it always means the caller passed arrays or
files that cannot be evaluated (wrong shape, label out of range, empty), which library
users expect to catch as a ``ValueError``.
"""

from __future__ import annotations

from fieldscope.edge.errors import FieldscopeError, MissingDependencyError

__all__ = ["EvaluationError", "MissingWeightsError", "TrainError", "WeightsFileError"]


class TrainError(FieldscopeError):
    """Base of expected failures in ``fieldscope.train`` (data, model, fitting, report)."""


class EvaluationError(TrainError, ValueError):
    """Predictions, labels, histories or report files that cannot be evaluated or plotted."""


class MissingWeightsError(TrainError, MissingDependencyError):
    """Pretrained weights that ship in a pip package are asked for, but it is not installed.

    The message names the package and the exact pip command: the fix is one install, and
    there is nothing to download at run time (fieldscope never fetches weights itself).
    """


class WeightsFileError(TrainError):
    """A weights file is damaged, not what it claims to be, or holds more than tensors."""
