"""Run a model on calibration data one segment at a time, so that only one segment's weights are in memory.

A model whose weights live in external files is cut, in node order, into segments of at most ``segment_bytes``
of external weights. Segment 0 runs on the calibration samples as they stream in; each later segment runs on
the tensors that earlier segments produced for it (the *boundary*, kept per sample in memory up to
``store_bytes`` and in a temporary folder beyond that). Each segment is its own ONNX Runtime session over the
original weight files (hard links, never copies) and is closed before the next one opens, so peak memory is one
segment's weights plus the boundary tensors instead of the whole model. Every tensor is computed by the same
kernels from the same inputs as in a whole-model run.

Small models, and models without external weights, run as one session (one segment).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from edgeq.errors import CalibrationDataError

log = logging.getLogger(__name__)

SEGMENT_BYTES = 256 << 20
STORE_BYTES = 256 << 20

Visit = Callable[[int, dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class Segment:
    nodes: tuple[onnx.NodeProto, ...]
    inputs: tuple[str, ...]  # activations read from outside the segment (graph inputs or earlier segments)
    weight_bytes: int


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                used |= _outer_names(g)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor ``node`` reads: its inputs and what its subgraphs (If/Loop/Scan bodies) use from outside."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            names.extend(sorted(_outer_names(g)))
    return names


def _external_bytes(t: onnx.TensorProto) -> int:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return 0
    info = {e.key: e.value for e in t.external_data}
    return int(info.get("length", 0)) or int(np.prod(t.dims)) * 4


def plan_segments(model: onnx.ModelProto, *, segment_bytes: int = SEGMENT_BYTES) -> list[Segment]:
    """Cut the (topologically ordered) node list where the external weights read so far exceed the budget."""
    weights = {t.name: _external_bytes(t) for t in model.graph.initializer}
    inits = set(weights)
    groups: list[list[onnx.NodeProto]] = [[]]
    used: set[str] = set()
    size = 0
    for node in model.graph.node:
        new = {n for n in node_reads(node) if weights.get(n, 0) and n not in used}
        cost = sum(weights[n] for n in new)
        if groups[-1] and size + cost > segment_bytes and cost:
            groups.append([])
            used, size = set(), 0
            new = {n for n in node_reads(node) if weights.get(n, 0)}
            cost = sum(weights[n] for n in new)
        groups[-1].append(node)
        used |= new
        size += cost
    segments = []
    for nodes in groups:
        produced = {o for n in nodes for o in n.output if o}
        ins = []
        for n in nodes:
            ins.extend(x for x in node_reads(n) if x not in produced and x not in inits and x not in ins)
        wb = sum(weights[x] for x in {r for n in nodes for r in node_reads(n)} if x in weights)
        segments.append(Segment(tuple(nodes), tuple(ins), wb))
    return segments


class SampleStore:
    """Boundary tensors per sample: in memory up to a budget, then as .npy files read back memory-mapped."""

    def __init__(self, budget: int | None = None):
        self.budget = STORE_BYTES if budget is None else budget
        self.in_memory = 0
        self.values: dict[tuple[int, str], np.ndarray] = {}
        self.folder: Path | None = None
        self.files = 0

    def put(self, sample: int, name: str, value: np.ndarray) -> None:
        value = np.asarray(value)
        if value.base is not None:  # never a view into a feed's batch array or a runtime's buffer
            value = value.copy()
        if self.in_memory + value.nbytes > self.budget:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="edgeq-segments-"))
            path = self.folder / f"{self.files}.npy"
            self.files += 1
            np.save(path, value)
            self.values[(sample, name)] = np.load(path, mmap_mode="r")
        else:
            self.in_memory += value.nbytes
            self.values[(sample, name)] = value

    def get(self, sample: int, name: str) -> np.ndarray:
        return self.values[(sample, name)]

    def drop(self, names: set[str]) -> None:
        for key in [k for k in self.values if k[1] in names]:
            value = self.values.pop(key)
            if isinstance(value, np.memmap):
                Path(value.filename).unlink(missing_ok=True)  # the mapping stays valid until it is released
            else:
                self.in_memory -= value.nbytes

    def close(self) -> None:
        self.values.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _segment_model(model: onnx.ModelProto, seg: Segment, outputs: list[str],
                   dtypes: dict[str, int]) -> onnx.ModelProto:
    reads = {r for n in seg.nodes for r in node_reads(n)}
    declared = {i.name: i for i in model.graph.input}
    graph = onnx.helper.make_graph(
        list(seg.nodes), f"{model.graph.name}_segment",
        [declared[n] if n in declared else onnx.helper.make_tensor_value_info(n, dtypes[n], None)
         for n in seg.inputs],
        [onnx.ValueInfoProto(name=n) for n in outputs],
        [t for t in model.graph.initializer if t.name in reads],
        value_info=[v for v in model.graph.value_info if v.name in reads])
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def _run_failed(count: int, exc: Exception, what: str) -> CalibrationDataError:
    msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return CalibrationDataError(f"running the model on {what} sample {count} failed: {msg}")


def run_segmented(model: onnx.ModelProto, data: Iterable[dict[str, np.ndarray]], wanted: list[str],
                  visit: Visit, *, segment_bytes: int | None = None, store_bytes: int | None = None,
                  progress: Callable[[int, int | None], None] | None = None, total: int | None = None,
                  what: str = "calibration") -> int:
    """Call ``visit(sample_index, values)`` with the ``wanted`` tensors of every sample; returns the number of
    samples. With several segments ``visit`` is called once per segment and sample, each time with the wanted
    tensors that segment produced (graph inputs come with segment 0)."""
    from edgeq.calibration.calibrate import make_session
    from edgeq.large_model import release_memory

    segments = plan_segments(model, segment_bytes=SEGMENT_BYTES if segment_bytes is None else segment_bytes)
    if len(segments) == 1:
        return _run_whole(model, data, wanted, visit, progress, total, what)
    log.info("running %d segments of at most %.0f MB of weights each", len(segments),
             max(s.weight_bytes for s in segments) / 2**20)
    graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    wanted_set = set(wanted)
    last_read: dict[str, int] = {}
    for k, seg in enumerate(segments):
        for name in seg.inputs:
            last_read[name] = k
    store = SampleStore(STORE_BYTES if store_bytes is None else store_bytes)
    dtypes: dict[str, int] = {}
    count = 0
    try:
        for k, seg in enumerate(segments):
            produced = [o for n in seg.nodes for o in n.output if o]
            keep = [o for o in produced if last_read.get(o, -1) > k]
            outs = list(dict.fromkeys([o for o in produced if o in wanted_set] + keep))
            if not outs and k > 0:
                continue  # nothing of it is wanted or read later (segment 0 still takes in the samples)
            session = make_session(_segment_model(model, seg, outs, dtypes), outputs=outs) if outs else None
            feeds = data if k == 0 else ({n: store.get(i, n) for n in seg.inputs} for i in range(count))
            i = 0
            for feed in feeds:
                if k == 0:
                    for name in graph_inputs:
                        if name in feed and last_read.get(name, -1) > 0:
                            store.put(i, name, feed[name])
                            dtypes[name] = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(feed[name]).dtype)
                    seen = {n: feed[n] for n in graph_inputs if n in wanted_set and n in feed}
                    if seen:
                        visit(i, seen)
                try:
                    # copies: a view of ONNX Runtime's buffers would keep this segment's session alive
                    values = [np.array(v) for v in session.run(outs, {n: feed[n] for n in seg.inputs})] \
                        if session is not None else []
                except Exception as exc:
                    raise _run_failed(i, exc, what) from None
                for name, value in zip(outs, values):
                    if name in keep:
                        store.put(i, name, value)
                        dtypes[name] = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
                visit(i, {n: v for n, v in zip(outs, values) if n in wanted_set})
                del values
                i += 1
                if progress:
                    progress(k * count + i if k else i, total * len(segments) if total else None)
            if k == 0:
                count = i
                if count == 0:
                    raise CalibrationDataError(f"{what} data contains no samples")
            del session
            store.drop({n for n, last in last_read.items() if last <= k})
            release_memory()
            log.debug("segment %d/%d done (%d nodes)", k + 1, len(segments), len(seg.nodes))
    finally:
        store.close()
    return count


def _run_whole(model, data, wanted, visit, progress, total, what) -> int:
    from edgeq.calibration.calibrate import make_session

    session = make_session(model, outputs=wanted)
    names = [o.name for o in session.get_outputs()]
    count = 0
    for feed in data:
        try:
            values = session.run(names, feed)
        except Exception as exc:
            raise _run_failed(count, exc, what) from None
        visit(count, dict(zip(names, values)))
        del values
        count += 1
        if progress:
            progress(count, total)
    if count == 0:
        raise CalibrationDataError(f"{what} data contains no samples")
    return count
