"""Qualcomm QNN HTP backend: sessions, node placement, EP-context compilation and runs on the HTP.

Everything goes through ONNX Runtime's QNN execution provider from the optional ``onnxruntime-qnn`` 2.x package
(``pip install 'edgeq[qnn]'``), a *plugin* EP: its library is registered with
``onnxruntime.register_execution_provider_library`` and selected per session with
``SessionOptions.add_provider_for_devices``. On Linux x86_64 the wheel's HTP backend (``libQnnHtp.so``) runs
as an emulator, so models compile and run with HTP numerics without a Snapdragon device (slowly).

CPU fallback is off by default (``session.disable_cpu_ep_fallback=1``): a model with a node QNN does not take
fails with a :class:`~edgeq.errors.CompileError` naming the nodes and the EP's reasons, instead of silently running
part of the graph on the CPU. :func:`node_placement` answers the same question without failing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeq.backends.qnn_log import capture_native_stderr, parse_rejections
from edgeq.backends.qnn_ops import (  # re-exported for the linter
    HTP_KNOWN_FAILURES,
    HTP_PATTERN_ONLY_OPS,
    HTP_QDQ_CONSTRAINTS,
    HTP_SUPPORTED_CONTRIB_OPS,
    HTP_SUPPORTED_OPS,
    HtpQdqConstraints,
)
from edgeq.backends.qnn_options import PERFORMANCE_MODES, QnnOptions
from edgeq.backends.qnn_placement import (
    QNN_EP,
    NodeAssignment,
    QnnPlacement,
    build_placement,
    offending_nodes_message,
    original_name,
)
from edgeq.backends.qnn_soc import KNOWN_SOCS, SocInfo, resolve_soc
from edgeq.errors import (
    BackendUnavailableError,
    CalibrationDataError,
    CompileError,
    EdgeqError,
    ModelLoadError,
    OutputError,
    require_module,
)

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = [
    "HTP_KNOWN_FAILURES", "HTP_PATTERN_ONLY_OPS", "HTP_QDQ_CONSTRAINTS", "HTP_SUPPORTED_CONTRIB_OPS",
    "HTP_SUPPORTED_OPS", "KNOWN_SOCS", "PERFORMANCE_MODES", "HtpQdqConstraints", "NodeAssignment", "OutputFile",
    "QnnCompileResult", "QnnOptions", "QnnPlacement", "SocInfo", "compile_context", "create_session",
    "load_context_model", "make_runner", "node_placement", "qnn_available", "resolve_soc", "run_on_qnn",
]  # fmt: skip

_LOG = logging.getLogger(__name__)
_REGISTER_LOCK = threading.Lock()

# ORT's messages for the two ways a partition fails when CPU fallback is off.
_FALLBACK_DISABLED = "fallback to CPU EP has been explicitly disabled"
_NHWC_REJECTED = re.compile(r"Node '(?P<name>[^']+)' OpType:(?P<op>\w+) with domain:\S+ was inserted using the NHWC")
_LOAD_ERRORS = ("NoSuchFile", "InvalidProtobuf", "InvalidGraph")


# --------------------------------------------------------------------------------------------------- availability
def qnn_available() -> bool:
    """Whether onnxruntime-qnn (a plugin-EP 2.x build with its HTP backend library) and a plugin-capable
    onnxruntime are importable. Does not load the EP."""
    try:
        qnn = _import_qnn()
    except BackendUnavailableError:
        return False
    return os.path.exists(qnn.get_qnn_htp_path())


def _import_qnn():
    qnn = require_module("onnxruntime_qnn", "qnn", "The QNN HTP backend")
    ort = require_module("onnxruntime", "qnn", "The QNN HTP backend")
    plugin_api = hasattr(ort, "register_execution_provider_library") and hasattr(
        ort.InferenceSession, "get_provider_graph_assignment_info"
    )
    if not hasattr(qnn, "get_library_path") or not plugin_api:
        raise BackendUnavailableError(
            "The QNN HTP backend needs onnxruntime-qnn >= 2.0 (a plugin execution provider) and an onnxruntime "
            f"with the plugin-EP and EP-assignment APIs; found onnxruntime {ort.__version__}, onnxruntime-qnn "
            f"{getattr(qnn, '__version__', '?')}. Upgrade with: pip install -U 'edgeq[qnn]'"
        )
    return qnn


def _qnn_devices(ort) -> list:
    """The QNN EP's devices, registering its library with ONNX Runtime the first time."""
    qnn = _import_qnn()
    with _REGISTER_LOCK:
        devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
        if not devices:
            try:
                ort.register_execution_provider_library(QNN_EP, qnn.get_library_path())
            except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail type
                raise BackendUnavailableError(
                    f"cannot load the QNN EP library {qnn.get_library_path()}: {exc}"
                ) from None
            devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        raise BackendUnavailableError("the QNN EP library loaded but offers no device to run on")
    npus = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.NPU]
    return npus or devices  # on x86_64 the HTP emulator shows up as a CPU-type device


