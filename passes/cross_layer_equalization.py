"""Cross-layer equalisation (CLE) of consecutive convolutions, including depthwise ones.

Matches: ``Conv1 -> [Relu | LeakyRelu | PRelu | Clip(min 0, no max) | nothing] -> Conv2`` where each intermediate
tensor has exactly one consumer, both weights (and Conv1's bias) are constant, and Conv2 reads the chain as its
data input. Conv1's output channels are Conv2's input channels; grouped and depthwise convolutions on either side
are handled (each input channel maps to the weight entries of its group).
Rewrites: per channel i, with ``r1_i`` the abs-max of Conv1's output channel i and ``r2_i`` the abs-max of the
weights of Conv2 reading channel i, ``s_i = sqrt(r1_i * r2_i) / r2_i``; Conv1's weight and bias are divided by s and
Conv2's input channels multiplied by s, making both ranges ``sqrt(r1_i * r2_i)``. Chains such as
``expand -> depthwise -> project`` share convolutions, so all pairs are equalised for ``iterations`` rounds.
Exactness: exact in float (~1e-6 relative) because the activations in between are positively homogeneous
(``f(x / s) = f(x) / s`` for ``s > 0``). ``Clip(0, hi)`` (ReLU6) is not: ``min(x / s, 6)`` needs the per-channel
bound ``6 / s_i``, which Clip cannot express (replacing it by ReLU, as some tools do, changes the function). With
``bounded_clip: per_channel_min`` the Clip becomes ``Relu -> Min(hi / s)`` with a per-channel constant, which is
exact and costs one elementwise op; the default ``skip`` leaves such pairs alone.
Scales are clamped to ``[1/max_scale, max_scale]``.
Skips (with a reason): bounded Clip (by default), other activations, shared intermediate tensors, non-constant
weights.
Targets: mostly useful for per-tensor weight quantization and per-tensor activations after depthwise convolutions;
the built-in profiles quantize weights per channel, so it is opt-in (``passes: [equalize_cross_layer]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.ir import const_value, has_const_value, unique_name
from edgeq.pass_base import GraphPass, PassContext, PassResult
from edgeq.passes.fold_channel_scale import (input_channel_absmax, out_channels, output_channel_absmax,
                                             scale_inputs, scale_outputs, weight_of)

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")


class CrossLayerEqualizationPass(GraphPass):
    name = "equalize_cross_layer"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        iterations: int = 4
        max_scale: float = 1e4
        bounded_clip: Literal["skip", "per_channel_min"] = "skip"

        def __post_init__(self):
            if self.iterations < 1 or self.max_scale < 1.0:
                raise ValueError("need iterations >= 1 and max_scale >= 1")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        pairs = []
        for conv in [n for n in graph.nodes if n.op == "Conv"]:
            found = self._pair(graph, conv, result)
            if found is not None:
                pairs.append(found)
        spread_before = _spread(pairs)
        total = {id(first): 1.0 for first, _ in pairs}  # cumulative factor dividing each Conv1's outputs
        for _ in range(self.options.iterations):
            for first, second in pairs:
                total[id(first)] = total[id(first)] * self._equalize(graph, first, second)
        for first, _ in pairs:
            self._rebound_clip(graph, first, total[id(first)])
        result.rewrites = len(pairs)
        result.changed = bool(pairs)
        result.notes.update(pairs=len(pairs), mean_log_range_spread_before=spread_before,
                            mean_log_range_spread_after=_spread(pairs))
        return result

    def _pair(self, graph: gs.Graph, conv: gs.Node, result: PassResult) -> tuple[gs.Node, gs.Node] | None:
        if weight_of(conv) is None or len(conv.inputs) > 2 and not has_const_value(conv.inputs[2]):
            return None
        t = conv.outputs[0]
        label = f"Conv {conv.name}"
        between = []
        while True:
            if len(t.outputs) != 1 or t in graph.outputs:
                if len(t.outputs) > 1:
                    self.skip(result, label, f"output {t.name} has several consumers or is a graph output")
                return None
            nxt = t.outputs[0]
            if nxt.op == "Conv":
                break
            if nxt.inputs[0] is not t:
                return None
            if nxt.op in HOMOGENEOUS or (nxt.op == "Clip" and _unbounded_above_from_zero(nxt)):
                if nxt.op == "PRelu" and not has_const_value(nxt.inputs[1]):
                    return None
                between.append(nxt)
                if len(between) > 1:
                    return None
                t = nxt.outputs[0]
                continue
            if nxt.op == "Clip" and self.options.bounded_clip == "per_channel_min" and _clip_bound(nxt) is not None:
                between.append(nxt)
                if len(between) > 1:
                    return None
                t = nxt.outputs[0]
                continue
            if nxt.op == "Clip":
                self.skip(result, label, f"followed by bounded Clip {nxt.name} (ReLU6): scaling would change the "
                                         f"clip bound per channel, so CLE would not be exact")
            return None
        if nxt.inputs[0] is not t or weight_of(nxt) is None:
            self.skip(result, label, f"next Conv {nxt.name} has no constant weight")
            return None
        return conv, nxt

    def _equalize(self, graph: gs.Graph, first: gs.Node, second: gs.Node) -> np.ndarray | float:
        w1, w2 = weight_of(first), weight_of(second)
        r1, r2 = output_channel_absmax(first, w1), input_channel_absmax(second, w2)
        if r1.size != r2.size:
            return 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.sqrt(r1 * r2) / r2
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        s = np.clip(s, 1.0 / self.options.max_scale, self.options.max_scale)
        scale_outputs(first, 1.0 / s, graph, "cle")
        scale_inputs(second, s, graph, "cle")
        return s


    @staticmethod
    def _rebound_clip(graph: gs.Graph, first: gs.Node, s) -> None:
        """Clip(0, hi) after ``first`` -> Relu -> Min(hi / s) with the cumulative per-channel scale s."""
        clip = first.outputs[0].outputs[0]
        if clip.op != "Clip" or _clip_bound(clip) is None:
            return
        rank = weight_of(first).ndim
        bound = (_clip_bound(clip) / np.broadcast_to(s, (out_channels(first, weight_of(first)),))).astype(np.float32).reshape(-1, *([1] * (rank - 2)))
        x, y = clip.inputs[0], clip.outputs[0]
        mid = gs.Variable(unique_name(graph, f"{y.name}/relu"), dtype=y.dtype, shape=y.shape)
        relu = gs.Node("Relu", unique_name(graph, f"{clip.name}/relu"), inputs=[x], outputs=[mid])
        bound_c = gs.Constant(unique_name(graph, f"{clip.name}/bound"), bound)
        clip.inputs.clear()
        clip.outputs.clear()
        graph.nodes.append(relu)
        graph.nodes.append(gs.Node("Min", unique_name(graph, f"{clip.name}/min"), inputs=[mid, bound_c],
                                   outputs=[y]))


def _clip_bound(clip: gs.Node) -> float | None:
    """``hi`` of a ``Clip(0, hi)`` with a finite constant upper bound, else None."""
    lo = const_value(clip.inputs[1]) if len(clip.inputs) > 1 and clip.inputs[1].name else clip.attrs.get("min")
    hi = const_value(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2].name else clip.attrs.get("max")
    if lo is None or hi is None or float(np.asarray(lo)) != 0.0 or not np.isfinite(float(np.asarray(hi))):
        return None
    return float(np.asarray(hi))


def _unbounded_above_from_zero(clip: gs.Node) -> bool:
    lo = const_value(clip.inputs[1]) if len(clip.inputs) > 1 and clip.inputs[1].name else clip.attrs.get("min")
    hi = const_value(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2].name else clip.attrs.get("max")
    lo_ok = lo is None or float(np.asarray(lo)) in (0.0, -np.inf)
    hi_ok = hi is None or not np.isfinite(float(np.asarray(hi)))
    return lo_ok and hi_ok


def _spread(pairs) -> float | None:
    """Mean over pairs of the log10 ratio between the largest and smallest output-channel range of Conv1."""
    vals = []
    for first, _ in pairs:
        r = output_channel_absmax(first, weight_of(first))
        r = r[r > 0]
        if r.size:
            vals.append(float(np.log10(r.max() / r.min())))
    return float(np.mean(vals)) if vals else None
