"""Models over protobuf's 2 GB limit: lazy weights in, streamed weights out.

Loading keeps every initializer that lives in an external data file as a reference (:class:`ExternalValues`):
its bytes are read from disk only when a pass asks for the values, and dropped again when the pass replaces the
constant (a quantized weight is a quarter of the float one). Saving (:func:`save_streaming`) writes each large
constant straight into ``<output>.data`` and puts only a reference in the model, so neither the input nor the
output is ever serialised as one protobuf, and an unchanged weight is copied file-to-file in chunks. ONNX Runtime
sessions are opened on files (:func:`session_path`), never on serialised bytes, so no second in-memory copy of
the weights is made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from edgeq.errors import OutputError

ALIGN = 4096  # page-aligned offsets let ONNX Runtime memory-map the weights
CHUNK = 64 << 20


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def uses_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


class ExternalValues(LazyValues):
    """Values of an initializer stored in an external file, read on first use."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path):
        super().__init__(tensor)
        info = _external_info(tensor)
        self.path = Path(base_dir) / info["location"]
        self.offset = int(info.get("offset", 0))
        self.length = int(info["length"]) if "length" in info else None

    def load(self) -> np.ndarray:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        shape = tuple(self.tensor.dims)
        if self.tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            clone = onnx.TensorProto()
            clone.CopyFrom(self.tensor)
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                clone.raw_data = fh.read(self.length)
            clone.data_location = onnx.TensorProto.DEFAULT
            del clone.external_data[:]
            return numpy_helper.to_array(clone)
        count = int(np.prod(shape)) if shape else 1
        return np.fromfile(self.path, dtype=np_dtype, count=count, offset=self.offset).reshape(shape)

    def copy_to(self, fh) -> int:
        """Stream the raw bytes into ``fh``; returns the number of bytes written."""
        length = self.length if self.length is not None else self.nbytes
        written = 0
        with open(self.path, "rb") as src:
            src.seek(self.offset)
            while written < length:
                chunk = src.read(min(CHUNK, length - written))
                if not chunk:
                    raise OutputError(f"external data file {self.path} is shorter than the model says")
                fh.write(chunk)
                written += len(chunk)
        return written


def attach_external(graph: gs.Graph, base_dir: Path) -> int:
    """Turn the graph's external-data constants into :class:`ExternalValues`; returns how many."""
    n = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and \
                not isinstance(t._values, ExternalValues) and uses_external(t._values.tensor):
            t._values = ExternalValues(t._values.tensor, base_dir)
            t.data_location = None  # once loaded (and perhaps changed) the values are written inline
            n += 1
    return n


class WeightSpill:
    """Where a pass puts the weights it creates for a large model (quantized weights): each is written to a
    temporary file and its constant reads it back on demand (:class:`ExternalValues`), so the new weights are not
    all held in memory until the model is saved; :func:`save_streaming` copies them file-to-file."""

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self.folder = Path(tempfile.mkdtemp(prefix="edgeq-spill-"))
        self.path = self.folder / "weights.bin"
        self.fh = open(self.path, "wb")
        self.bytes = 0
        self._cleanup = weakref.finalize(self, WeightSpill._remove, self.fh, self.folder)  # on errors too

    def put(self, c: gs.Constant) -> None:
        values = c._values
        if not isinstance(values, np.ndarray) or values.nbytes < self.min_bytes or \
                getattr(c, "edgeq_narrow_dtype", None) or values.dtype.kind not in "iuf":
            return
        tp = numpy_helper.from_array(values, c.name)
        self.fh.write(b"\0" * ((-self.fh.tell()) % ALIGN))
        offset = self.fh.tell()
        self.fh.write(tp.raw_data)
        self.fh.flush()
        ref = _reference(c, tp.data_type, tp.dims, self.path.name, offset, len(tp.raw_data))
        c._values = ExternalValues(ref, self.folder)
        c.data_location = None
        self.bytes += len(tp.raw_data)

    def close(self) -> None:
        self._cleanup()

    @staticmethod
    def _remove(fh, folder: Path) -> None:
        fh.close()
        shutil.rmtree(folder, ignore_errors=True)


def constants_nbytes(graph: gs.Graph) -> int:
    total = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            v = t._values
            total += int(v.nbytes) if hasattr(v, "nbytes") else 0
    return total


def _tensor_proto(c: gs.Constant) -> onnx.TensorProto:
    narrow = getattr(c, "edgeq_narrow_dtype", None)
    values = np.asarray(c.values)
    if narrow:
        from edgeq.quant_math import narrow_numpy_dtype

        values = values.astype(narrow_numpy_dtype(narrow))
    return numpy_helper.from_array(values, c.name)


def _reference(c: gs.Constant, data_type: int, dims, location: str, offset: int, length: int) -> onnx.TensorProto:
    tp = onnx.TensorProto()
    tp.name = c.name
    tp.data_type = data_type
    tp.dims.extend(dims)
    tp.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tp.external_data.add()
        entry.key, entry.value = key, value
    return tp


