"""Read a PyTorch ``state_dict`` file into numpy arrays without importing torch.

Two layouts exist. The legacy one (``torch.save`` before 1.6, and ``_use_new_zipfile_serialization=False``) is a
run of pickles: magic number, protocol version, system info, the object pickle, the list of storage keys, then
each storage as an int64 element count followed by its raw bytes. The zip layout (``<root>/data.pkl`` with
``<root>/data/<key>`` for each storage) is what ``torch.save`` writes today. Both refer to storages through pickle
persistent ids, and to tensors through ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.

The unpickler is restricted: it resolves only the tensor/storage constructors and ``collections.OrderedDict``, so a
checkpoint cannot run arbitrary code. Only little-endian storages are accepted.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    pass


@dataclass
class _StorageRef:
    key: str
    dtype: np.dtype
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple

    def materialise(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise CheckpointError(f"storage {self.storage.key} was never read")
        if not self.size:
            return np.array(flat[self.offset])
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride])
        return np.ascontiguousarray(view)


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends inside the pickle."""

    def __init__(self, name: str):
        if name not in STORAGE_DTYPES:
            raise CheckpointError(f"unsupported storage type torch.{name}")
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _StorageRef]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise CheckpointError(f"checkpoint refers to {module}.{name}, which a weights-only reader does not load")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, *_ = pid
        if kind != "storage":
            raise CheckpointError(f"unknown persistent id kind {kind!r}")
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else np.dtype(np.uint8)
        return self.storages.setdefault(str(key), _StorageRef(str(key), dtype))


def _materialise(obj):
    if isinstance(obj, _TensorRef):
        return obj.materialise()
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _load_legacy(f) -> object:
    magic = pickle.load(f)
    if magic != LEGACY_MAGIC:
        raise CheckpointError("not a PyTorch checkpoint (bad magic number)")
    pickle.load(f)  # protocol version
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
        raise CheckpointError("big-endian checkpoints are not supported")
    storages: dict[str, _StorageRef] = {}
    obj = _Unpickler(f, storages).load()
    for key in pickle.load(f):
        ref = storages[str(key)]
        (count,) = struct.unpack("<q", f.read(8))
        raw = f.read(count * ref.dtype.itemsize)
        if len(raw) != count * ref.dtype.itemsize:
            raise CheckpointError(f"storage {key} is truncated")
        ref.data = np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<"))
    return obj


def _load_zip(path: Path) -> object:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{path}: zip checkpoint without data.pkl")
        root = pkl[: -len("data.pkl")]
        order = f"{root}byteorder"
        if order in names and z.read(order).strip() != b"little":
            raise CheckpointError("big-endian checkpoints are not supported")
        storages: dict[str, _StorageRef] = {}
        obj = _Unpickler(io.BytesIO(z.read(pkl)), storages).load()
        for key, ref in storages.items():
            ref.data = np.frombuffer(z.read(f"{root}data/{key}"), dtype=ref.dtype.newbyteorder("<"))
    return obj


def load_state_dict(path: Path | str) -> dict[str, np.ndarray]:
    """``{name: array}`` from a ``torch.save``-d state dict (legacy or zip layout)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        obj = _load_zip(path)
    else:
        with open(path, "rb") as f:
            obj = _load_legacy(f)
    state = _materialise(obj)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
