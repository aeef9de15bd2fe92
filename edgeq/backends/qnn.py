"""Qualcomm QNN HTP backend: sessions, node placement, EP-context compilation and runs on the HTP.

Everything goes through ONNX Runtime's QNN execution provider from the optional ``onnxruntime-qnn`` 2.x package
(``pip install 'edgeq[qnn]'``), a *plugin* EP: its library is registered with
``onnxruntime.register_execution_provider_library`` and selected per session with
``SessionOptions.add_provider_for_devices``. On Linux x86_64 the wheel's HTP backend (``libQnnHtp.so``) is an
emulator, so models compile and run bit-faithfully without a Snapdragon device, just slowly.

CPU fallback is off by default (``session.disable_cpu_ep_fallback=1``): a model with a node QNN does not take
fails with a :class:`~edgeq.errors.CompileError` naming the nodes and the EP's reasons, instead of silently running
part of the graph on the CPU. :func:`node_placement` answers the same question without failing.
"""

from __future__ import annotations

import contextlib
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
from typing import TYPE_CHECKING, Literal

import numpy as np

from edgeq.backends.qnn_log import capture_native_stderr, parse_rejections
from edgeq.backends.qnn_ops import (  # noqa: F401  (re-exported for the linter)
    HTP_KNOWN_FAILURES,
    HTP_PATTERN_ONLY_OPS,
    HTP_QDQ_CONSTRAINTS,
    HTP_SUPPORTED_CONTRIB_OPS,
    HTP_SUPPORTED_OPS,
    HtpQdqConstraints,
)
from edgeq.backends.qnn_placement import (
    QNN_EP,
    NodeAssignment,
    QnnPlacement,
    build_placement,
    offending_nodes_message,
    original_name,
)
from edgeq.backends.qnn_soc import KNOWN_SOCS, SocTarget, lookup_soc, parse_htp_arch, resolve_soc
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
    "HTP_SUPPORTED_OPS", "KNOWN_SOCS", "NodeAssignment", "OutputFile", "QnnCompileResult", "QnnOptions",
    "QnnPlacement", "compile_context", "create_session", "load_context_model", "node_placement", "qnn_available",
    "resolve_soc", "run_on_qnn",
]  # fmt: skip

_LOG = logging.getLogger(__name__)
_REGISTER_LOCK = threading.Lock()

PERFORMANCE_MODES = (
    "default", "burst", "balanced", "high_performance", "sustained_high_performance", "high_power_saver",
    "power_saver", "low_power_saver", "low_balanced", "extreme_power_saver",
)  # fmt: skip

# ORT's messages for the two ways a partition fails when CPU fallback is off.
_FALLBACK_DISABLED = "fallback to CPU EP has been explicitly disabled"
_NHWC_REJECTED = re.compile(r"Node '(?P<name>[^']+)' OpType:(?P<op>\w+) with domain:\S+ was inserted using the NHWC")
_LOAD_ERRORS = ("NoSuchFile", "InvalidProtobuf", "InvalidGraph", "ModelLoaded")


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
    if not hasattr(qnn, "get_library_path") or not hasattr(ort, "register_execution_provider_library"):
        raise BackendUnavailableError(
            "The QNN HTP backend needs onnxruntime-qnn >= 2.0 (a plugin execution provider) and onnxruntime >= "
            f"1.23; found onnxruntime {ort.__version__}. Install it with: pip install -U 'edgeq[qnn]'"
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
                raise BackendUnavailableError(f"cannot load the QNN EP library {qnn.get_library_path()}: {exc}") from None
            devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        raise BackendUnavailableError("the QNN EP library loaded but offers no device to run on")
    npus = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.NPU]
    return npus or devices  # on x86_64 the HTP emulator shows up as a CPU-type device


