"""Give the bias of a quantized MatMul the rank of its output, so ONNX Runtime runs the layer as an integer kernel.

Matches: ``MatMul(DequantizeLinear(x), W) -> Add(bias)`` where the MatMul's output has rank >= 3, its only consumer
is the Add, and the bias is a constant vector along the last axis (shape ``[N]``).
Rewrites: the bias constant becomes ``[1, ..., 1, N]`` with the output's rank (a new constant; the old one stays
for its other readers).
Why: for a 3-D input of static shape, ONNX Runtime's ``MatMulAddFusion`` (a basic-level optimisation, ahead of its
Q/DQ fusions) turns ``MatMul -> Add([N])`` into ``Reshape -> Gemm -> Reshape``. The Reshape then separates the
activation's DequantizeLinear from the Gemm, no integer kernel matches, and the layer runs as a float Gemm that
dequantizes its weight on every call: Whisper tiny.en's encoder at ``ort-cpu`` ran 15 of its 20 linear layers so,
slower than FP32. That fusion only takes a bias of shape ``[N]``; with ``[1, 1, N]`` the graph keeps
``DQ -> MatMul -> Add``, which becomes ``MatMulIntegerToFloat`` with the bias folded in.
Preconditions: Q/DQ already inserted (a post pass). Numerically exact: broadcasting ``[N]`` and ``[1, 1, N]`` over
an output of rank 3 gives the same result and shape.
Skips (with a reason): outputs of unknown or 2-D rank (there the fusion needs no Reshape and the Q/DQ fusions still
see the DequantizeLinear), a bias that is not a constant vector.
Targets: ``ort-cpu`` and profiles extending it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.ir import const_value, unique_name
from edgeq.pass_base import GraphPass, PassContext, PassResult


class PinMatMulBiasPass(GraphPass):
    name = "pin_matmul_bias"  # no options (GraphPass.Options)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for mm in [n for n in graph.nodes if n.op == "MatMul"]:
            x = mm.inputs[0]
            if not x.inputs or x.inputs[0].op != "DequantizeLinear":
                continue  # not an integer layer: nothing for ONNX Runtime to fuse
            y = mm.outputs[0]
            if len(y.outputs) != 1 or y.outputs[0].op != "Add" or y in graph.outputs:
                continue
            add = y.outputs[0]
            label = f"MatMul {mm.name}"
            rank = len(y.shape) if y.shape is not None else None
            if rank is None or rank < 3:
                self.skip(result, label, f"output rank {rank if rank is not None else 'unknown'}: the bias needs no "
                                         f"change")
                continue
            idx = 1 if add.inputs[0] is y else 0
            bias = add.inputs[idx]
            value = const_value(bias)
            if value is None or value.ndim != 1:
                self.skip(result, label, f"bias of Add {add.name} is not a constant vector")
                continue
            add.inputs[idx] = gs.Constant(unique_name(graph, f"{bias.name}/rank{rank}"),
                                          np.ascontiguousarray(value.reshape((1,) * (rank - 1) + (-1,))))
            result.rewrites += 1
        result.changed = result.rewrites > 0
        return result
