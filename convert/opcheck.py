"""What is inside a converted model, and which edge runtimes can run it.

The TFLite flatbuffer lists every operator code the model uses, with a version: the
converter bumps an op's version whenever it emits a variant that older kernels do not
implement (a new dtype, per-channel weights, ...). A runtime refuses to load a model
that lists a (op, version) its kernel registry lacks — or, worse, loads it and crashes.
So before a bundle is written this module reads the operator codes and the quantisation
of the dense weights straight from the flatbuffer and compares them with what the
fleet's oldest runtime, tflite-runtime 2.14, supports:

* Flex (``SELECT_TF_OPS``) and other custom ops: no edge runtime has them; refused always.
* (op, version) pairs outside :data:`TFLITE_RUNTIME_2_14`: tflite-runtime 2.14 cannot
  load the model ("Didn't find op for builtin opcode ... version ...").
* ``FULLY_CONNECTED`` with per-channel quantised weights: tflite-runtime 2.14 loads it
  but segfaults in ``invoke()`` on aarch64 (x86 runs it; see STACK-FACTS.md), so it counts
  as unsupported even though the op version alone looks fine.

:func:`min_runtime` turns the result into the manifest's ``min_runtime``.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from fieldscope.convert.errors import ConversionError, UnsupportedOpsError
from fieldscope.edge.errors import MissingDependencyError

__all__ = [
    "LITERT_FOR_TFLITE_RUNTIME_2_14",
    "TFLITE_RUNTIME_2_14",
    "OpReport",
    "OperatorUse",
    "check_edge_compatible",
    "min_runtime",
    "read_operators",
]

# The builtin ops tflite-runtime 2.14.0 registers, as (min version, max version).
#
# Derived by probing the released wheel itself (tflite-runtime==2.14.0 with numpy 1.26.4,
# x86_64, cp311) rather than from a source tree whose exact release is uncertain: for
# every BuiltinOperator of the TF 2.21 schema and every version 1..20, a valid two-unit
# Dense model was written whose operator_codes table also lists that (op, version),
# unused by any operator. ``InterpreterBuilder`` resolves every listed code, so the model
# loads exactly when the runtime registers that op version. Every op's versions came out
# contiguous. Spot checks against the AddBuiltin(op, ..., min_version, max_version)
# calls of tensorflow/lite/core/kernels/register.cc agree for the ops our models use
# (FULLY_CONNECTED 1-10, CONV_2D 1-7, DEPTHWISE_CONV_2D 1-7, ADD 1-5, MUL 1-7, MEAN 1-3,
# SOFTMAX 1-3, QUANTIZE 1-3, DEQUANTIZE 1-5; BROADCAST_TO 2-3). The same probe against
# ai-edge-litert 1.2.0 (the oldest our edge extra accepts) loads every pair below, so a
# model within this table runs on any supported ai-edge-litert as well.
TFLITE_RUNTIME_2_14: Mapping[str, tuple[int, int]] = {
    "ABS": (1, 5),
    "ADD": (1, 5),
    "ADD_N": (1, 1),
    "ARG_MAX": (1, 3),
    "ARG_MIN": (1, 3),
    "ASSIGN_VARIABLE": (1, 1),
    "ATAN2": (1, 1),
    "AVERAGE_POOL_2D": (1, 3),
    "BATCH_MATMUL": (1, 4),
    "BATCH_TO_SPACE_ND": (1, 4),
    "BIDIRECTIONAL_SEQUENCE_LSTM": (1, 3),
    "BIDIRECTIONAL_SEQUENCE_RNN": (1, 3),
    "BITCAST": (1, 1),
    "BITWISE_XOR": (1, 1),
    "BROADCAST_ARGS": (1, 1),
    "BROADCAST_TO": (2, 3),
    "BUCKETIZE": (1, 1),
    "CALL_ONCE": (1, 1),
    "CAST": (1, 5),
    "CEIL": (1, 1),
    "COMPLEX_ABS": (1, 1),
    "CONCATENATION": (1, 4),
    "CONV_2D": (1, 7),
    "CONV_3D": (1, 1),
    "CONV_3D_TRANSPOSE": (1, 1),
    "COS": (1, 1),
    "CUMSUM": (1, 1),
    "DENSIFY": (1, 1),
    "DEPTHWISE_CONV_2D": (1, 7),
    "DEPTH_TO_SPACE": (1, 2),
    "DEQUANTIZE": (1, 5),
    "DIV": (1, 2),
    "DYNAMIC_UPDATE_SLICE": (1, 1),
    "ELU": (1, 1),
    "EMBEDDING_LOOKUP": (1, 3),
    "EMBEDDING_LOOKUP_SPARSE": (1, 1),
    "EQUAL": (1, 4),
    "EXP": (1, 2),
    "EXPAND_DIMS": (1, 1),
    "FAKE_QUANT": (1, 2),
    "FILL": (1, 4),
    "FLOOR": (1, 1),
    "FLOOR_DIV": (1, 3),
    "FLOOR_MOD": (1, 2),
    "FULLY_CONNECTED": (1, 10),
    "GATHER": (1, 6),
    "GATHER_ND": (1, 4),
    "GELU": (1, 2),
    "GREATER": (1, 2),
    "GREATER_EQUAL": (1, 3),
    "HARD_SWISH": (1, 1),
    "HASHTABLE": (1, 1),
    "HASHTABLE_FIND": (1, 1),
    "HASHTABLE_IMPORT": (1, 1),
    "HASHTABLE_LOOKUP": (1, 1),
    "HASHTABLE_SIZE": (1, 1),
    "IF": (1, 1),
    "IMAG": (1, 1),
    "L2_NORMALIZATION": (1, 2),
    "L2_POOL_2D": (1, 1),
    "LEAKY_RELU": (1, 2),
    "LESS": (1, 3),
    "LESS_EQUAL": (1, 2),
    "LOCAL_RESPONSE_NORMALIZATION": (1, 1),
    "LOG": (1, 1),
    "LOGICAL_AND": (1, 1),
    "LOGICAL_NOT": (1, 1),
    "LOGICAL_OR": (1, 1),
    "LOGISTIC": (1, 3),
    "LOG_SOFTMAX": (1, 2),
    "LSH_PROJECTION": (1, 1),
    "LSTM": (1, 4),
    "MATRIX_DIAG": (1, 1),
    "MATRIX_SET_DIAG": (1, 1),
    "MAXIMUM": (1, 4),
    "MAX_POOL_2D": (1, 3),
    "MEAN": (1, 3),
    "MINIMUM": (1, 4),
    "MIRROR_PAD": (1, 3),
    "MUL": (1, 7),
    "MULTINOMIAL": (1, 1),
    "NEG": (1, 1),
    "NON_MAX_SUPPRESSION_V4": (1, 1),
    "NON_MAX_SUPPRESSION_V5": (1, 1),
    "NOT_EQUAL": (1, 3),
    "ONE_HOT": (1, 1),
    "PACK": (1, 4),
    "PAD": (1, 4),
    "PADV2": (1, 4),
    "POW": (1, 1),
    "PRELU": (1, 1),
    "QUANTIZE": (1, 3),
    "RANDOM_STANDARD_NORMAL": (1, 1),
    "RANDOM_UNIFORM": (1, 1),
    "RANGE": (1, 2),
    "RANK": (1, 1),
    "READ_VARIABLE": (1, 1),
    "REAL": (1, 1),
    "REDUCE_ALL": (1, 1),
    "REDUCE_ANY": (1, 1),
    "REDUCE_MAX": (1, 3),
    "REDUCE_MIN": (1, 3),
    "REDUCE_PROD": (1, 2),
    "RELU": (1, 3),
    "RELU6": (1, 3),
    "RELU_0_TO_1": (1, 1),
    "RELU_N1_TO_1": (1, 1),
    "RESHAPE": (1, 1),
    "RESIZE_BILINEAR": (1, 4),
    "RESIZE_NEAREST_NEIGHBOR": (1, 4),
    "REVERSE_SEQUENCE": (1, 1),
    "REVERSE_V2": (1, 3),
    "RFFT2D": (1, 1),
    "RIGHT_SHIFT": (1, 1),
    "RNN": (1, 3),
    "ROUND": (1, 1),
    "RSQRT": (1, 2),
    "SCATTER_ND": (1, 1),
    "SEGMENT_SUM": (1, 1),
    "SELECT": (1, 4),
    "SELECT_V2": (1, 2),
    "SHAPE": (1, 1),
    "SIGN": (1, 2),
    "SIN": (1, 1),
    "SKIP_GRAM": (1, 1),
    "SLICE": (1, 6),
    "SOFTMAX": (1, 3),
    "SPACE_TO_BATCH_ND": (1, 4),
    "SPACE_TO_DEPTH": (1, 2),
    "SPARSE_TO_DENSE": (1, 3),
    "SPLIT": (1, 4),
    "SPLIT_V": (1, 2),
    "SQRT": (1, 1),
    "SQUARE": (1, 1),
    "SQUARED_DIFFERENCE": (1, 2),
    "SQUEEZE": (1, 2),
    "STRIDED_SLICE": (1, 8),
    "SUB": (1, 5),
    "SUM": (1, 2),
    "SVDF": (1, 4),
    "TANH": (1, 3),
    "TILE": (1, 3),
    "TOPK_V2": (1, 3),
    "TRANSPOSE": (1, 6),
    "TRANSPOSE_CONV": (1, 4),
    "UNIDIRECTIONAL_SEQUENCE_LSTM": (1, 4),
    "UNIDIRECTIONAL_SEQUENCE_RNN": (1, 3),
    "UNIQUE": (1, 1),
    "UNPACK": (1, 4),
    "UNSORTED_SEGMENT_MAX": (1, 1),
    "UNSORTED_SEGMENT_MIN": (1, 1),
    "UNSORTED_SEGMENT_PROD": (1, 1),
    "UNSORTED_SEGMENT_SUM": (1, 1),
    "VAR_HANDLE": (1, 1),
    "WHERE": (1, 2),
    "WHILE": (1, 1),
    "ZEROS_LIKE": (1, 1),
}

# ai-edge-litert versions are not TF versions: the probe above showed 1.2.0 loads all of
# tflite-runtime 2.14's op versions, and kernel registries only ever grow.
LITERT_FOR_TFLITE_RUNTIME_2_14 = "1.2"
TFLITE_RUNTIME_VERSION = "2.14"

_FLEX_PREFIX = "Flex"


@dataclass(frozen=True, order=True)
class OperatorUse:
    """One operator code of a model: builtin name (or custom code) and version."""

    name: str
    version: int
    custom: bool = False

    def __str__(self) -> str:
        return f"{self.name} v{self.version}" if not self.custom else f"custom op {self.name}"


@dataclass(frozen=True)
class OpReport:
    """The operator codes of a model and the facts that decide where it can run."""

    operators: tuple[OperatorUse, ...]
    per_channel_dense: bool

    @property
    def custom_ops(self) -> tuple[str, ...]:
        """Custom op names (Flex ops are custom ops named ``Flex<TFOp>``)."""
        return tuple(op.name for op in self.operators if op.custom)

    def tflite_runtime_2_14_problems(self) -> list[str]:
        """Why tflite-runtime 2.14 cannot run the model; empty when it can."""
        problems: list[str] = []
        for op in self.operators:
            if op.custom:
                continue
            supported = TFLITE_RUNTIME_2_14.get(op.name)
            if supported is None:
                problems.append(f"{op.name} (not in tflite-runtime 2.14)")
            elif not supported[0] <= op.version <= supported[1]:
                problems.append(
                    f"{op.name} version {op.version} (tflite-runtime 2.14 has "
                    f"{_range_text(supported)})"
                )
        if self.per_channel_dense:
            problems.append(
                "FULLY_CONNECTED with per-channel quantised weights (tflite-runtime 2.14 "
                "crashes on it on aarch64)"
            )
        return problems

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"NAME": version}`` (highest version per op), custom ops apart."""
        builtin: dict[str, int] = {}
        for op in self.operators:
            if not op.custom:
                builtin[op.name] = max(op.version, builtin.get(op.name, 0))
        return {"builtin": builtin, "custom": list(self.custom_ops)}


