"""Defer the normalisation of attention probabilities that would round to zero, so ``P @ V`` can run in INT8.

Matches: ``P = Softmax(S)`` over the last axis whose only consumer is a ``MatMul`` reading ``P`` as its left input
(attention probabilities times values), where ``P`` would mostly round to zero in the profile's activation format:
more of its calibrated magnitude than ``activations.max_underflow`` lies below half a step (the rule by which
``insert_qdq`` would keep that MatMul in float). Softmax rows over many keys (Whisper's 1500 audio frames) hold
values near ``1/1500``, under half a uint8 step of ``1/255``. The rows calibration sampled must show that the
rewrite helps: divided by its maximum, a row may lose at most ``activations.max_underflow`` of its probability
mass on average (a row with one peak and a long tail of small values loses the tail either way).
Rewrites: ``m = ReduceMax(P, axis=-1, keepdims)``, ``E = P / m``, ``Y = MatMul(E, V) * m``. Each row of ``E`` has
its largest value at exactly 1, so a flat row uses the whole quantization range instead of its bottom step; the
per-row factor ``m`` is applied to the MatMul's (float) output, where it costs nothing in precision. With
``compensate_mass`` (and a static number of keys) ``Y`` also gets ``(1 - m * (E @ 1)) * mean(V)``: zero in float, and
after quantization the probability mass that still rounded to zero, put back at the mean value
(:func:`_compensate_mass`).
Preconditions: the Softmax axis is the last axis (known rank, or ``axis=-1``); per-tensor statistics of ``P``
(the pipeline gathers them before the pass because ``needs_stats`` is set; without them every match is rewritten).
Numerically exact in float (one division and one multiplication per element, ~1e-7 relative).
Cost: a reduction and a division over ``P`` (about 8 ms per 6x1500x1500 attention on two CPU cores), paid only
where the MatMul would otherwise stay float; the compensation adds an integer MatMul by a column of ones.
Skips (with a reason): probabilities that quantize well as they are, rows whose tail would round to zero even
after the division, a Softmax not over the last axis, a
probability tensor read by anything but one MatMul (or a graph output).
Targets: ``ort-cpu`` (Q/DQ on MatMul inputs only, so ``E`` is quantized and ``P`` is not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.ir import opset, unique_name
from edgeq.pass_base import GraphPass, PassContext, PassResult
from edgeq.passes.insert_qdq import flushed_fraction
from edgeq.quant_math import INT_TYPES, activation_params, observed_params


class DeferSoftmaxNormalizationPass(GraphPass):
    name = "defer_softmax_normalization"
    needs_stats = True

    @dataclass(frozen=True, kw_only=True)
    class Options:
        # rewrite every match, whether or not its probabilities would round to zero
        always: bool = False
        # add back the probability mass that rounds to zero, spread as the mean of V (static key length only)
        compensate_mass: bool = True

    def stats_tensors(self, model, profile=None) -> list[str]:
        return [] if self.options.always else [n.output[0] for n in model.graph.node if n.op_type == "Softmax"]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        flushed: dict[str, float] = {}
        for sm in [n for n in graph.nodes if n.op == "Softmax"]:
            label = f"Softmax {sm.name}"
            p = sm.outputs[0]
            users = list(p.outputs)
            if p in graph.outputs or len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not p \
                    or users[0].inputs[1] is p:
                self.skip(result, label, "its output is not read by exactly one MatMul as the left input")
                continue
            if not _over_last_axis(sm, p, opset(graph)):
                self.skip(result, label, "not over the last axis")
                continue
            measured = None if self.options.always else _flushed(ctx, p)
            if measured is not None:
                lost, after = measured
                limit = ctx.profile.activations.max_underflow
                if not lost > limit:
                    self.skip(result, label, f"{lost:.0%} of its magnitude would round to zero (at most "
                                             f"activations.max_underflow {limit:g}); it quantizes as it is")
                    continue
                if after is not None and after > limit:
                    self.skip(result, label, f"{lost:.0%} of its magnitude would round to zero, and divided by "
                                             f"its row maximum still {after:.0%} of a row's probability mass (a "
                                             f"peak with a long tail; activations.max_underflow {limit:g}): the "
                                             f"MatMul stays float")
                    continue
                flushed[sm.name] = {"before": round(lost, 3), "row_mass_after": after if after is None
                                    else round(after, 3)}
            compensated = self._rewrite(graph, p, users[0], compensate=self.options.compensate_mass)
            if self.options.compensate_mass and not compensated:
                self.skip(result, label, "rewritten without mass compensation: the number of keys is not static")
            result.rewrites += 1
        result.changed = result.rewrites > 0
        result.notes["flushed"] = flushed
        return result

    @staticmethod
    def _rewrite(graph: gs.Graph, p: gs.Variable, matmul: gs.Node, *, compensate: bool = False) -> bool:
        """Rewrite one match; True when the mass compensation was added too."""
        rank = len(p.shape) if p.shape is not None else None
        row_shape = list(p.shape[:-1]) + [1] if rank else None
        rowmax = gs.Variable(unique_name(graph, f"{p.name}/rowmax"), dtype=p.dtype, shape=row_shape)
        if opset(graph) >= 18:
            axes = gs.Constant(unique_name(graph, f"{p.name}/axes"), np.array([-1], np.int64))
            graph.nodes.append(gs.Node("ReduceMax", unique_name(graph, f"{p.name}/RowMax"), attrs={"keepdims": 1},
                                       inputs=[p, axes], outputs=[rowmax]))
        else:
            graph.nodes.append(gs.Node("ReduceMax", unique_name(graph, f"{p.name}/RowMax"),
                                       attrs={"axes": [-1], "keepdims": 1}, inputs=[p], outputs=[rowmax]))
        scaled = gs.Variable(unique_name(graph, f"{p.name}/row_scaled"), dtype=p.dtype, shape=p.shape)
        graph.nodes.append(gs.Node("Div", unique_name(graph, f"{p.name}/RowScale"), inputs=[p, rowmax],
                                   outputs=[scaled]))
        y = matmul.outputs[0]
        unscaled = gs.Variable(unique_name(graph, f"{y.name}/row_scaled"), dtype=y.dtype, shape=y.shape)
        matmul.inputs[0] = scaled
        matmul.outputs[0] = unscaled
        keys = p.shape[-1] if rank else None
        if not (compensate and isinstance(keys, (int, np.integer)) and keys > 0):
            graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{matmul.name}/RowUnscale"),
                                       inputs=[unscaled, rowmax], outputs=[y]))
            return False
        _compensate_mass(graph, scaled, rowmax, matmul, unscaled, y, int(keys))
        return True


def _compensate_mass(graph: gs.Graph, scaled: gs.Variable, rowmax: gs.Variable, matmul: gs.Node,
                     unscaled: gs.Variable, y: gs.Variable, keys: int) -> None:
    """``Y = (E @ V) * m + (1 - m * (E @ 1)) * mean(V over keys)``.

    ``E @ 1`` is a MatMul by a constant column of ones, so ``insert_qdq`` quantizes its input with the same Q/DQ
    pair as ``E @ V`` and the ones exactly (int8 127 at scale 1/127): after quantization it is the row sum of the
    *quantized* ``E``, and ``1 - m * (E @ 1)`` the probability mass its rounding flushed to zero (1-4 % per row on
    Whisper's 1500-frame attention). Those keys are spread over the row's tail, so their values average to about
    the mean value: adding ``lost * mean(V)`` back removes most of that error (on Whisper's encoder, the
    ``P @ V`` output goes from 28-36 dB to 39-44 dB SQNR). In float ``E @ 1 = 1 / m`` and the term is zero."""
    dtype = scaled.dtype if scaled.dtype is not None else np.float32
    rows = list(scaled.shape[:-1]) + [1] if scaled.shape is not None else None

    def var(name: str, shape=None) -> gs.Variable:
        return gs.Variable(unique_name(graph, name), dtype=dtype, shape=shape)

    def node(op: str, name: str, inputs: list, output: gs.Variable, **attrs) -> gs.Variable:
        graph.nodes.append(gs.Node(op, unique_name(graph, name), attrs=attrs, inputs=inputs, outputs=[output]))
        return output

    base = matmul.name or "attention"
    rescaled = node("Mul", f"{base}/RowUnscale", [unscaled, rowmax], var(f"{y.name}/rescaled", y.shape))
    ones = gs.Constant(unique_name(graph, f"{base}/ones"), np.ones((keys, 1), np.float32))
    rowsum = node("MatMul", f"{base}/RowSum", [scaled, ones], var(f"{scaled.name}/row_sum", rows))
    kept = node("Mul", f"{base}/KeptMass", [rowsum, rowmax], var(f"{scaled.name}/kept_mass", rows))
    one = gs.Constant(unique_name(graph, f"{base}/one"), np.ones((), np.float32))
    lost = node("Sub", f"{base}/LostMass", [one, kept], var(f"{scaled.name}/lost_mass", rows))
    v = matmul.inputs[1]
    if opset(graph) >= 18:
        axes = gs.Constant(unique_name(graph, f"{base}/key_axis"), np.array([-2], np.int64))
        vmean = node("ReduceMean", f"{base}/MeanValue", [v, axes], var(f"{v.name}/key_mean"), keepdims=1)
    else:
        vmean = node("ReduceMean", f"{base}/MeanValue", [v], var(f"{v.name}/key_mean"), axes=[-2], keepdims=1)
    added = node("Mul", f"{base}/FlushedValue", [lost, vmean], var(f"{y.name}/flushed", y.shape))
    node("Add", f"{base}/Compensate", [rescaled, added], y)


def _over_last_axis(sm: gs.Node, p: gs.Tensor, graph_opset: int) -> bool:
    axis = int(sm.attrs.get("axis", -1 if graph_opset >= 13 else 1))
    if axis == -1:
        return True
    rank = len(p.shape) if p.shape is not None else None
    return rank is not None and axis == rank - 1  # before opset 13 the input is coerced to 2-D at axis: the same


def _flushed(ctx: PassContext, p: gs.Tensor) -> tuple[float, float | None] | None:
    """Share of P's calibrated magnitude that the profile's activation format would round to zero, and, from the
    rows of P that calibration sampled, the mean share of each row's probability mass that would still round to
    zero once the row is divided by its maximum (None without sampled rows). None without statistics or an
    integer activation format (the match is then rewritten)."""
    spec = ctx.profile.activations if ctx.profile is not None else None
    obs = ctx.stats.get(p.name) if ctx.stats is not None else None
    if spec is None or obs is None or not obs.count or spec.dtype not in INT_TYPES:
        return None
    scale, _ = observed_params(obs, spec)
    rows = getattr(obs, "rows", None)
    after = None
    if rows is not None and len(rows):
        # a row of P / rowmax spans [0, 1]: the step of that range, and the mass below half of it, row by row
        e_scale, _ = activation_params(0.0, 1.0, spec.dtype, symmetric=spec.symmetric, min_range=spec.min_real_range)
        r = np.abs(rows.astype(np.float64))
        peak = r.max(axis=1, keepdims=True)
        total = r.sum(axis=1)
        ok = (peak[:, 0] > 0) & (total > 0)
        if ok.any():
            lost = np.where(r < peak * float(e_scale) / 2, r, 0.0).sum(axis=1)
            after = float(np.mean(lost[ok] / total[ok]))
    return flushed_fraction(obs, float(scale) / 2), after
