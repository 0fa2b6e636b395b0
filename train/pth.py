"""Read a PyTorch ``.pth`` state dict into numpy arrays without PyTorch and without trust.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. We
need only tensors, so the unpickler here resolves a short allow-list of names
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, the typed storage
classes such as ``torch.FloatStorage``) to our own harmless stand-ins and refuses every
other name with ``WeightsFileError`` before anything is called. Tensor data is never
unpickled: it is read as raw bytes with numpy.

Both of PyTorch's layouts are read:

* zip (PyTorch >= 1.6): ``<name>/data.pkl`` holds the structure, ``<name>/data/<key>``
  the bytes of each storage;
* legacy (what ``torch.save`` wrote before 1.6, and what the pretrained weights we ship
  for use: torchvision's ``mobilenet_v2-b0353104.pth``, ``efficientnet-lite0-57934424.pth``):
  five pickles in a row (magic number, protocol version, system info, the structure,
  the storage keys), then each storage as an int64 element count and its bytes.

Every view into a storage is bounds-checked before numpy looks at it, so a crafted file
cannot make us read outside the bytes it contains.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from fieldscope.train.errors import WeightsFileError

__all__ = ["read_state_dict"]

# What torch.save writes first in the legacy format.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype (little-endian; byte order is checked separately).
_STORAGE_DTYPES: Mapping[str, str] = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

# Keys a training script commonly wraps a state dict in.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a ``torch.*Storage`` class: only its element type matters."""

    name: str
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes are read after the structure."""

    key: str
    dtype: np.dtype[Any]
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """What ``_rebuild_tensor_v2`` would have built: a strided view into a storage."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``.pth`` state dict, by name, as numpy arrays (copies).

    Non-tensor entries (none in a plain ``state_dict``) are refused rather than skipped:
    a state dict that is not all tensors is not one we know how to map.

    Raises:
        WeightsFileError: the file cannot be read, is not a PyTorch file, names anything
            beyond tensors and dictionaries, or holds inconsistent tensor data.
    """
    try:
        is_zip = zipfile.is_zipfile(path)
        if is_zip:
            return _read_zip(path)
        with path.open("rb") as fh:
            return _read_legacy(fh, path)
    except OSError as exc:
        raise WeightsFileError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightsFileError(
            f"{path} is not a readable PyTorch weights file ({exc}); reinstall the package "
            "that ships it"
        ) from exc


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsFileError(f"{path}: a PyTorch zip file has one <name>/data.pkl")
        prefix = pickles[0].rsplit("/", 1)[0]
        byteorder_name = f"{prefix}/byteorder"
        if byteorder_name in archive.namelist():
            order = archive.read(byteorder_name).decode("ascii", "replace").strip()
            if order != "little":
                raise WeightsFileError(f"{path}: {order}-endian tensors are not supported")
        storages: dict[str, _StorageRef] = {}
        structure = _Unpickler(io.BytesIO(archive.read(pickles[0])), path, storages).load()
        data = {}
        for key, ref in storages.items():
            try:
                raw = archive.read(f"{prefix}/data/{key}")
            except KeyError:
                raise WeightsFileError(f"{path}: storage {key} is missing") from None
            data[key] = _storage_array(raw, ref, path)
    return _materialise(structure, data, path)


def _read_legacy(fh: IO[bytes], path: Path) -> dict[str, np.ndarray]:
    header = _Unpickler(fh, path, {}).load()
    if header != _LEGACY_MAGIC:
        raise WeightsFileError(f"{path} is not a PyTorch weights file (no torch.save header)")
    protocol = _Unpickler(fh, path, {}).load()
    if protocol != _LEGACY_PROTOCOL:
        raise WeightsFileError(f"{path}: unsupported torch.save protocol {protocol!r}")
    sys_info = _Unpickler(fh, path, {}).load()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise WeightsFileError(f"{path}: only little-endian weights files are supported")
    storages: dict[str, _StorageRef] = {}
    structure = _Unpickler(fh, path, storages).load()
    keys = _Unpickler(fh, path, {}).load()
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise WeightsFileError(f"{path}: the storage list does not match the tensors")
    data = {}
    for key in keys:
        ref = storages[key]
        count = np.frombuffer(_read_exact(fh, 8, path), dtype="<i8")[0]
        if count != ref.numel:
            raise WeightsFileError(
                f"{path}: storage {key} has {count} elements, its tensors expect {ref.numel}"
            )
        data[key] = _storage_array(_read_exact(fh, ref.numel * ref.dtype.itemsize, path), ref, path)
    return _materialise(structure, data, path)


def _read_exact(fh: IO[bytes], size: int, path: Path) -> bytes:
    raw = fh.read(size)
    if len(raw) != size:
        raise WeightsFileError(f"{path} is truncated (reinstall the package that ships it)")
    return raw


def _storage_array(raw: bytes, ref: _StorageRef, path: Path) -> np.ndarray:
    if len(raw) != ref.numel * ref.dtype.itemsize:
        raise WeightsFileError(
            f"{path}: storage {ref.key} holds {len(raw)} bytes, expected "
            f"{ref.numel * ref.dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=ref.dtype)


def _materialise(
    structure: Any, data: Mapping[str, np.ndarray], path: Path
) -> dict[str, np.ndarray]:
    """Turn the unpickled mapping of tensor references into named numpy arrays."""
    for key in _WRAPPER_KEYS:
        if isinstance(structure, dict) and isinstance(structure.get(key), dict):
            structure = structure[key]
            break
    if not isinstance(structure, dict) or not structure:
        raise WeightsFileError(f"{path} does not hold a state dict (name -> tensor)")
    tensors: dict[str, np.ndarray] = {}
    for name, value in structure.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise WeightsFileError(
                f"{path}: entry {name!r} is {type(value).__name__}, not a tensor; "
                "only plain state dicts can be read"
            )
        tensors[name] = _view(value, data[value.storage.key], name, path)
    return tensors


def _view(ref: _TensorRef, storage: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Copy the strided view a tensor is, after proving it lies inside its storage."""
    size, stride, offset = ref.size, ref.stride, ref.offset
    if len(size) != len(stride) or any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise WeightsFileError(f"{path}: tensor {name} has an invalid shape or stride")
    if math.prod(size) == 0:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True))
    if offset < 0 or last >= storage.size:
        raise WeightsFileError(f"{path}: tensor {name} reaches outside its storage")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, copy=True)


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any
) -> _TensorRef:
    """Our stand-in for ``torch._utils._rebuild_tensor(_v2)``; checks every argument."""
    if not isinstance(storage, _StorageRef):
        raise WeightsFileError("a tensor refers to something other than a storage")
    if not _is_int(offset) or not _int_tuple(size) or not _int_tuple(stride):
        raise WeightsFileError("a tensor has a non-integer offset, size or stride")
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    """``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is its tensor here."""
    if not isinstance(data, _TensorRef):
        raise WeightsFileError("a parameter wraps something other than a tensor")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(_is_int(v) for v in value)


# The whole vocabulary a state dict needs; nothing else in a file is ever resolved.
_ALLOWED: Mapping[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED`` names and storage classes; refuses all else."""

    def __init__(self, fh: IO[bytes], path: Path, storages: dict[str, _StorageRef]) -> None:
        super().__init__(fh)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, np.dtype(_STORAGE_DTYPES[name]))
        raise WeightsFileError(
            f"{self._path} asks to load {module}.{name}, which a plain weights file never "
            "needs; refusing to unpickle it (the file may be malicious or not a state dict)"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsFileError(f"{self._path}: unexpected persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise WeightsFileError(f"{self._path}: storage {key!r} has an unsupported type")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise WeightsFileError(f"{self._path}: malformed storage reference {key!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise WeightsFileError(f"{self._path}: storage views (legacy) are not supported")
        ref = self._storages.setdefault(key, _StorageRef(key, storage_type.dtype, numel))
        if ref.numel != numel or ref.dtype != storage_type.dtype:
            raise WeightsFileError(f"{self._path}: storage {key} is described two ways")
        return ref