def _range_text(supported: tuple[int, int]) -> str:
    low, high = supported
    return f"version {low}" if low == high else f"versions {low}-{high}"


def _schema() -> ModuleType:
    """The generated Python reader of the TFLite flatbuffer schema.

    TensorFlow ships it (``tensorflow.lite.python.schema_py_generated``, which TF's own
    ``flatbuffer_utils`` uses); ai-edge-litert ships the same file. Either will do.
    """
    for name in (
        "tensorflow.lite.python.schema_py_generated",
        "ai_edge_litert.schema_py_generated",
    ):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError(
        "reading a .tflite model needs TensorFlow or ai-edge-litert; "
        "install them with pip install 'fieldscope[train]'"
    )


def _names(schema: ModuleType) -> dict[int, str]:
    return {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_") and isinstance(value, int)
    }


def read_operators(model: bytes) -> OpReport:
    """Read the operator codes and dense-weight quantisation from a .tflite flatbuffer.

    Raises:
        ConversionError: the bytes are not a TFLite model.
    """
    schema = _schema()
    data = bytes(model)
    if len(data) < 8 or not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise ConversionError("not a TFLite model (no TFL3 flatbuffer identifier)")
    names = _names(schema)
    try:
        root = schema.Model.GetRootAs(data, 0)
        codes: list[OperatorUse] = []
        for i in range(root.OperatorCodesLength()):
            oc = root.OperatorCodes(i)
            # Codes > 127 live in builtin_code; older files only in the deprecated byte.
            code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
            custom = oc.CustomCode()
            if custom is not None and names.get(code) == "CUSTOM":
                codes.append(OperatorUse(custom.decode("utf-8", "replace"), oc.Version(), True))
            else:
                codes.append(OperatorUse(names.get(code, f"BUILTIN_{code}"), oc.Version()))
        per_channel = _has_per_channel_dense(root, codes)
    except (IndexError, struct.error, TypeError, ValueError) as exc:
        raise ConversionError(f"the TFLite model is damaged: {exc}") from exc
    return OpReport(tuple(sorted(set(codes))), per_channel)


