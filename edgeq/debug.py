"""Layer-wise quantization debugging (``edgeq debug``): where does the error come from?

Runs the FP32 reference and the quantized candidate on a few samples with every interesting tensor exposed as an
output, and compares each candidate tensor with the reference tensor of the same name:

* every quantized activation: the ``DequantizeLinear`` output ``<t>/dequantized`` against ``t`` (graph outputs that
  insert_qdq renamed ``<name>/float`` are matched back to ``<name>``);
* the output of every compute node (Conv, MatMul, Gemm, ...) whose tensor exists in both models.

Each row gets an SQNR (dB, over all samples), a mean cosine and a *drop*: how many dB of SQNR the row loses against
what it reads (for a quantized tensor, the unquantized tensor; for a layer, its worst input as the candidate reads
it). A drop from 100 dB to 50 dB matters less than one from 30 dB to 20 dB, so rows are ranked by the noise power
they add relative to the signal (``added_noise``, the difference of noise-to-signal ratios); the top row is named
as the place where the error jumps. ``rows`` keep the candidate's topological order.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from edgeq.errors import BackendUnavailableError, EdgeqError

log = logging.getLogger(__name__)

LAYER_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "LayerNormalization", "Softmax",
                       "Attention", "LSTM", "GRU"})


CEILING_DB = 100.0
CLAMPS = frozenset({"Relu", "Clip"})


class ErrorAccumulator:
    """Streaming SQNR / cosine / max-abs error between reference and candidate values of one tensor."""

    __slots__ = ("signal", "noise", "cos_sum", "samples", "max_abs", "shape_mismatch")

    def __init__(self):
        self.signal = self.noise = self.cos_sum = self.max_abs = 0.0
        self.samples = 0
        self.shape_mismatch = False

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref, cand = np.asarray(ref), np.asarray(cand)
        if ref.shape != cand.shape or ref.dtype.kind != "f":
            self.shape_mismatch = ref.shape != cand.shape
            return
        r = np.nan_to_num(ref.astype(np.float64).ravel())
        c = np.nan_to_num(cand.astype(np.float64).ravel())
        e = r - c
        self.signal += float(r @ r)
        self.noise += float(e @ e)
        nr, nc = math.sqrt(float(r @ r)), math.sqrt(float(c @ c))
        self.cos_sum += 1.0 if nr == nc == 0 else (float(r @ c) / (nr * nc) if nr > 0 and nc > 0 else 0.0)
        self.max_abs = max(self.max_abs, float(np.abs(e).max()) if e.size else 0.0)
        self.samples += 1

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.samples if self.samples else math.nan


CLAMPED = "#clamped"  # a pair key ending in this compares both tensors after the clamp in ``clamps``


def compare_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Iterable[dict],
                    pairs: dict[str, str], clamps: dict[str, tuple[float, float]] | None = None
                    ) -> dict[str, ErrorAccumulator]:
    """Error of each candidate tensor (key) against its reference tensor (value) over ``feeds``. A key
    ``name + CLAMPED`` with bounds in ``clamps`` compares ``clip(name)`` with ``clip(reference)``."""
    from edgeq.calibration.calibrate import make_session

    clamps = clamps or {}
    ref_names = sorted(set(pairs.values()))
    cand_names = sorted({k.removesuffix(CLAMPED) for k in pairs})
    ref_s = make_session(reference, outputs=ref_names, optimize="none")
    cand_s = make_session(candidate, outputs=cand_names, optimize="none")
    acc = {name: ErrorAccumulator() for name in pairs}
    for feed in feeds:
        ref = dict(zip(ref_names, ref_s.run(ref_names, feed)))
        cand = dict(zip(cand_names, cand_s.run(cand_names, feed)))
        for key in pairs:
            r, c = ref[pairs[key]], cand[key.removesuffix(CLAMPED)]
            if key in clamps:
                lo, hi = clamps[key]
                r, c = np.clip(r, lo, hi), np.clip(c, lo, hi)
            acc[key].update(r, c)
    return acc


@dataclass
class LayerRow:
    tensor: str
    reference_tensor: str
    kind: str  # "quantized" (a DequantizeLinear output) or "layer" (a compute node's output)
    node: str  # the compute node (kind layer) or the consumers of the quantized tensor
    op: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    drop_db: float | None = None
    added_noise: float | None = None  # noise-to-signal power ratio added here (NSR out - worst NSR in)
    inputs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) and v != math.inf else v)
                for k, v in self.__dict__.items()}


@dataclass
class DebugResult:
    rows: list[LayerRow]
    samples: int
    reference: str
    candidate: str

    @property
    def first_jump(self) -> LayerRow | None:
        """The row that adds the most noise relative to its signal (the largest SQNR drop that matters)."""
        ranked = self.ranked()
        return ranked[0] if ranked and ranked[0].added_noise is not None else None

    def ranked(self) -> list[LayerRow]:
        """Rows by added noise (largest first), then by SQNR (worst first)."""
        return sorted(self.rows, key=lambda r: (-(r.added_noise if r.added_noise is not None else -math.inf),
                                                r.sqnr_db))

    def table(self, top: int = 20) -> str:
        lines = [f"{'rank':>4}  {'kind':<9} {'op':<18} {'SQNR dB':>8} {'drop dB':>8} {'added':>8} {'cosine':>8}  "
                 f"tensor / layer"]
        for i, r in enumerate(self.ranked()[:top], 1):
            drop = f"{r.drop_db:8.1f}" if r.drop_db is not None else f"{'-':>8}"
            added = f"{100 * r.added_noise:7.3f}%" if r.added_noise is not None else f"{'-':>8}"
            lines.append(f"{i:>4}  {r.kind:<9} {r.op[:18]:<18} {_fmt_db(r.sqnr_db)} {drop} {added} {r.cosine:8.5f}  "
                         f"{r.tensor}" + (f"  ({r.node})" if r.node and r.kind == "layer" else ""))
        jump = self.first_jump
        lines.append(f"{len(self.rows)} tensors compared over {self.samples} samples"
                     + (f"; the error jumps at {jump.op} {jump.tensor}"
                        f"{' (' + jump.node + ')' if jump.kind == 'layer' else ''}: {jump.drop_db:.1f} dB lost "
                        f"against its inputs" if jump else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        jump = self.first_jump
        return {"reference": self.reference, "candidate": self.candidate, "samples": self.samples,
                "first_jump": jump.as_dict() if jump else None, "rows": [r.as_dict() for r in self.rows]}


def noise_to_signal(sqnr_db: float) -> float:
    """Noise-to-signal power ratio of an SQNR in dB (capped at CEILING_DB; NaN counts as all noise)."""
    return 10 ** (-min(sqnr_db, CEILING_DB) / 10) if not math.isnan(sqnr_db) else 1.0


def _fmt_db(v: float) -> str:
    return f"{v:8.1f}" if math.isfinite(v) else f"{'inf' if v > 0 else '-inf':>8}"


def debug(reference: str | Path | onnx.ModelProto, candidate: str | Path | onnx.ModelProto, *, data: Any,
          max_samples: int = 8, json_out: str | Path | None = None, plot: str | Path | None = None,
          preprocess: str | Path | None = None) -> DebugResult:
    """Compare every quantized tensor and compute-node output of ``candidate`` with ``reference`` on ``data``."""
    import itertools

    from edgeq.calibration.data import model_inputs, open_dataset
    from edgeq.model_io import load_model

    ref = reference if isinstance(reference, onnx.ModelProto) else load_model(reference)
    cand = candidate if isinstance(candidate, onnx.ModelProto) else load_model(candidate, check=False)
    if plot is not None:
        _pyplot()  # fail before the work when matplotlib is missing
    ds = open_dataset(data, model_inputs(ref), preprocess=preprocess, what="debug data")
    feeds = list(itertools.islice(iter(ds), max_samples))
    if not feeds:
        raise EdgeqError("debug data contains no samples")
    rows, pairs, clamps = plan_rows(ref, cand)
    if not rows:
        raise EdgeqError("the candidate has no quantized activations or compute-node outputs in common with the "
                         "reference; pass the FP32 model first and the quantized model second")
    acc = compare_tensors(ref, cand, feeds, pairs, clamps)
    result = _finish(rows, acc, len(feeds), str(reference) if not isinstance(reference, onnx.ModelProto) else
                     "<model>", str(candidate) if not isinstance(candidate, onnx.ModelProto) else "<model>")
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result.as_dict(), indent=2, default=_json_default))
    if plot is not None:
        write_plot(result, plot)
    return result


def plan_rows(ref: onnx.ModelProto, cand: onnx.ModelProto
              ) -> tuple[list[LayerRow], dict[str, str], dict[str, tuple[float, float]]]:
    """The rows to compute (candidate topological order), the candidate -> reference tensor pairs they need, and
    the clamps of pairs compared after a clamp (see :func:`compare_tensors`)."""
    ref_tensors = {o for n in ref.graph.node for o in n.output} | {i.name for i in ref.graph.input}
    inits = {i.name for i in cand.graph.initializer}
    producers = {o: n for n in cand.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in cand.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    pairs: dict[str, str] = {}
    clamps: dict[str, tuple[float, float]] = {}
    rows: list[LayerRow] = []

    def ref_name(t: str) -> str | None:
        if t in ref_tensors:
            return t
        for suffix in ("/float", "/dequantized"):
            if t.endswith(suffix) and t[: -len(suffix)] in ref_tensors:
                return t[: -len(suffix)]
        return None

    for n in cand.graph.node:
        if n.op_type == "DequantizeLinear":
            q = producers.get(n.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
                continue
            src = ref_name(q.input[0])
            out = n.output[0]
            if src is None:
                continue
            users = [c for c in consumers.get(out, []) if c.op_type not in ("QuantizeLinear",)]
            pre = q.input[0]
            bounds = None
            if users and all(c.op_type in CLAMPS for c in users) and _clamps_at_zero(q, cand) and \
                    ref_name(users[0].output[0]) is not None:
                src = ref_name(users[0].output[0])  # a range fused with the clamp after it: the Q/DQ already clamps
                bounds = _clamp_bounds(users[0], cand)
            pairs[out] = src
            if ref_name(pre) is not None and bounds is not None:
                # the input compared after the same clamp: the clamp removes signal on both sides, which is not
                # error this Q/DQ adds (a ReLU6's Q/DQ would otherwise look like a several-dB drop)
                pre = pre + CLAMPED
                pairs[pre], clamps[pre] = ref_name(q.input[0]), bounds
            elif ref_name(pre) is not None:
                pairs[pre] = ref_name(pre)
            rows.append(LayerRow(out, src, "quantized", ", ".join(c.name for c in users[:3]),
                                 "Q/DQ", math.nan, math.nan, math.nan, inputs=[pre] if pre in pairs else []))
        elif n.op_type in LAYER_OPS and n.output and ref_name(n.output[0]) is not None:
            out = n.output[0]
            pairs[out] = ref_name(out)
            ins = []
            for t in n.input:
                if not t or t in inits:
                    continue
                p = producers.get(t)
                if p is not None and p.op_type == "DequantizeLinear" and (producers.get(p.input[0]) is None or
                                                                         producers[p.input[0]].op_type != "QuantizeLinear"):
                    continue  # a weight
                if ref_name(t) is not None:
                    pairs[t] = ref_name(t)
                    ins.append(t)
            rows.append(LayerRow(out, pairs[out], "layer", n.name, n.op_type, math.nan, math.nan, math.nan,
                                 inputs=ins))
    return rows, pairs, clamps


def _clamp_bounds(node: onnx.NodeProto, model: onnx.ModelProto) -> tuple[float, float] | None:
    """(low, high) of a Relu or of a Clip whose bounds are attributes or constant initializers; None otherwise."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    lo, hi = float(attrs.get("min", -math.inf)), float(attrs.get("max", math.inf))
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute
              and n.attribute[0].name == "value"}
    for idx in (1, 2):
        if len(node.input) <= idx or not node.input[idx]:
            continue
        t = inits.get(node.input[idx]) or consts.get(node.input[idx])
        if t is None:
            return None
        v = float(onnx.numpy_helper.to_array(t).reshape(-1)[0])
        lo, hi = (v, hi) if idx == 1 else (lo, v)
    return lo, hi


