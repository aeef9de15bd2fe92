"""Shape and type inference that survives symbolic dimensions.

Matches: every tensor of the graph. Rewrites: fills in dtype and shape (symbolic dims kept as names) using ONNX's
inference with data propagation. Where inference fails for a node (custom ops, inconsistent models), the pass keeps
what it learnt so far and records each tensor it could not type, instead of failing; calibration later fills in
dtypes by running the model. Precondition: a valid graph. Numerically exact (changes no values). All targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from edgeq.ir import to_graph
from edgeq.pass_base import GraphPass, PassContext, PassResult


class InferShapesPass(GraphPass):
    name = "infer_shapes"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        data_prop: bool = True
        strict: bool = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        before = _typed(graph)
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=self.options.strict,
                                                         data_prop=self.options.data_prop)
        except Exception as exc:  # inference errors are model-specific; degrade, don't fail
            self.skip(result, "graph", f"ONNX shape inference failed: {str(exc).splitlines()[0][:200]}")
            inferred = None
        if inferred is not None:
            known = {vi.name: vi for vi in inferred.graph.value_info}
            known.update({vi.name: vi for vi in inferred.graph.output})
            tensors = graph.tensors()
            fresh = to_graph(inferred).tensors()
            for name, tensor in tensors.items():
                if isinstance(tensor, gs.Constant) or name not in known or name not in fresh:
                    continue
                src = fresh[name]
                if tensor.dtype is None and src.dtype is not None:
                    tensor.dtype = src.dtype
                    result.rewrites += 1
                if tensor.shape is None and src.shape is not None:
                    tensor.shape = src.shape
        untyped = [n for n, t in graph.tensors().items()
                   if n and not isinstance(t, gs.Constant) and t.dtype is None]
        for name in untyped[:50]:
            self.skip(result, name, "dtype could not be inferred statically (taken from calibration instead)")
        if len(untyped) > 50:
            self.skip(result, "graph", f"{len(untyped) - 50} more tensors without inferred dtype")
        result.changed = _typed(graph) != before
        result.notes["untyped_tensors"] = len(untyped)
        return result


def _typed(graph: gs.Graph) -> int:
    return sum(1 for t in graph.tensors().values() if t.dtype is not None)