def _has_per_channel_dense(root: Any, codes: list[OperatorUse]) -> bool:
    """True when any FULLY_CONNECTED weight tensor carries more than one scale."""
    for s in range(root.SubgraphsLength()):
        graph = root.Subgraphs(s)
        for j in range(graph.OperatorsLength()):
            op = graph.Operators(j)
            if codes[op.OpcodeIndex()].name != "FULLY_CONNECTED" or op.InputsLength() < 2:
                continue
            weights = op.Inputs(1)
            if weights < 0:
                continue
            quant = graph.Tensors(weights).Quantization()
            if quant is not None and quant.ScaleLength() > 1:
                return True
    return False


def check_edge_compatible(report: OpReport, *, require_tflite_runtime: bool = True) -> None:
    """Refuse a model the edge runtimes cannot run.

    Custom and Flex ops are always refused: neither ai-edge-litert nor tflite-runtime
    links the TensorFlow kernels they need. With ``require_tflite_runtime`` (the default)
    a model that tflite-runtime 2.14 cannot run is refused too.

    Raises:
        UnsupportedOpsError: naming each offending op and what to do.
    """
    if report.custom_ops:
        flex = [name for name in report.custom_ops if name.startswith(_FLEX_PREFIX)]
        other = [name for name in report.custom_ops if not name.startswith(_FLEX_PREFIX)]
        parts = []
        if flex:
            parts.append(f"TensorFlow (Flex) ops {', '.join(flex)}")
        if other:
            parts.append(f"custom ops {', '.join(other)}")
        raise UnsupportedOpsError(
            f"the converted model needs {' and '.join(parts)}, which no edge runtime "
            "provides; replace the layers that produce them with ones TFLite has as "
            "builtins (fieldscope never enables SELECT_TF_OPS)"
        )
    problems = report.tflite_runtime_2_14_problems()
    if problems and require_tflite_runtime:
        raise UnsupportedOpsError(
            "tflite-runtime 2.14 (the last release, on older Pi images) cannot run the "
            f"converted model: {'; '.join(problems)}. Try another --quantize mode, or "
            "pass --allow-newer-runtime to write a bundle that only runs on a newer "
            "ai-edge-litert"
        )


def min_runtime(
    report: OpReport, *, litert_version: str | None, tensorflow_version: str | None
) -> dict[str, str]:
    """The manifest's ``min_runtime``: each runtime known to run the model, oldest version.

    A model within :data:`TFLITE_RUNTIME_2_14` runs on tflite-runtime 2.14, on TF 2.14's
    ``tf.lite`` (the same kernels) and on ai-edge-litert 1.2. Anything newer is only known
    to run on the versions the fidelity check actually used (``litert_version``, and the
    converting ``tensorflow_version``, whose ``tf.lite`` runs what it converts).
    """
    if not report.tflite_runtime_2_14_problems() and not report.custom_ops:
        return {
            "ai_edge_litert": LITERT_FOR_TFLITE_RUNTIME_2_14,
            "tensorflow": TFLITE_RUNTIME_VERSION,
            "tflite_runtime": TFLITE_RUNTIME_VERSION,
        }
    result: dict[str, str] = {}
    if litert_version:
        result["ai_edge_litert"] = litert_version
    if tensorflow_version:
        result["tensorflow"] = tensorflow_version
    return result