def write_graph(graph: gs.Graph, template: onnx.ModelProto | None, directory: Path, name: str, *,
                threshold: int = 1024) -> Path:
    """Write ``graph`` as ``directory/name`` + ``directory/name.data`` (constants over ``threshold`` bytes)."""
    from edgeq.ir import to_model

    data_name = f"{name}.data"
    with open(directory / data_name, "wb") as fh:
        for c in sorted((t for t in graph.tensors().values() if isinstance(t, gs.Constant)), key=lambda t: t.name):
            v = c._values
            if isinstance(v, ExternalValues):
                pad = (-fh.tell()) % ALIGN
                fh.write(b"\0" * pad)
                offset = fh.tell()
                length = v.copy_to(fh)
                c._values = LazyValues(_reference(c, v.tensor.data_type, v.tensor.dims, data_name, offset, length))
                continue
            if isinstance(v, LazyValues):  # embedded in the source protobuf: small unless huge models embed them
                tp = onnx.TensorProto()
                tp.CopyFrom(v.tensor)
                tp.name = c.name
            else:
                tp = _tensor_proto(c)
                if hasattr(c, "edgeq_narrow_dtype"):
                    del c.edgeq_narrow_dtype
            raw = tp.raw_data if tp.HasField("raw_data") else None
            if raw is None or len(raw) <= threshold:
                c._values = LazyValues(tp)
                continue
            pad = (-fh.tell()) % ALIGN
            fh.write(b"\0" * pad)
            offset = fh.tell()
            fh.write(raw)
            c._values = LazyValues(_reference(c, tp.data_type, tp.dims, data_name, offset, len(raw)))
        fh.flush()
        os.fsync(fh.fileno())
    model = to_model(graph, template)
    with open(directory / name, "wb") as fh:
        fh.write(model.SerializeToString())
    attach_external(graph, directory)  # the graph now reads its constants from the written file
    return directory / name


def save_streaming(graph: gs.Graph, template: onnx.ModelProto | None, output: Path) -> Path:
    """Atomically write ``output`` and ``output.data`` from ``graph`` without building a >2 GB protobuf."""
    output = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        write_graph(graph, template, staging, output.name)
        os.replace(staging / f"{output.name}.data", output.parent / f"{output.name}.data")
        os.replace(staging / output.name, output)
        attach_external(graph, output.parent)
        _rebase(graph, output.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _rebase(graph: gs.Graph, base_dir: Path) -> None:
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, ExternalValues):
            t._values.path = Path(base_dir) / _external_info(t._values.tensor)["location"]


@contextlib.contextmanager
def session_path(graph: gs.Graph, template: onnx.ModelProto | None, *, extra_outputs: list[str] = ()) -> Iterator[Path]:
    """A temporary on-disk copy of ``graph`` (optionally with extra outputs) for an ONNX Runtime session."""
    with tempfile.TemporaryDirectory(prefix="edgeq-large-") as tmp:
        work = graph.copy()  # shares the value objects, so external weights are read from their files
        if extra_outputs:
            tensors = work.tensors()
            for name in extra_outputs:
                if name in tensors and tensors[name] not in work.outputs and not isinstance(tensors[name], gs.Constant):
                    work.outputs.append(tensors[name])
        yield write_graph(work, template, Path(tmp), "model.onnx")


# ------------------------------------------------------------------------------------------------------------
# Lazy ModelProtos: external references rewritten to absolute paths while in memory (never saved that way).

LARGE_MODEL_BYTES = 1 << 30  # from this size on, weights stay on disk instead of being loaded


def has_external(model: onnx.ModelProto) -> bool:
    return any(uses_external(t) for t in model.graph.initializer)


def absolutize_external(model: onnx.ModelProto, base_dir: Path) -> None:
    """Point every external reference at its file's absolute path (in memory only)."""
    for t in model.graph.initializer:
        if uses_external(t):
            for e in t.external_data:
                if e.key == "location" and not os.path.isabs(e.value):
                    e.value = str((Path(base_dir) / e.value).resolve())


@contextlib.contextmanager
def linked_copy(model: onnx.ModelProto) -> Iterator[Path | None]:
    """A temporary model file whose data files are hard links to the originals (ONNX Runtime then reads the
    weights itself, once); None where a hard link is impossible (another filesystem, no permission)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgeq-session-"))
    try:
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        links: dict[str, str] = {}
        for t in clone.graph.initializer:
            if not uses_external(t):
                continue
            for e in t.external_data:
                if e.key == "location" and os.path.isabs(e.value):
                    if e.value not in links:
                        links[e.value] = f"weights{len(links)}.data"
                        os.link(e.value, tmp / links[e.value])
                    e.value = links[e.value]
        (tmp / "model.onnx").write_bytes(clone.SerializeToString())
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        yield None
        return
    try:
        yield tmp / "model.onnx"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_external(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` without its external initializers, and those initializers as read-only memory maps.

    ONNX Runtime takes them through ``SessionOptions.add_external_initializers`` (it refuses data files outside
    the model's folder), so the weights are paged in from the original file instead of being copied.
    """
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    maps = {}
    for t in clone.graph.initializer:
        if not uses_external(t) or t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            continue
        info = _external_info(t)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        shape = tuple(t.dims)
        if int(np.prod(shape)) == 0:
            continue
        maps[t.name] = np.memmap(info["location"], dtype=dtype, mode="c", offset=int(info.get("offset", 0)),
                                 shape=shape)
        del t.external_data[:]  # ORT only replaces initializers declared external; this file is never read
        entry = t.external_data.add()
        entry.key, entry.value = "location", "edgeq-mapped-weights.bin"
    return clone, maps


def release_memory() -> None:
    """Return freed memory to the OS between stages (glibc keeps freed weight-sized blocks in its heap)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