# -------------------------------------------------------------------------------------------------- model checks
def _check_model_path(model_path: str | os.PathLike) -> Path:
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    return path


def _load_proto(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf/IO errors of many kinds
        raise ModelLoadError(f"cannot read {path} as ONNX: {exc}") from None


def _model_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(node.name, node.op_type) for node in model.graph.node]


def _ep_context_nodes(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type == "EPContext" and n.domain == "com.microsoft"]


def _check_static_shapes(model: onnx.ModelProto, path: Path) -> None:
    initializers = {init.name for init in model.graph.initializer}
    dynamic = []
    for value in model.graph.input:
        tensor = value.type.tensor_type
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = [d.dim_param or (str(d.dim_value) if d.dim_value > 0 else "?") for d in tensor.shape.dim]
        if not tensor.HasField("shape"):
            dynamic.append(f"{value.name} (unknown rank)")
        elif not all(d.isdigit() for d in dims):
            dynamic.append(f"{value.name} [{', '.join(dims)}]")
    if dynamic:
        raise CompileError(
            f"{path}: QNN HTP needs static input shapes; dynamic: {'; '.join(dynamic)}. Fix them first, e.g. "
            "python -m onnxruntime.tools.make_dynamic_shape_fixed --dim_param N --dim_value 1 in.onnx out.onnx"
        )


# ------------------------------------------------------------------------------------------------------- sessions
def _session_options(
    options: QnnOptions, *, allow_fallback: bool, verbose: bool = False, config: Mapping[str, str] | None = None
):
    import onnxruntime as ort

    devices = _qnn_devices(ort)
    session_options = ort.SessionOptions()
    # Failures reach the caller as exceptions (with nodes named), so ORT's own error lines are kept quiet.
    session_options.log_severity_level = 0 if verbose else (1 if _LOG.isEnabledFor(logging.DEBUG) else 4)
    session_options.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if allow_fallback else "1")
    session_options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for key, value in (config or {}).items():
        session_options.add_session_config_entry(key, value)
    session_options.add_provider_for_devices(devices, options.provider_options())
    return session_options


def _assignments(session) -> tuple[list[tuple[str, str, str]], int]:
    subgraphs = session.get_provider_graph_assignment_info()
    assigned = [(node.name, node.op_type, sub.ep_name) for sub in subgraphs for node in sub.get_nodes()]
    return assigned, sum(1 for sub in subgraphs if sub.ep_name == QNN_EP)


