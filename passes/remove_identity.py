"""Removal of Identity and inference-mode Dropout nodes.

Matches: ``Identity``, and ``Dropout`` whose mask output is unused (a no-op at inference). Rewrites: connects the
consumers to the node's input. When the node's output is a graph output, the producer of its input is made to write
the graph output directly, so output names never change. Skips (with reason) a Dropout whose mask is consumed and
an Identity joining a graph input straight to a graph output. Numerically exact. All targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from edgeq.pass_base import GraphPass, PassContext, PassResult


class RemoveIdentityPass(GraphPass):
    name = "remove_identity"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        ops: tuple[str, ...] = ("Identity", "Dropout")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        graph_outputs = {id(t) for t in graph.outputs}
        for node in list(graph.nodes):
            if node.op not in self.options.ops or not node.inputs or not node.outputs:
                continue
            if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
                self.skip(result, f"Dropout {node.name}", "its mask output is used")
                continue
            src, out = node.inputs[0], node.outputs[0]
            if id(out) in graph_outputs:
                prod = src.inputs[0] if src.inputs else None
                if prod is None or id(src) in graph_outputs or len(src.outputs) > 1:
                    self.skip(result, f"{node.op} {node.name}", "it joins a graph input, a constant or a shared "
                                                                "tensor to a graph output")
                    continue
                idx = [i for i, t in enumerate(prod.outputs) if t is src][0]
                node.outputs.clear()
                prod.outputs[idx] = out
                node.inputs.clear()
            else:
                for consumer in list(out.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is out:
                            consumer.inputs[i] = src
                node.inputs.clear()
                node.outputs.clear()
            result.rewrites += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        result.changed = result.rewrites > 0
        return result
