"""Constant folding, including shape subgraphs.

Matches: nodes whose inputs are all constants (and Shape/Size of tensors with static shapes). Rewrites: replaces
them by their computed value (evaluated with ONNX Runtime by onnx-graphsurgeon). Tensors larger than
``size_threshold`` bytes are not materialised, so folding never multiplies model size (e.g. a broadcast of a weight).
Precondition: a valid graph. Numerically exact up to float evaluation order. All targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from edgeq.ir import fold_static_shapes, quiet_onnxruntime
from edgeq.pass_base import GraphPass, PassContext, PassResult


class FoldConstantsPass(GraphPass):
    name = "fold_constants"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        fold_shapes: bool = True
        size_threshold: int = 64 * 1024 * 1024

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        before = len(graph.nodes)
        gs_logger = logging.getLogger("onnx_graphsurgeon")
        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
        quiet_onnxruntime()
        if self.options.fold_shapes:
            fold_static_shapes(graph)
        try:
            graph.fold_constants(fold_shapes=self.options.fold_shapes, size_threshold=self.options.size_threshold,
                                 error_ok=True, flatten_subgraphs=False)
        except Exception as exc:  # folding is an optimisation; an evaluator failure must not stop the job
            self.skip(result, "graph", f"constant folding stopped early: {str(exc).splitlines()[0][:200]}")
        graph.cleanup(remove_unused_graph_inputs=False)
        result.rewrites = before - len(graph.nodes)
        result.changed = result.rewrites != 0
        del gs_logger
        return result
