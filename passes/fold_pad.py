"""Folding of zero ``Pad`` nodes into the ``Conv`` nodes that read them.

Matches: ``Pad`` in constant mode with value 0 (or none), constant non-negative pads on the spatial axes only,
whose output feeds nothing but the data input of ``Conv`` nodes with explicit padding (``auto_pad`` NOTSET) and
is not a graph output. Rewrites: adds the pads to each Conv's ``pads`` and connects the Conv to the Pad's input;
the Pad disappears. Exported TensorFlow-style "same" padding (EfficientNet's ``static_padding``) looks like this.
Why it matters for quantized models: a Pad between two quantized Convs splits ``DQ -> Pad -> Q`` from the Conv,
so ONNX Runtime cannot fuse DQ -> Conv -> Q into QLinearConv around it (and runs the Clip before it in float).
Skips (with reason): non-zero pad values, other modes, padding on batch/channel axes, negative pads, shared
outputs read by other ops. Numerically exact (Conv pads with zeros). All targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.ir import const_value
from edgeq.pass_base import GraphPass, PassContext, PassResult


class FoldPadPass(GraphPass):
    name = "fold_pad"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        graph_outputs = {id(t) for t in graph.outputs}
        for node in [n for n in graph.nodes if n.op == "Pad"]:
            label = f"Pad {node.name}"
            if not node.inputs or not node.outputs:
                continue
            out = node.outputs[0]
            consumers = list(out.outputs)
            if not consumers or any(c.op != "Conv" for c in consumers):
                continue  # not a Conv's padding: not a candidate
            reason = self._reason(node, consumers, id(out) in graph_outputs)
            if reason is None:
                spatial = self._spatial_pads(node, consumers[0])
                if spatial is None:
                    reason = "pads are not constant, or pad the batch/channel axes, or are negative"
            if reason:
                self.skip(result, label, reason)
                continue
            for conv in consumers:
                n = len(spatial) // 2
                old = list(conv.attrs.get("pads", [0] * 2 * n))
                conv.attrs["pads"] = [int(a + b) for a, b in zip(old, spatial)]
                conv.inputs[0] = node.inputs[0]
            node.inputs.clear()
            node.outputs.clear()
            result.rewrites += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        result.changed = result.rewrites > 0
        return result

    @staticmethod
    def _reason(node: gs.Node, consumers: list[gs.Node], is_output: bool) -> str | None:
        if is_output:
            return "its output is a graph output"
        mode = node.attrs.get("mode", "constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return f"mode {mode!r} is not zero padding"
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            value = const_value(node.inputs[2])
            if value is None or np.any(value != 0):
                return "pads with a non-zero (or non-constant) value"
        elif float(node.attrs.get("value", 0.0)) != 0.0:
            return "pads with a non-zero value"
        for conv in consumers:
            if conv.inputs[0] is not node.outputs[0] or any(t is node.outputs[0] for t in conv.inputs[1:]):
                return f"Conv {conv.name} reads it as a weight or bias"
            auto_pad = conv.attrs.get("auto_pad", "NOTSET")
            if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", ""):
                return f"Conv {conv.name} uses auto_pad"
        return None

    @staticmethod
    def _spatial_pads(node: gs.Node, conv: gs.Node) -> list[int] | None:
        """Begin pads then end pads of the spatial axes (Conv's ``pads`` layout), or None if not foldable."""
        if len(node.inputs) > 1:
            pads = const_value(node.inputs[1])
        else:  # opset < 11: attribute
            pads = np.asarray(node.attrs.get("pads", []), np.int64) if "pads" in node.attrs else None
        if pads is None:
            return None
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        rank = len(pads) // 2
        if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
            axes = const_value(node.inputs[3])
            if axes is None:
                return None
            r = rank_of(conv)
            if r == 0:
                return None
            full = [0] * (2 * r)
            for i, a in enumerate(np.asarray(axes).reshape(-1)):
                a = int(a) % r
                full[a], full[a + r] = pads[i], pads[i + rank]
            pads, rank = full, r
        if rank < 3 or any(p < 0 for p in pads) or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            return None
        return pads[2:rank] + pads[rank + 2:]


def rank_of(conv: gs.Node) -> int:
    """Rank of a Conv's data input, from its weight (N, C and one axis per kernel dimension)."""
    w = conv.inputs[1]
    return len(w.shape) if getattr(w, "shape", None) is not None else 0