def _open_session(path: Path, session_options, options: QnnOptions, model: onnx.ModelProto):
    """``InferenceSession`` with ORT's failures turned into edgeq errors that name the offending nodes."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=session_options)
    except Exception as exc:  # noqa: BLE001 - ORT's pybind exception types are not importable by name
        raise _translate_failure(exc, path, options, model) from None


def _translate_failure(exc: Exception, path: Path, options: QnnOptions, model: onnx.ModelProto) -> EdgeqError:
    message = str(exc)
    if type(exc).__name__ in _LOAD_ERRORS:
        return ModelLoadError(f"ONNX Runtime cannot load {path}: {message}")
    if _FALLBACK_DISABLED in message:
        placement = node_placement(path, options=options)
        return CompileError(
            f"{path}: {len(placement.not_on_qnn)} node(s) cannot run on {options.describe()} and CPU fallback is "
            f"disabled:\n{offending_nodes_message(placement)}\n"
            "Replace or remove these ops (see edgeq.backends.qnn.HTP_SUPPORTED_OPS / HTP_QDQ_CONSTRAINTS), "
            "or allow CPU fallback."
        )
    if (match := _NHWC_REJECTED.search(message)) is not None:
        node = original_name(match["name"], dict(_model_nodes(model))) or match["name"]
        return CompileError(
            f"{path}: QNN claimed {match['op']} node {node!r} for its NHWC layout and then rejected it, typically "
            "because of its quantization (per-channel weights need zero points of 0; weights must be 8-bit). "
            f"ONNX Runtime said: {message}"
        )
    hint = ""
    if "MEM_ALLOC" in message and options.target is None and options.vtcm_mb is None:
        hint = (" Without a SoC, HTP arch or vtcm_mb the x86_64 HTP emulator has no VTCM and fails ops that need"
                " it; set one (e.g. --soc SM8650).")  # fmt: skip
    return CompileError(f"{path}: {options.describe()} could not compile the model: {message}{hint}")


def create_session(model_path: str | os.PathLike, *, options: QnnOptions | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session that runs ``model_path`` (a QDQ or EP-context model) on the QNN HTP.

    With ``options.disable_cpu_fallback`` (the default) a model with any node QNN does not take raises a
    :class:`CompileError` listing those nodes and why QNN refused them.
    """
    path = _check_model_path(model_path)
    return _create_session(path, _load_proto(path), options or QnnOptions())


def _create_session(path: Path, model: onnx.ModelProto, options: QnnOptions) -> onnxruntime.InferenceSession:
    _check_static_shapes(model, path)
    session_options = _session_options(options, allow_fallback=not options.disable_cpu_fallback)
    session = _open_session(path, session_options, options, model)
    if not options.disable_cpu_fallback:
        placement = build_placement(path, _model_nodes(model), *_assignments(session))
        if not placement.fully_on_qnn:
            _LOG.warning("%s: %d node(s) run on the CPU, not QNN:\n%s", path, len(placement.not_on_qnn),
                         offending_nodes_message(placement))  # fmt: skip
    return session


def node_placement(
    model_path: str | os.PathLike, *, options: QnnOptions | None = None, with_reasons: bool = True
) -> QnnPlacement:
    """Which nodes of ``model_path`` the QNN EP takes and which it leaves to the CPU (and why).

    Creates a session with CPU fallback allowed and reads ORT's recorded EP assignment; with ``with_reasons``
    the session logs verbosely and the QNN EP's per-node rejection reasons are parsed from that log.
    """
    options = options or QnnOptions()
    path = _check_model_path(model_path)
    model = _load_proto(path)
    _check_static_shapes(model, path)
    session_options = _session_options(options, allow_fallback=True, verbose=with_reasons)
    capture = capture_native_stderr() if with_reasons else contextlib.nullcontext([])
    with capture as log:
        session = _open_session(path, session_options, options, model)
    assigned, partitions = _assignments(session)
    rejections = parse_rejections("".join(log)) if with_reasons else {}
    return build_placement(path, _model_nodes(model), assigned, partitions, rejections)