# -------------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True, kw_only=True)
class QnnOptions:
    """QNN EP settings. Build from a ``--soc`` value with :meth:`for_soc`; see :mod:`edgeq.backends.qnn_soc`.

    ``soc_model`` is a chip name or QNN SoC ID from :data:`KNOWN_SOCS` (normalised to the chip name) and implies
    ``htp_arch``; ``htp_arch`` alone (``"v73"`` or ``"73"``, normalised to ``"v73"``) targets an HTP generation.
    Neither set: the EP compiles for whatever device it finds (on x86_64, the emulator's default).
    """

    soc_model: str | None = None
    htp_arch: str | None = None
    backend: Literal["htp"] = "htp"
    #: Fail instead of running nodes QNN does not take on the CPU (also makes QNN quantize graph inputs itself).
    disable_cpu_fallback: bool = True
    htp_performance_mode: str = "default"
    #: Let the HTP run float32 ops (if any remain) in fp16; QDQ groups are unaffected.
    enable_htp_fp16_precision: bool = True
    #: 0 = EP default, 1 = fastest preparation, 3 = slowest preparation and best graph.
    graph_optimization_mode: int = 0
    vtcm_mb: int | None = None
    #: Run the graph inputs' QuantizeLinear and outputs' DequantizeLinear on the CPU (the EP's default is on;
    #: edgeq turns it off so that the whole QDQ graph, I/O conversion included, is what the HTP runs).
    offload_graph_io_quantization: bool = False

    def __post_init__(self) -> None:
        if self.backend != "htp":
            raise EdgeqError(f"unsupported QNN backend {self.backend!r}; edgeq targets the HTP only (backend='htp')")
        arch = parse_htp_arch(self.htp_arch) if self.htp_arch is not None else None
        if self.soc_model is not None:
            soc = lookup_soc(self.soc_model)
            if arch is not None and arch != soc.htp_arch:
                raise EdgeqError(
                    f"soc_model {soc.name} ({soc.device}) has HTP v{soc.htp_arch}, not v{arch}; drop htp_arch or fix it"
                )
            object.__setattr__(self, "soc_model", soc.name)
            arch = soc.htp_arch
        if arch is not None:
            object.__setattr__(self, "htp_arch", f"v{arch}")
        if self.htp_performance_mode not in PERFORMANCE_MODES:
            raise EdgeqError(
                f"unknown htp_performance_mode {self.htp_performance_mode!r}; valid: {', '.join(PERFORMANCE_MODES)}"
            )
        if self.graph_optimization_mode not in (0, 1, 2, 3):
            raise EdgeqError(f"graph_optimization_mode must be 0, 1, 2 or 3, not {self.graph_optimization_mode!r}")
        if self.vtcm_mb is not None and self.vtcm_mb <= 0:
            raise EdgeqError(f"vtcm_mb must be a positive number of MB, not {self.vtcm_mb!r}")

    @classmethod
    def for_soc(cls, soc: str | None, **options) -> QnnOptions:
        """Options for a user's ``--soc`` value (chip name like ``SM8650`` or ``v75``; ``None``: no target)."""
        if soc is None:
            return cls(**options)
        target = resolve_soc(soc)
        if target.soc is not None:
            return cls(soc_model=target.soc.name, **options)
        return cls(htp_arch=f"v{target.htp_arch}", **options)

    @property
    def target(self) -> SocTarget | None:
        if self.soc_model is not None:
            soc = KNOWN_SOCS[self.soc_model]
            return SocTarget(soc=soc, htp_arch=soc.htp_arch)
        return SocTarget(soc=None, htp_arch=parse_htp_arch(self.htp_arch)) if self.htp_arch else None

    def provider_options(self) -> dict[str, str]:
        """The QNN EP provider options (string key/values) these settings map to."""
        options = {
            "backend_type": self.backend,
            "htp_performance_mode": self.htp_performance_mode,
            "offload_graph_io_quantization": "1" if self.offload_graph_io_quantization else "0",
        }
        if self.soc_model is not None:
            options["soc_model"] = str(KNOWN_SOCS[self.soc_model].soc_model)
        # The EP refuses an explicit "1" without a soc_model, although "1" is its default.
        if not self.enable_htp_fp16_precision or self.soc_model is not None:
            options["enable_htp_fp16_precision"] = "1" if self.enable_htp_fp16_precision else "0"
        if self.htp_arch is not None:
            options["htp_arch"] = self.htp_arch.removeprefix("v")
        if self.graph_optimization_mode:
            options["htp_graph_finalization_optimization_mode"] = str(self.graph_optimization_mode)
        if self.vtcm_mb is not None:
            options["vtcm_mb"] = str(self.vtcm_mb)
        return options

    def describe(self) -> str:
        target = self.target
        return f"QNN HTP ({target.label})" if target else "QNN HTP (no SoC set)"


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
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        dims = [d.dim_param or (str(d.dim_value) if d.dim_value > 0 else "?") for d in shape.dim]
        if not value.type.tensor_type.HasField("shape") or any(not d.isdigit() for d in dims):
            dynamic.append(f"{value.name} [{', '.join(dims) if value.type.tensor_type.HasField('shape') else '?'}]")
    if dynamic:
        raise CompileError(
            f"{path}: QNN HTP needs static input shapes; dynamic: {'; '.join(dynamic)}. Fix them first, e.g. "
            "python -m onnxruntime.tools.make_dynamic_shape_fixed --dim_param N --dim_value 1 in.onnx out.onnx"
        )


