"""The calibration stage: run the float model on representative data and observe tensor ranges.

The model is run in ONNX Runtime (CPU) with the observed tensors exposed as extra outputs; each sample's values
update streaming observers and are then dropped, so memory does not grow with the number of samples and samples
of different shapes work. Passes never run models; they receive the resulting :class:`CalibrationStats`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import onnx

from edgeq.calibration.observers import TensorObserver
from edgeq.calibration.stats import CalibrationStats
from edgeq.errors import ModelLoadError
from edgeq.ir import quiet_onnxruntime
from edgeq.model_io import EXTERNAL_DATA_THRESHOLD

Optimization = Literal["none", "basic", "all"]

log = logging.getLogger(__name__)


def observable_tensors(model: onnx.ModelProto) -> list[str]:
    """Graph inputs and every node output in the main graph (dtype filtering happens on the values)."""
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        names.extend(o for o in node.output if o)
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def make_session(model: onnx.ModelProto | str | Path, *, outputs: Iterable[str] = (), threads: int = 0,
                 optimize: Optimization = "basic", providers: list | None = None):
    """An ORT CPU session over ``model`` with extra graph outputs; a path or a lazy model (external weights) is
    opened as a file, so its weights are not copied into a serialised protobuf. ``optimize``: ``"basic"`` to
    observe tensors (no fusion renames them), ``"none"`` to compare every tensor, ``"all"`` to run a model as a
    user's ONNX Runtime does (Q/DQ fused into integer kernels): latency and deployed numerics."""
    extra_wanted = list(outputs)
    if isinstance(model, (str, Path)):
        if not extra_wanted:  # a file: let ONNX Runtime read it (and its external data) directly
            return _session(str(model), threads, optimize, providers)
        from edgeq.large_model import absolutize_external

        path = Path(model)
        model = onnx.load(str(path), load_external_data=False)
        absolutize_external(model, path.parent)
    extra = [o for o in extra_wanted if o not in {x.name for x in model.graph.output}]
    if extra:
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        clone.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
        model = clone
    from edgeq.large_model import has_external, linked_copy, split_external

    if has_external(model):
        with linked_copy(model) as path:
            if path is not None:
                return _session(str(path), threads, optimize, providers, lean=True)
        model, weights = split_external(model)
        return _session(model.SerializeToString(), threads, optimize, providers, weights=weights)
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        return _session(model.SerializeToString(), threads, optimize, providers)
    with tempfile.TemporaryDirectory(prefix="edgeq-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
        return _session(str(path), threads, optimize, providers)


def _session(source, threads: int, optimize: Optimization, providers: list | None, weights: dict | None = None,
             lean: bool = False):
    import onnxruntime as ort

    quiet_onnxruntime()
    so = ort.SessionOptions()
    values = []
    if weights:  # memory-mapped initializers handed to ORT without a copy; kept alive with the session
        names = list(weights)
        values = [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names]
        so.add_external_initializers(names, values)
    if weights or lean:  # large models: no packed second copy of the weights
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 3
    so.graph_optimization_level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimize]
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        so.intra_op_num_threads = threads
    providers = providers or ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(source, so, providers=providers)
        session._edgeq_weights = (weights, values)
        if weights:
            _release_pages(weights.values())
        return session
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"ONNX Runtime cannot load the model: {msg}") from None


def _release_pages(maps) -> None:
    """ONNX Runtime copied the mapped weights into its own buffers: drop our resident pages (still mapped, so they
    are read back from the file if anything touches them again)."""
    import mmap

    for m in maps:
        handle = getattr(m, "_mmap", None)
        if handle is not None and hasattr(handle, "madvise"):
            handle.madvise(mmap.MADV_DONTNEED)


def calibrate(model: onnx.ModelProto, data: Iterable[dict[str, np.ndarray]], *,
              tensors: list[str] | None = None, per_channel: Iterable[str] | dict[str, int] = (),
              progress: Callable[[int, int | None], None] | None = None, total: int | None = None,
              data_fingerprint: str = "") -> CalibrationStats:
    """Observe ``tensors`` (default: all) of ``model`` over ``data``; returns streaming statistics.

    ``per_channel`` names the tensors that also get per-channel statistics, along the last axis, or as a mapping
    from name to channel axis (1 for a Conv's NCHW input)."""
    from edgeq.calibration.segments import run_segmented

    names = tensors if tensors is not None else observable_tensors(model)
    per_channel = dict(per_channel) if isinstance(per_channel, dict) else {n: -1 for n in per_channel}
    observers: dict[str, TensorObserver] = {}

    def observe(_sample: int, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name not in observers:
                observers[name] = TensorObserver(per_channel=name in per_channel, channel_axis=per_channel.get(name, -1))
            if isinstance(value, np.ndarray):
                observers[name].update(value)

    start = time.perf_counter()
    count = run_segmented(model, data, names, observe, progress=progress, total=total)
    log.info("calibrated %d tensors on %d samples in %.1fs", len(observers), count, time.perf_counter() - start)
    overflowed = [n for n, o in observers.items() if math.isinf(o.min) and o.min < 0 or math.isinf(o.max) and o.max > 0]
    if overflowed:
        log.warning("the float model produced inf/nan on the calibration data in %d tensor(s) (first: %s); they stay "
                    "in float. Check the scale of the calibration data.", len(overflowed), overflowed[0])
    return CalibrationStats(tensors=observers, samples=count, model_fingerprint=graph_fingerprint(model),
                            data_fingerprint=data_fingerprint)


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """A hash of the graph's structure (node ops and tensor names), used to check that saved stats fit a model."""
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(node.op_type.encode())
        for t in list(node.input) + list(node.output):
            h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]


def progress_printer(label: str, stream=None) -> Callable[[int, int | None], None]:
    """A minimal progress bar on stderr (only when it is a terminal, or every 10% otherwise)."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    state = {"last": -1}

    def update(done: int, total: int | None) -> None:
        if total:
            pct = int(100 * done / total)
            if tty:
                bar = "#" * (pct // 4)
                stream.write(f"\r{label} [{bar:<25}] {done}/{total}")
                if done == total:
                    stream.write("\n")
                stream.flush()
            elif pct // 10 != state["last"] // 10 or done == total:
                state["last"] = pct
                stream.write(f"{label}: {done}/{total}\n")
        elif tty:
            stream.write(f"\r{label}: {done}")
            stream.flush()

    return update