# ------------------------------------------------------------------------------------------------ EP-context models
@dataclass(frozen=True)
class OutputFile:
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class QnnCompileResult:
    """What :func:`compile_context` wrote and what it put on the HTP."""

    output_path: Path
    #: The EP-context model and, unless embedded, the context binary next to it.
    files: tuple[OutputFile, ...]
    placement: QnnPlacement
    target: str
    embed_context_binary: bool
    #: EPContext nodes in the output (one per QNN partition).
    context_graphs: int
    qnn_sdk_version: str
    wall_time_s: float

    @property
    def nodes_on_qnn(self) -> tuple[NodeAssignment, ...]:
        return self.placement.on_qnn

    @property
    def op_types(self) -> dict[str, int]:
        """Op type → number of the model's nodes of that type compiled into the context binary."""
        return dict(sorted(Counter(node.op_type for node in self.nodes_on_qnn).items()))

    @property
    def total_size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_dict(self) -> dict:
        return {
            "output": str(self.output_path),
            "files": [{"path": str(f.path), "size_bytes": f.size_bytes} for f in self.files],
            "target": self.target,
            "embed_context_binary": self.embed_context_binary,
            "context_graphs": self.context_graphs,
            "qnn_sdk_version": self.qnn_sdk_version,
            "wall_time_s": round(self.wall_time_s, 3),
            "nodes_on_qnn": len(self.nodes_on_qnn),
            "op_types": self.op_types,
            "placement": self.placement.to_dict(),
        }


def compile_context(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    options: QnnOptions | None = None,
    embed_context_binary: bool = False,
) -> QnnCompileResult:
    """Compile a QDQ model into an EP-context model (``ep.context_enable=1``) for the options' SoC.

    ORT writes into a staging folder inside the output's directory; the context binary (``<stem>_qnn.bin``,
    referenced by a relative name, unless ``embed_context_binary``) and then the model are moved into place with
    ``os.replace``, so a failure leaves neither a partial output nor ORT's side files behind.
    """
    import onnx

    options = options or QnnOptions()
    source = _check_model_path(model_path)
    output = Path(output_path)
    if output.suffix != ".onnx":
        raise OutputError(f"the EP-context output must be an .onnx file, not {output}")
    if output.exists() and output.resolve() == source.resolve():
        raise OutputError(f"the output {output} would overwrite the input model; choose another path")
    model = _load_proto(source)
    if _ep_context_nodes(model):
        raise CompileError(f"{source} is already an EP-context model; compile the QDQ model instead")
    _check_static_shapes(model, source)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.stem}.", suffix=".edgeq-tmp", dir=output.parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {output.parent}: {exc}") from None

    started = time.perf_counter()
    moved: list[Path] = []
    try:
        staged = staging / output.name
        config = {
            "ep.context_enable": "1",
            "ep.context_file_path": str(staged),
            "ep.context_embed_mode": "1" if embed_context_binary else "0",
        }
        session_options = _session_options(options, allow_fallback=not options.disable_cpu_fallback, config=config)
        session = _open_session(source, session_options, options, model)
        placement = build_placement(source, _model_nodes(model), *_assignments(session))
        del session
        if not staged.is_file():
            raise CompileError(f"{source}: ONNX Runtime wrote no EP-context model (no node was assigned to QNN?)")
        context_nodes = _ep_context_nodes(onnx.load(str(staged)))
        sdk = next((onnx.helper.get_attribute_value(a) for n in context_nodes for a in n.attribute
                    if a.name == "ep_sdk_version"), b"")  # fmt: skip
        for side_file in sorted(p for p in staging.iterdir() if p != staged):
            os.replace(side_file, output.parent / side_file.name)
            moved.append(output.parent / side_file.name)
        os.replace(staged, output)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    files = tuple(OutputFile(p, p.stat().st_size) for p in [output, *moved])
    result = QnnCompileResult(
        output_path=output,
        files=files,
        placement=placement,
        target=options.describe(),
        embed_context_binary=embed_context_binary,
        context_graphs=len(context_nodes),
        qnn_sdk_version=sdk.decode() if isinstance(sdk, bytes) else str(sdk),
        wall_time_s=time.perf_counter() - started,
    )
    _LOG.info(
        "compiled %s -> %s (%d nodes on QNN, %.1f s)", source, output, len(result.nodes_on_qnn), result.wall_time_s
    )
    return result