# ------------------------------------------------------------------------------------------------------- sessions
def _session_options(options: QnnOptions, *, allow_fallback: bool, verbose: bool = False, config: Mapping[str, str] = {}):  # noqa: B006 - read only
    import onnxruntime as ort

    devices = _qnn_devices(ort)
    session_options = ort.SessionOptions()
    # Failures reach the caller as exceptions (with nodes named), so ORT's own error lines are kept quiet.
    session_options.log_severity_level = 0 if verbose else (1 if _LOG.isEnabledFor(logging.DEBUG) else 4)
    session_options.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if allow_fallback else "1")
    session_options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for key, value in config.items():
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
    return CompileError(f"{path}: {options.describe()} could not compile the model: {message}")


def create_session(model_path: str | os.PathLike, *, options: QnnOptions | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session that runs ``model_path`` (a QDQ or EP-context model) on the QNN HTP.

    With ``options.disable_cpu_fallback`` (the default) a model with any node QNN does not take raises a
    :class:`CompileError` listing those nodes and why QNN refused them.
    """
    options = options or QnnOptions()
    path = _check_model_path(model_path)
    model = _load_proto(path)
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
    _LOG.info("compiled %s -> %s (%d nodes on QNN, %.1f s)", source, output, len(result.nodes_on_qnn), result.wall_time_s)
    return result


def load_context_model(model_path: str | os.PathLike, *, options: QnnOptions | None = None) -> onnxruntime.InferenceSession:
    """A QNN session for an EP-context model written by :func:`compile_context` (checks its binary is there)."""
    import onnx

    path = _check_model_path(model_path)
    context_nodes = _ep_context_nodes(_load_proto(path))
    if not context_nodes:
        raise ModelLoadError(f"{path} is not an EP-context model (no com.microsoft EPContext node); run compile first")
    for node in context_nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("embed_mode", 1) == 0:
            binary = path.parent / attributes["ep_cache_context"].decode()
            if not binary.is_file():
                raise ModelLoadError(f"{path} refers to the context binary {binary}, which is missing")
    return create_session(path, options=options)


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
                raise CalibrationDataError(f"sample {index}: input {name!r} is {array.dtype}, the model takes {spec.type}")
            array = array.astype(dtype)
        if list(array.shape) != list(spec.shape):
            raise CalibrationDataError(
                f"sample {index}: input {name!r} has shape {list(array.shape)}, the model takes {list(spec.shape)}"
            )
        checked[name] = array
    return checked


def run_on_qnn(
    model_path: str | os.PathLike, feeds: Iterable[Mapping[str, np.ndarray]], *, options: QnnOptions | None = None
) -> Iterator[list[np.ndarray]]:
    """Run a QDQ or EP-context model on the QNN HTP, one output list per feed dict (in the model's output order).

    The session is created (and compile errors raised) before this returns; the feeds are consumed lazily.
    """
    path = _check_model_path(model_path)
    if _ep_context_nodes(_load_proto(path)):
        session = load_context_model(path, options=options)
    else:
        session = create_session(path, options=options)
    inputs = {spec.name: spec for spec in session.get_inputs()}

    def outputs() -> Iterator[list[np.ndarray]]:
        for index, feed in enumerate(feeds):
            yield session.run(None, _check_feed(feed, inputs, index))
            _LOG.debug("QNN sample %d done", index)

    return outputs()
