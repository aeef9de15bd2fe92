"""SmoothQuant: move activation outliers into the weights of the MatMul/Gemm/Conv that reads them.

Matches: an activation ``X`` whose consumers are all MatMul/Gemm nodes (channels on the last axis) or all Conv
nodes (channels on axis 1) reading it as their data input with a constant weight (Q/K/V after one LayerNorm form
one group; the op types are ``ops``). Per channel j,
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (``max|W_j|`` over every weight of the group; the calibrated
``channel_absmax`` of ``X``), clamped to ``[min_scale, max_scale]``.
Rewrites: ``X / s`` is folded into X's producer -- LayerNormalization gamma and beta; ``Add(bias)`` after a MatMul,
Gemm or ``Mul(gamma)`` (decomposed LayerNorm); a MatMul/Gemm/Conv's output channels -- or, when there is none, a
``Mul(X, 1/s)`` is inserted (only where the profile quantizes the consumers' activations, and not where the profile
already quantizes the producer's output: the Mul would add a second rounding of X). A Conv's ``X`` is typically a
GELU/SiLU output (Whisper's convolutional stem), where a few channels span ten times the range of the median one. ``s`` is folded into the
rows of every consumer's weight. With ``search_alpha`` each group picks alpha from a small grid (or no smoothing)
by the group's W8A8 output error measured on the calibration rows the observer sampled (the profile's activation
format, per-channel int8 weights); without those rows, by a proxy from the statistics alone (per-tensor activation
step times the weight energy, plus per-channel weight steps times the activation energy from the channel abs-max).
When X is also read by other ops (the residual Add of a post-LN transformer) and ``shared_inputs`` is set, only the
MatMul/Gemm branch is smoothed, through an inserted ``Mul(X, 1/s)`` that the other readers bypass.
Preconditions: per-channel statistics of X (the pipeline gathers them because ``needs_stats`` is set).
``min_outlier_ratio`` leaves alone activations without outlier channels (max/median of the channel abs-max below
it), where smoothing has little to gain and costs weight precision.
Skips (with a reason): no statistics, no outlier channels, a weight that is not constant, X shared with a non-linear consumer or a graph
output (without ``shared_inputs``), a producer that cannot absorb ``1/s`` where inserting a Mul would not be quantized, a profile that does not
quantize the activations. Numerically exact in float (~1e-6 relative); it changes only how error is split between
activation and weight quantization. Targets: transformer models (MatMul/Gemm after LayerNorm) on any W8A8 profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.calibration.observers import TensorObserver
from edgeq.ir import const_value, has_const_value, unique_name
from edgeq.pass_base import GraphPass, PassContext, PassResult
from edgeq.quant_math import INT_TYPES, observed_params, quantize_array, quantize_weight
from edgeq.passes.fold_channel_scale import (channel_vector, in_channels, input_channel_absmax, input_scale_tensor,
                                             scale_inputs, scale_outputs, set_const, tensor_rank, weight_of)

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ERROR_COLUMNS = 2048  # weight columns per step of the measured error (512 sampled rows x 2048 x 8 bytes = 8 MB)


class SmoothQuantPass(GraphPass):
    name = "smoothquant"
    needs_stats = True

    @dataclass(frozen=True, kw_only=True)
    class Options:
        alpha: float = 0.5
        search_alpha: bool = False
        min_scale: float = 1e-5
        max_scale: float = 1e5
        insert_mul: bool = True
        shared_inputs: bool = True
        min_outlier_ratio: float = 0.0  # smooth only when max/median of the channel abs-max reaches this
        min_error_reduction: float = 1.0  # search_alpha: smooth only when the error falls by at least this factor
        ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")  # consumer op types whose activation inputs are smoothed

        def __post_init__(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
            if not 0 < self.min_scale <= 1.0 <= self.max_scale:
                raise ValueError("need 0 < min_scale <= 1 <= max_scale")
            if not self.min_error_reduction >= 1.0:
                raise ValueError(f"min_error_reduction must be >= 1, got {self.min_error_reduction}")
            bad = sorted(set(self.ops) - {"MatMul", "Gemm", "Conv"})
            if bad:
                raise ValueError(f"ops must be among MatMul, Gemm, Conv; got {', '.join(bad)}")

    def stats_tensors(self, model, profile=None) -> list[str]:
        """The data inputs of the ``ops`` consumers with constant weights; under a profile, not a Conv input that is a
        graph input or whose producer's output the profile quantizes (both skipped by the pass)."""
        inits = {i.name for i in model.graph.initializer}
        constants = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        producer = {o: n for n in model.graph.node for o in n.output}
        inputs = {i.name for i in model.graph.input}
        fused = set(profile.placement.quantize_outputs_of) if profile is not None else set()
        out = set()
        for n in model.graph.node:
            if n.op_type not in self.options.ops or len(n.input) < 2 or n.input[0] in constants or \
                    n.input[1] not in constants:
                continue
            x = n.input[0]
            if n.op_type == "Conv" and profile is not None:
                prod = producer.get(x)
                if x in inputs or prod is None:
                    continue
                if prod.op_type in ("Relu", "Clip") and prod.input and prod.input[0] in producer:
                    prod = producer[prod.input[0]]
                if prod.op_type in fused:
                    continue
            out.add(x)
        return sorted(out)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        alphas: dict[str, float | None] = {}
        gains: dict[str, float] = {}
        groups: dict[str, tuple[gs.Tensor, list[gs.Node]]] = {}
        for node in graph.nodes:
            if node.op in self.options.ops and node.inputs and not has_const_value(node.inputs[0]):
                x = node.inputs[0]
                groups.setdefault(x.name, (x, []))[1].append(node)
        for x, nodes in groups.values():
            label = ", ".join(f"{n.op} {n.name}" for n in nodes)
            reason = self._smooth(graph, ctx, x, alphas, gains)
            if reason:
                self.skip(result, label, reason)
            else:
                result.rewrites += 1
        result.changed = result.rewrites > 0
        result.notes["alpha"] = {k: v for k, v in alphas.items()}
        if gains:  # error without smoothing / with the chosen alpha, per group
            result.notes["error_reduction"] = gains
        return result

    # ------------------------------------------------------------------------------------------------------------
    def _smooth(self, graph: gs.Graph, ctx: PassContext, x: gs.Tensor, alphas: dict, gains: dict) -> str | None:
        users, others = [], []
        # one channel layout per group: Conv reads channels on axis 1, MatMul/Gemm on the last axis
        conv = any(u.op == "Conv" and u.inputs[0] is x for u in x.outputs) and \
            not any(u.op in ("MatMul", "Gemm") and u.op in self.options.ops and u.inputs[0] is x for u in x.outputs)
        kinds = ("Conv",) if conv else ("MatMul", "Gemm")
        for u in x.outputs:
            linear = u.op in kinds and u.op in self.options.ops and u.inputs[0] is x and \
                not any(t is x for t in u.inputs[1:])
            (users if linear and weight_of(u) is not None else others).append(u)
        if not users:
            u = others[0]
            return f"{u.op} {u.name}: weight is not constant (or not a 2-D float matrix)" \
                if u.op in kinds else f"{x.name} is not read by a {'/'.join(self.options.ops)}"
        shared = bool(others) or x in graph.outputs
        if shared and not (self.options.shared_inputs and self.options.insert_mul):
            what = f"{others[0].op} {others[0].name}" if others else "the graph output"
            return f"{x.name} is also read by {what}, which cannot absorb the scale"
        if not any(_quantizes_activation(ctx, u) for u in users):
            return "the profile does not quantize these activations; smoothing would only make weights harder"
        obs = ctx.stats.get(x.name) if ctx.stats is not None else None
        act = getattr(obs, "channel_absmax", None)
        if conv and not x.inputs:
            return f"{x.name} is a graph input: a Conv reading it is a stem the profile may keep in float"
        if act is not None and getattr(obs, "channel_axis", -1) != (1 if conv else -1):
            return f"the per-channel statistics of {x.name} are not along its channel axis"
        k = in_channels(users[0], weight_of(users[0]))
        if act is None or act.size == 0:
            return f"no per-channel statistics for {x.name}"
        if act.size != k or any(in_channels(u, weight_of(u)) != k for u in users):
            return f"channel statistics of {x.name} ({act.size}) do not match the weights' input channels ({k})"
        w_max = np.max([input_channel_absmax(u, weight_of(u)) for u in users], axis=0)
        act = act.astype(np.float64)
        ratio = float(act.max() / max(float(np.median(act)), 1e-30))
        if ratio < self.options.min_outlier_ratio:
            return f"no outlier channels (max/median channel range {ratio:.1f} < {self.options.min_outlier_ratio:g})"
        if self.options.search_alpha:
            rows = getattr(obs, "rows", None)
            measure = _layer_error(rows, users, ctx.profile, lambda a, al: self._scales(a, w_max, al)) \
                if rows is not None and len(rows) and rows.shape[1] == act.size else None
            alpha, gain = self._search(act, [weight_of(u) for u in users], users, w_max, measure)
            alphas[x.name] = alpha
            gains[x.name] = round(gain, 3)
            if alpha is not None and gain < self.options.min_error_reduction:
                alphas[x.name] = None
                return f"no smoothing: the W8A8 error falls only {gain:.2f}x (< min_error_reduction " \
                       f"{self.options.min_error_reduction:g})"
            if alpha is None:
                return f"no smoothing: the W8A8 error {'measured on held-out calibration rows' if measure else 'proxy'}" \
                       f" is lowest without it"
        else:
            alpha = self.options.alpha
            alphas[x.name] = alpha
        s = self._scales(act, w_max, alpha)
        rank = weight_of(users[0]).ndim if conv else None  # a Conv's data has the rank of its weight
        if shared:  # the other readers keep x; only the linear consumers' branch is scaled
            requantized = _quantized_producer(ctx, x)
            if requantized:
                return requantized
            self._insert_mul(graph, x, users, 1.0 / s, rank)()
            for u in users:
                scale_inputs(u, s, graph, "smoothed")
            return None
        apply = self._producer_fold(graph, x, 1.0 / s, channel_axis=1 if conv else -1)
        if isinstance(apply, str):
            if not self.options.insert_mul:
                return apply
            requantized = _quantized_producer(ctx, x)
            if requantized:
                return f"{apply}, and {requantized}"
            apply = self._insert_mul(graph, x, users, 1.0 / s, rank)
        apply()
        for u in users:
            scale_inputs(u, s, graph, "smoothed")
        return None

    def _scales(self, act: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(act, alpha) / np.power(w_max, 1.0 - alpha)
        s = np.where(np.isfinite(s) & (s > 0) & (act > 0) & (w_max > 0), s, 1.0)
        return np.clip(s, self.options.min_scale, self.options.max_scale)

    def _search(self, act, weights, users, w_max, measure=None) -> tuple[float | None, float]:
        """The best alpha (None: no smoothing) and the error without smoothing over the error with it."""
        def proxy(s: np.ndarray) -> float:
            xs = act / s
            dx = xs.max() / 127.0
            total = 0.0
            for u, w in zip(users, weights):
                ws = _matrix(u, np.abs(w.astype(np.float64)) * input_scale_tensor(u, w, s))  # -> [K, N]
                dw = _column_steps(u, ws)
                total += dx**2 * float((ws**2).sum()) + float((dw**2).sum()) * float((xs**2).sum())
            return total

        def error(alpha: float | None) -> float:
            if measure is not None:
                return measure(alpha)
            return proxy(np.ones_like(act) if alpha is None else self._scales(act, w_max, alpha))

        best = plain = error(None)
        best_alpha = None
        for alpha in ALPHA_GRID:
            err = error(alpha)
            if err < best * (1 - 1e-6):
                best, best_alpha = err, alpha
        return best_alpha, plain / best if best > 0 else 1.0

    # -- folding 1/s before the consumers ------------------------------------------------------------------------
    def _producer_fold(self, graph: gs.Graph, x: gs.Tensor, inv: np.ndarray, *,
                       channel_axis: int = -1) -> Callable[[], None] | str:
        """A closure applying ``x <- x * inv`` (channels on ``channel_axis``) inside x's producer chain, or the
        reason it cannot."""
        prod = x.inputs[0] if x.inputs else None
        if prod is None:
            return f"{x.name} is a graph input (no producer to absorb 1/s)"
        k = inv.size
        if channel_axis != -1:  # a Conv's input: only a producer Conv's output channels are on axis 1
            if prod.op == "Conv" and weight_of(prod) is not None and \
                    (len(prod.inputs) < 3 or has_const_value(prod.inputs[2])):
                return lambda: scale_outputs(prod, inv, graph, "smoothed")
            return f"producer {prod.op} {prod.name} cannot absorb 1/s"
        if prod.op == "LayerNormalization":
            rank = tensor_rank(x)
            axis = int(prod.attrs.get("axis", -1))
            if not (axis == -1 or (rank is not None and axis == rank - 1)):
                return f"LayerNormalization {prod.name} does not normalise the last axis"
            consts = [const_value(t) for t in prod.inputs[1:3]]
            if any(c is None for c in consts) or len(prod.outputs) > 1 and any(t.outputs for t in prod.outputs[1:]):
                return f"LayerNormalization {prod.name}: gamma/beta not constant or extra outputs used"
            vecs = [channel_vector(c, 1, -1, k) for c in consts]
            if any(v is None for v in vecs):
                return f"LayerNormalization {prod.name}: gamma/beta are not per-channel"

            def fold_ln():
                for i, (c, v) in enumerate(zip(consts, vecs), start=1):
                    set_const(prod, i, (v * inv).astype(c.dtype), graph, "smoothed")
            return fold_ln
        if prod.op in ("MatMul", "Gemm") and weight_of(prod) is not None:
            if prod.op == "Gemm" and len(prod.inputs) > 2 and not has_const_value(prod.inputs[2]):
                return f"Gemm {prod.name}: bias is not constant"
            return lambda: scale_outputs(prod, inv, graph, "smoothed")
        if prod.op in ("Add", "Mul"):
            split = [(i, const_value(t)) for i, t in enumerate(prod.inputs[:2])]
            consts = [(i, c) for i, c in split if c is not None]
            if len(consts) != 1 or consts[0][1].dtype.kind != "f":
                return f"{prod.op} {prod.name} is not an activation {prod.op.lower()} by a constant"
            ci, c = consts[0]
            vec = channel_vector(c, tensor_rank(x), -1, k)
            if vec is None or c.ndim > 1 and tensor_rank(x) is None:
                return f"{prod.op} {prod.name}: constant is not per-channel"
            other = prod.inputs[1 - ci]
            if prod.op == "Mul":
                return lambda: set_const(prod, ci, (vec * inv).astype(c.dtype), graph, "smoothed")
            if len(other.outputs) != 1 or other in graph.outputs:
                return f"input of Add {prod.name} is also used elsewhere"
            inner = self._producer_fold(graph, other, inv)
            if isinstance(inner, str):
                return inner

            def fold_add():
                inner()
                set_const(prod, ci, (vec * inv).astype(c.dtype), graph, "smoothed")
            return fold_add
        return f"producer {prod.op} {prod.name} cannot absorb 1/s"

    def _insert_mul(self, graph: gs.Graph, x: gs.Tensor, users: list[gs.Node], inv: np.ndarray,
                    rank: int | None = None):
        """``Mul(x, inv)`` for ``users``; ``rank`` set: channels on axis 1 of a rank-``rank`` tensor (Conv)."""
        dtype = x.dtype if x.dtype is not None else np.float32
        value = inv.reshape(-1, *([1] * (rank - 2))) if rank is not None else inv

        def insert():
            c = gs.Constant(unique_name(graph, f"{x.name}/smooth_scale"), value.astype(np.float32))
            y = gs.Variable(unique_name(graph, f"{x.name}/smoothed"), dtype=dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{x.name}/SmoothMul"), inputs=[x, c], outputs=[y]))
            for u in users:
                u.inputs[0] = y
        return insert


def _layer_error(rows: np.ndarray, users: list[gs.Node], profile,
                 scales: Callable[[np.ndarray, float], np.ndarray]) -> Callable[[float | None], float] | None:
    """The W8A8 output error of the group for a smoothing alpha (None: no smoothing), measured on the calibration
    rows sampled by the observer: per-tensor activation quantization as insert_qdq writes it (the profile's dtype,
    symmetry and observer), per-output-channel symmetric int8 weights, nearest rounding. None where the profile's
    formats are not integers.

    Every second row is held out: the channel maxima that ``scales(channel_max, alpha)`` turns into ``s`` and the
    clipping range come from the other rows, the error from these. A channel that is small on some inputs and 20x
    larger on others (Whisper's decoder MLP activations on a hundred calibration tokens) gets a scale the held-out
    rows overflow, and the search sees it instead of a 2x gain."""
    spec_a = profile.activations if profile is not None else None
    if spec_a is None or spec_a.dtype not in INT_TYPES or profile.weights.dtype != "int8":
        return None
    rows = rows.astype(np.float64)
    if any(u.op == "Conv" and int(u.attrs.get("group", 1)) != 1 for u in users):
        return None  # grouped convolutions: the proxy
    fit, x = (rows[0::2], rows[1::2]) if len(rows) >= 4 else (rows, rows)
    fit_max = np.abs(fit).max(axis=0)
    mats = [_matrix(u, weight_of(u).astype(np.float64)) for u in users]  # [K, N]

    def error(alpha: float | None) -> float:
        s = np.ones_like(fit_max) if alpha is None else scales(fit_max, alpha)
        obs = TensorObserver()  # the clipping range the profile's observer would choose for the fitted rows
        obs.update((fit / s).astype(np.float32))
        scale, zp = observed_params(obs, spec_a)
        xs = x / s
        xq = (quantize_array(xs, scale, zp, spec_a.dtype).astype(np.float64) - zp) * float(scale)
        total = 0.0
        for u, w in zip(users, mats):
            wq = _quantized_matrix(u, w * s[:, None])
            for c0 in range(0, w.shape[1], ERROR_COLUMNS):  # bounded memory: a Conv has O x taps columns
                c1 = c0 + ERROR_COLUMNS
                total += float(((xq @ wq[:, c0:c1] - x @ w[:, c0:c1]) ** 2).sum())
        return total

    return error


def _matrix(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """The weight as a [K, N] matrix acting on one input row: a Conv's [O, K, taps...] as K x (O * taps), so that
    each kernel tap's contribution is one column (the sum over positions is left out)."""
    if node.op == "Conv":
        return w.reshape(w.shape[0], w.shape[1], -1).transpose(1, 0, 2).reshape(w.shape[1], -1)
    return w.T if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w


def _quantized_matrix(node: gs.Node, m: np.ndarray) -> np.ndarray:
    """``_matrix`` form of the weight after per-output-channel symmetric int8 quantization (a Conv's output channel
    spans its taps' columns)."""
    if node.op != "Conv":
        return quantize_weight(m, "int8", axis=1).dequantize().astype(np.float64)
    out = weight_of(node).shape[0]
    k = m.shape[0]
    per = m.reshape(k, out, -1)
    step = np.abs(per).max(axis=(0, 2), keepdims=True) / 127.0
    step = np.where(step > 0, step, 1.0)
    return (np.clip(np.round(per / step), -127, 127) * step).reshape(k, -1)


def _quantized_producer(ctx: PassContext, x: gs.Tensor) -> str | None:
    """Why a ``Mul`` must not go in front of ``x``'s readers: the profile quantizes the output of x's producer
    (directly or through Relu/Clip), so the Mul would add a second rounding; None when it does not."""
    profile = ctx.profile
    prod = x.inputs[0] if x.inputs else None
    if profile is None or prod is None:
        return None
    if prod.op in ("Relu", "Clip") and prod.inputs and prod.inputs[0].inputs:
        prod = prod.inputs[0].inputs[0]
    if prod.op in profile.placement.quantize_outputs_of:
        return f"the profile quantizes the output of {prod.op} {prod.name}; a Mul after it would round twice"
    return None


def _column_steps(node: gs.Node, m: np.ndarray) -> np.ndarray:
    """Per-column int8 step of a ``_matrix``-form weight, each output channel's step repeated over its columns."""
    if node.op != "Conv":
        return np.abs(m).max(axis=0) / 127.0
    out = weight_of(node).shape[0]
    per = np.abs(m).reshape(m.shape[0], out, -1)
    return np.broadcast_to(per.max(axis=(0, 2))[:, None] / 127.0, per.shape[1:]).reshape(-1)


def _quantizes_activation(ctx: PassContext, node: gs.Node) -> bool:
    """Whether the profile would put a Q/DQ on the node's activation input (True without a profile)."""
    profile = ctx.profile
    if profile is None:
        return True
    place = profile.placement
    if place.mode == "weights" or node.op in place.float_ops:
        return False
    if place.mode != "all" and node.op not in place.ops:
        return False
    if any(ov.precision in ("float", "fp16") and ov.matches(node.op, node.name, [t.name for t in node.outputs])
           for ov in profile.overrides):
        return False
    return ctx.precision is None or node.name not in ctx.precision.float_nodes