def load_context_model(
    model_path: str | os.PathLike, *, options: QnnOptions | None = None
) -> onnxruntime.InferenceSession:
    """A QNN session for an EP-context model written by :func:`compile_context` (checks its binary is there)."""
    path = _check_model_path(model_path)
    model = _load_proto(path)
    _check_context_binaries(path, model)
    return _create_session(path, model, options or QnnOptions())


def _check_context_binaries(path: Path, model: onnx.ModelProto) -> None:
    import onnx

    context_nodes = _ep_context_nodes(model)
    if not context_nodes:
        raise ModelLoadError(f"{path} is not an EP-context model (no com.microsoft EPContext node); run compile first")
    for node in context_nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # Only the main EPContext node of a context names the binary; the others refer to it by graph name.
        if attributes.get("embed_mode", 1) == 0 and "ep_cache_context" in attributes:
            binary = path.parent / attributes["ep_cache_context"].decode()
            if not binary.is_file():
                raise ModelLoadError(f"{path} refers to the context binary {binary}, which is missing")


# ------------------------------------------------------------------------------------------------------------ runs
_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_,
}  # fmt: skip


def _check_feed(feed: Mapping[str, np.ndarray], inputs: dict, index: int) -> dict[str, np.ndarray]:
    missing, unknown = set(inputs) - set(feed), set(feed) - set(inputs)
    if missing or unknown:
        raise CalibrationDataError(
            f"sample {index}: inputs do not match the model (missing: {sorted(missing) or 'none'}, "
            f"unknown: {sorted(unknown) or 'none'}; the model takes {sorted(inputs)})"
        )
    checked = {}
    for name, value in feed.items():
        spec, array = inputs[name], np.asarray(value)
        dtype = _NUMPY_TYPES.get(spec.type)
        if dtype is not None and array.dtype != dtype:
            if np.dtype(dtype).kind != array.dtype.kind:
                raise CalibrationDataError(
                    f"sample {index}: input {name!r} is {array.dtype}, the model takes {spec.type}"
                )
            array = array.astype(dtype)
        if list(array.shape) != list(spec.shape):
            raise CalibrationDataError(
                f"sample {index}: input {name!r} has shape {list(array.shape)}, the model takes {list(spec.shape)}"
            )
        checked[name] = array
    return checked


def make_runner(model_path: str | os.PathLike, *, options: QnnOptions | None = None):
    """``run(feed) -> [outputs]`` on the QNN HTP for a QDQ or EP-context model, as ``edgeq validate`` uses it.

    The callable has ``output_names`` (the model's output order) and ``session``; compile errors are raised
    here, before any sample runs.
    """
    path = _check_model_path(model_path)
    model = _load_proto(path)
    if _ep_context_nodes(model):
        _check_context_binaries(path, model)
    session = _create_session(path, model, options or QnnOptions())
    inputs = {spec.name: spec for spec in session.get_inputs()}
    names = [spec.name for spec in session.get_outputs()]
    calls = itertools.count()

    def run(feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(names, _check_feed(feed, inputs, next(calls)))

    run.output_names = names  # type: ignore[attr-defined]
    run.session = session  # type: ignore[attr-defined]
    run.emulated = is_emulated()  # type: ignore[attr-defined]
    return run


def is_emulated() -> bool:
    """True where the HTP is the x86_64 emulator (no NPU device): its timings say nothing about a device."""
    import onnxruntime as ort

    return all(d.device.type != ort.OrtHardwareDeviceType.NPU for d in _qnn_devices(ort))


def run_on_qnn(
    model_path: str | os.PathLike, feeds: Iterable[Mapping[str, np.ndarray]], *, options: QnnOptions | None = None
) -> Iterator[list[np.ndarray]]:
    """Run a QDQ or EP-context model on the QNN HTP, one output list per feed dict (in the model's output order).

    The session is created (and compile errors raised) before this returns; the feeds are consumed lazily.
    """
    run = make_runner(model_path, options=options)
    return (run(feed) for feed in feeds)