def _clamps_at_zero(q: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    """Whether a QuantizeLinear's lowest representable value is 0 (its zero point is the type's minimum)."""
    if len(q.input) < 3:
        return True  # default zero point: uint8 0
    init = next((i for i in model.graph.initializer if i.name == q.input[2]), None)
    if init is None:
        return False
    zp = onnx.numpy_helper.to_array(init)
    return zp.size == 1 and np.issubdtype(zp.dtype, np.integer) and int(zp.reshape(-1)[0]) == np.iinfo(zp.dtype).min


def _finish(rows: list[LayerRow], acc: dict[str, ErrorAccumulator], samples: int, ref: str, cand: str):
    for r in rows:
        a = acc[r.tensor]
        r.sqnr_db, r.cosine, r.max_abs_error = a.sqnr_db, a.cosine, a.max_abs
        ins = [acc[t].sqnr_db for t in r.inputs if t in acc and acc[t].samples]
        if ins:  # SQNR above CEILING_DB counts as exact, so a first layer's drop is finite
            r.drop_db = min(min(ins), CEILING_DB) - min(r.sqnr_db, CEILING_DB)
            r.added_noise = noise_to_signal(r.sqnr_db) - noise_to_signal(min(ins))
    return DebugResult(rows=rows, samples=samples, reference=ref, candidate=cand)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailableError("--plot needs matplotlib, which is not installed. Install it with: "
                                      "pip install 'edgeq[plot]'") from None
    return plt


def write_plot(result: DebugResult, path: str | Path) -> Path:
    """SQNR of every compared tensor in graph order, with the largest jump marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(8, min(24, len(result.rows) * 0.12)), 4.5))
    ys = [min(r.sqnr_db, 80.0) for r in result.rows]
    xs = list(range(len(ys)))
    kinds = [r.kind for r in result.rows]
    ax.plot(xs, ys, color="0.6", lw=1)
    for kind, color in (("quantized", "tab:blue"), ("layer", "tab:orange")):
        pts = [(x, y) for x, y, k in zip(xs, ys, kinds) if k == kind]
        if pts:
            ax.scatter(*zip(*pts), s=12, color=color, label=kind, zorder=3)
    jump = result.first_jump
    if jump is not None:
        i = result.rows.index(jump)
        ax.annotate(f"{jump.op} {jump.node or jump.tensor}\n-{jump.drop_db:.1f} dB", (i, ys[i]),
                    xytext=(0, -40), textcoords="offset points", arrowprops={"arrowstyle": "->"}, fontsize=8)
    ax.set_xlabel("tensor (graph order)")
    ax.set_ylabel("SQNR vs FP32 (dB)")
    ax.set_title(f"edgeq debug: {Path(result.candidate).name} vs {Path(result.reference).name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return Path(path)
