"""Reading and writing ONNX models safely.

Loading checks the file before anything else runs (missing, not ONNX, truncated, opset too old, missing external
data) and raises :class:`ModelLoadError` with a one-line reason. Saving is atomic: the model is written to a temporary
file in the destination directory and renamed into place, so an interrupted run never leaves a partial output, and
an output equal to the input is refused. Models whose weights exceed protobuf's 2 GB limit are written with external
data next to the output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError

from edgeq.errors import ModelLoadError, OutputError, UnsupportedModelError

log = logging.getLogger(__name__)

MIN_OPSET = 11
PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom under the 2 GB protobuf limit for the graph structure itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def load_model(path: str | os.PathLike, *, load_external_data: bool = True, check: bool = True) -> onnx.ModelProto:
    """Load and sanity-check an ONNX model; every failure is a :class:`ModelLoadError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p} is empty (0 bytes), expected an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError, TypeError) as exc:
        raise ModelLoadError(f"{p} is not a valid ONNX model (truncated or corrupt protobuf?): {_first_line(exc)}")
    except OSError as exc:
        raise ModelLoadError(f"cannot read {p}: {exc.strerror or exc}")
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{p} does not contain an ONNX graph (is it really an .onnx model?)")
    opset = default_opset(model)
    if opset == 0:
        raise ModelLoadError(f"{p} declares no default-domain opset; not a usable ONNX model")
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"{p} uses opset {opset}; edgeq needs opset >= {MIN_OPSET}. Re-export the model with a newer opset "
            f"(e.g. torch.onnx.export(..., opset_version=17))"
        )
    if opset > onnx.defs.onnx_opset_version():
        raise UnsupportedModelError(
            f"{p} uses opset {opset}, newer than this onnx {onnx.__version__} knows (up to "
            f"{onnx.defs.onnx_opset_version()}); upgrade onnx and onnxruntime or re-export with an older opset"
        )
    _check_text(model, p)
    check_structure(model.graph, p)
    _check_known_ops(model, p)
    _check_external_files(model, p)
    if not load_external_data:  # lazy: weights stay on disk, referenced by absolute path while in memory
        from edgeq.large_model import absolutize_external

        absolutize_external(model, p.parent)
    if load_external_data:
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load external data for {p}: {_first_line(exc)}")
    _check_tensors(model, p)
    if check:
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        check_model(model, p, file=p if external else None)
    return model


def _check_external_files(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    missing: set[str] = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            loc = info.get("location", "")
            if "\0" in loc:
                raise ModelLoadError(f"{path}: external data location {loc!r} is not a valid file name")
            target = (path.parent / loc).resolve()
            if not loc or not target.is_file():
                missing.add(loc or "<no location>")
            elif path.parent.resolve() not in target.parents and target.parent != path.parent.resolve():
                raise ModelLoadError(f"{path}: external data location {loc!r} points outside the model's folder")
    if missing:
        raise ModelLoadError(
            f"{path}: external data file(s) not found next to the model: {', '.join(sorted(missing))}"
        )


def _check_text(model: onnx.ModelProto, path: Path) -> None:
    """Names and op types must be text: protobuf hands undecodable (corrupt) strings over as bytes."""
    g = model.graph
    values = [imp.domain for imp in model.opset_import] + [v.name for v in (*g.input, *g.output, *g.initializer)]
    for node in g.node:
        values += [node.name, node.op_type, node.domain, *node.input, *node.output]
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise ModelLoadError(f"{path} is not a valid ONNX model: the name {bad!r} is not valid UTF-8 text "
                             f"(corrupt file?)")


_PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4}
for _name, _bits in (("INT2", 2), ("UINT2", 2)):
    if hasattr(onnx.TensorProto, _name):
        _PACKED_BITS[getattr(onnx.TensorProto, _name)] = _bits


def _check_tensors(model: onnx.ModelProto, path: Path) -> None:
    """Every initializer (and Constant value) has a known dtype and as much data as its shape says."""
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.HasField("t")]
    known = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    g = model.graph
    for vi in (*g.input, *g.output, *g.value_info):
        elem = vi.type.tensor_type.elem_type
        if elem and elem not in known:
            raise ModelLoadError(f"{path}: tensor {vi.name!r} is declared with unknown element type {elem} "
                                 f"(corrupt file, or a newer ONNX than onnx {onnx.__version__})")
    for t in tensors:
        if t.data_type not in known:
            raise ModelLoadError(f"{path}: tensor {t.name!r} has unknown data type {t.data_type} (corrupt file, or "
                                 f"a newer ONNX than onnx {onnx.__version__})")
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(f"{path}: tensor {t.name!r} has a negative dimension {list(t.dims)}")
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
            continue
        count = 1
        for d in t.dims:
            count *= d
        if t.raw_data:
            bits = _PACKED_BITS.get(t.data_type) or 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            have, need = len(t.raw_data), (count * bits + 7) // 8
        elif t.data_type in _PACKED_BITS:
            continue
        else:
            try:
                field = onnx.helper.tensor_dtype_to_field(t.data_type)
            except (KeyError, ValueError):
                continue
            have = len(getattr(t, field))
            need = count * (2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1)
        if have != need:
            raise ModelLoadError(f"{path}: tensor {t.name!r} of shape {list(t.dims)} "
                                 f"({onnx.TensorProto.DataType.Name(t.data_type).lower()}) needs {need} "
                                 f"{'bytes' if t.raw_data else 'values'} of data but holds {have} (corrupt file?)")


def check_structure(graph: onnx.GraphProto, path: Path | str = "<model>") -> None:
    """Dataflow sanity of the main graph, checked even when the full checker is skipped: every tensor has one
    producer, every node input is produced somewhere, and there is no cycle (the order of nodes may be unsorted)."""
    producer: dict[str, str] = {i.name: "graph input" for i in graph.input}
    producer.update((i.name, "initializer") for i in graph.initializer)
    for k, node in enumerate(graph.node):
        label = f"node {node.name or k} ({node.op_type})"
        for out in node.output:
            if out and out in producer:
                raise ModelLoadError(f"{path} is not a valid ONNX graph: tensor {out!r} is written by both "
                                     f"{producer[out]} and {label}")
            if out:
                producer[out] = label
    for k, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in producer:
                raise ModelLoadError(f"{path} is not a valid ONNX graph: node {node.name or k} ({node.op_type}) "
                                     f"reads {name!r}, which no node, graph input or initializer provides")
    for out in graph.output:
        if out.name not in producer:
            raise ModelLoadError(f"{path} is not a valid ONNX graph: graph output {out.name!r} is not produced")
    _check_acyclic(graph, path)


def _check_known_ops(model: onnx.ModelProto, path: Path) -> None:
    local = {(f.domain, f.name) for f in model.functions}
    for k, node in enumerate(model.graph.node):
        if node.domain in ("", "ai.onnx") and (node.domain, node.op_type) not in local and \
                not onnx.defs.has(node.op_type):
            raise ModelLoadError(f"{path} is not a valid ONNX graph: node {node.name or k} uses {node.op_type!r}, "
                                 f"which is not an ONNX operator (a custom op needs its own domain)")


def _check_acyclic(graph: onnx.GraphProto, path: Path | str) -> None:
    writer = {out: k for k, node in enumerate(graph.node) for out in node.output if out}
    deps = [{writer[i] for i in node.input if i in writer} for node in graph.node]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(k)
    waiting = [len(d) for d in deps]
    ready = [k for k, n in enumerate(waiting) if n == 0]
    done = 0
    while ready:
        k = ready.pop()
        done += 1
        for u in users.get(k, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if done < len(graph.node):
        # Every node left waiting depends on another one left waiting: walk those links until one repeats.
        walk, k = [], next(k for k, n in enumerate(waiting) if n > 0)
        while k not in walk:
            walk.append(k)
            k = next(j for j in deps[k] if waiting[j] > 0)
        cycle = walk[walk.index(k):][::-1]
        names = " -> ".join(f"{graph.node[j].name or j} ({graph.node[j].op_type})" for j in cycle[:6])
        raise ModelLoadError(f"{path} is not a valid ONNX graph: it contains a cycle: {names}")


def check_model(model: onnx.ModelProto, path: Path | str = "<model>", *, file: Path | None = None) -> None:
    """Structural check (dangling inputs, cycles, bad attributes) with a one-line error.

    With ``file`` (a model whose weights live in external data) the checker reads the file itself, resolving the
    data files next to it, so the weights are never loaded for the check.
    """
    try:
        if file is not None:
            onnx.checker.check_model(str(file))
        elif model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:  # the checker cannot serialise >2 GB; check the graph structure without weights
            onnx.checker.check_model(_strip_weights(model))
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX graph: {_first_line(exc)}")
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX graph: {_first_line(exc)}")


def _strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    for init in clone.graph.initializer:
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        entry = init.external_data.add()
        entry.key, entry.value = "location", "stripped"
    return clone


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def ensure_opset(model: onnx.ModelProto, required: int, *, why: str) -> onnx.ModelProto:
    """Return ``model`` at opset >= ``required`` (converting it), or raise UnsupportedModelError."""
    current = default_opset(model)
    if current >= required:
        return model
    log.info("upgrading opset %d -> %d (%s)", current, required, why)
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, required)
    except Exception as exc:  # the converter raises assorted errors for unconvertible ops
        raise UnsupportedModelError(
            f"{why} needs opset {required} but the model is opset {current} and could not be upgraded "
            f"automatically ({_first_line(exc)}); re-export it at opset {required} or newer"
        ) from None
    for src, dst in ((model.metadata_props, converted.metadata_props),):
        if not dst:
            dst.extend(src)
    return converted


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Validate an output path before any work is done: not an input, directory exists and is writable."""
    out = Path(output)
    for inp in inputs:
        if inp is not None and same_file(out, inp):
            raise OutputError(f"output {out} is the same file as the input model; choose another -o path "
                              f"(edgeq never overwrites its input)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output directory does not exist: {parent}")
    if not parent.is_dir():
        raise OutputError(f"output parent {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory is not writable: {parent}")
    if out.is_dir():
        raise OutputError(f"output {out} is a directory; give a file name such as {out / 'model.int8.onnx'}")
    try:  # access() says yes to root on a read-only mount or /proc; creating a file is the real test
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"output directory is not writable: {parent} ({exc.strerror or exc})") from None
    return out


@contextlib.contextmanager
def atomic_path(final: Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``final``'s directory; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".partial{suffix}", dir=final.parent or ".")
    except OSError as exc:
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError):  # disk full, read-only filesystem, quota...
            raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
        raise


@contextlib.contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield ``final``'s name inside a hidden folder next to it; its files (the model and any external ``.data``)
    move into place only if the block succeeds, and the folder is removed on any failure or interrupt. Work that
    can still fail after saving (validation) runs inside the block, so a failed run leaves no output behind."""
    import shutil

    final = Path(final)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent or "."))
    except OSError as exc:
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
    try:
        yield tmpdir / final.name
        try:
            for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == final.name):  # the model last
                os.replace(f, final.parent / f.name)
        except OSError as exc:
            raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_model(model: onnx.ModelProto, output: str | os.PathLike, *, inputs: tuple = ()) -> Path:
    """Write ``model`` to ``output`` atomically, with external data when it exceeds the protobuf limit."""
    out = check_output_path(output, *inputs)
    from edgeq.large_model import has_external

    if has_external(model):  # a lazy model: stream its weights file-to-file
        from edgeq.ir import to_graph
        from edgeq.large_model import save_streaming

        return save_streaming(to_graph(model), model, out)
    size = _approx_size(model)
    try:
        if size < EXTERNAL_DATA_THRESHOLD:
            with atomic_path(out) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(model.SerializeToString())
                    fh.flush()
                    os.fsync(fh.fileno())
        else:
            _save_external(model, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def _approx_size(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else init.ByteSize()
    return total + 1_000_000


def _save_external(model: onnx.ModelProto, out: Path) -> None:
    """Save a >2 GB model as ``out`` + ``out.data`` without ever serialising it as one protobuf."""
    from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

    data_name = out.name + ".data"
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    convert_model_to_external_data(clone, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmpdir:
        clone = write_external_data_tensors(clone, tmpdir)
        with open(Path(tmpdir) / out.name, "wb") as fh:
            fh.write(clone.SerializeToString())
        if (Path(tmpdir) / data_name).exists():
            os.replace(Path(tmpdir) / data_name, out.parent / data_name)
        os.replace(Path(tmpdir) / out.name, out)


def model_size_bytes(path: str | os.PathLike) -> int:
    """File size including external data files referenced by the model."""
    p = Path(path)
    total = p.stat().st_size
    data = p.with_name(p.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total
