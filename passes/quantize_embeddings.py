"""Embedding tables (constant ``Gather`` data) stored as int8 rows, dequantized only for the rows gathered.

Matches: ``Gather(data, indices, axis=0)`` where ``data`` is a constant float tensor of rank >= 2 with at least
``min_elements`` elements whose every consumer is such a Gather (token and position embeddings). A table that
anything else also reads (a tied output projection) is skipped: the float copy would stay and the int8 one would
only add bytes. Rewrites: ``data`` becomes an int8 table with one symmetric scale per row (``[V, 1, ...]`` float
constant) times, where it lowers the error, one scale per column (``c_j = max_i |w_ij|^alpha``, alpha in
{0, 0.5, 1} chosen by the table's SQNR: embeddings with a few outlier dimensions, such as Whisper's, go from 30 to
46 dB), and each Gather becomes ``Mul(Mul(Cast(Gather(table_q, indices), float), Gather(scales, indices)), c)``:
only the gathered rows are converted, so the model shrinks by ~4x on these tensors without a full-table
``DequantizeLinear`` on every run (which ONNX Runtime CPU does not constant-fold; MiniLM ran 50 % slower with one).
Skips (with reason): tables whose int8 SQNR stays below ``min_sqnr_db``, tables kept in float by the precision
plan, tables with non-finite values, other axes.
Preconditions: none beyond a constant table (runs after ``insert_qdq`` as a post pass, or on a float graph).
Not numerically exact: each element moves by at most half its row's step (``max|row| / 254``).
Targets: ``ort-cpu`` (post pass); usable on any profile whose runtime executes Gather/Cast/Mul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from edgeq.ir import const_value
from edgeq.pass_base import GraphPass, PassContext, PassResult
from edgeq.quant_math import quantize_weight


class QuantizeEmbeddingsPass(GraphPass):
    name = "quantize_embeddings"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        min_elements: int = 65536  # smaller tables are not worth the extra nodes
        min_sqnr_db: float = 40.0  # a table whose int8 form is less accurate stays float

        def __post_init__(self):
            if self.min_elements < 1:
                raise ValueError(f"min_elements must be >= 1, got {self.min_elements}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        keep_float = set(getattr(ctx.precision, "float_nodes", ()) or ())
        tables: dict[str, tuple[gs.Constant, list[gs.Node]]] = {}
        for node in graph.nodes:
            if node.op == "Gather" and node.inputs and isinstance(node.inputs[0], gs.Constant):
                tables.setdefault(node.inputs[0].name, (node.inputs[0], []))[1].append(node)
        for name, (table, gathers) in tables.items():
            label = f"Gather data {name}"
            shape = tuple(table.shape or ())
            if len(shape) < 2 or int(np.prod(shape)) < self.options.min_elements:
                continue
            if any(c not in gathers for c in table.outputs):
                self.skip(result, label, "the table is also read by other nodes (e.g. a tied output projection)")
                continue
            if any(int(g.attrs.get("axis", 0)) != 0 for g in gathers):
                self.skip(result, label, "gathered along an axis other than 0")
                continue
            if any(g.name in keep_float for g in gathers):
                self.skip(result, label, "kept in float by the precision plan")
                continue
            w = const_value(table)
            if w is None or w.dtype.kind != "f":
                continue
            if not np.all(np.isfinite(w)):
                self.skip(result, label, "the table has non-finite values")
                continue
            q, scale, cols, sqnr = quantize_table(w)
            if sqnr < self.options.min_sqnr_db:
                self.skip(result, label, f"int8 rows reach {sqnr:.1f} dB SQNR < min_sqnr_db {self.options.min_sqnr_db}")
                continue
            q_const = gs.Constant(f"{name}/int8_rows", q)
            if ctx.spill is not None:
                ctx.spill.put(q_const)
            s_const = gs.Constant(f"{name}/row_scales",
                                  scale.astype(w.dtype).reshape((w.shape[0],) + (1,) * (w.ndim - 1)))
            c_const = gs.Constant(f"{name}/column_scales", cols.astype(w.dtype).reshape(w.shape[1:])) \
                if cols is not None else None
            for g in gathers:
                idx, out = g.inputs[1], g.outputs[0]
                rows_q = gs.Variable(f"{out.name}/int8_rows", dtype=np.int8)
                rows_f = gs.Variable(f"{out.name}/rows", dtype=w.dtype)
                scales = gs.Variable(f"{out.name}/row_scales", dtype=w.dtype)
                g.inputs[0] = q_const
                g.outputs[0] = rows_q
                graph.nodes.append(gs.Node("Cast", f"{g.name}/Cast", attrs={"to": helper.np_dtype_to_tensor_dtype(w.dtype)},
                                           inputs=[rows_q], outputs=[rows_f]))
                graph.nodes.append(gs.Node("Gather", f"{g.name}/scales", attrs={"axis": 0},
                                           inputs=[s_const, idx], outputs=[scales]))
                if c_const is None:
                    graph.nodes.append(gs.Node("Mul", f"{g.name}/dequantize", inputs=[rows_f, scales], outputs=[out]))
                else:
                    scaled = gs.Variable(f"{out.name}/row_scaled", dtype=w.dtype)
                    graph.nodes.append(gs.Node("Mul", f"{g.name}/dequantize", inputs=[rows_f, scales],
                                               outputs=[scaled]))
                    graph.nodes.append(gs.Node("Mul", f"{g.name}/column_scales", inputs=[scaled, c_const],
                                               outputs=[out]))
                result.rewrites += 1
            result.notes.setdefault("tables", []).append(
                {"table": name, "shape": list(w.shape), "float_bytes": int(w.nbytes), "int8_bytes": int(q.nbytes),
                 "sqnr_db": round(sqnr, 2), "column_scales": cols is not None})
        if result.rewrites:
            graph.toposort()
        result.changed = result.rewrites > 0
        return result


COLUMN_EXPONENTS = (0.0, 0.5, 1.0)


def quantize_table(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """int8 rows of ``w`` with per-row scales and optional per-column scales (the exponent with the best SQNR):
    ``w ≈ q * row_scale[:, None] * column_scale[None, :]``. Returns (q, row_scale, column_scale or None, SQNR dB)."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    signal = float(np.sum(rows ** 2))
    col_amax = np.abs(rows).max(axis=0)
    best = None
    for alpha in COLUMN_EXPONENTS:
        cols = np.where(col_amax > 0, col_amax, 1.0) ** alpha if alpha else np.ones(rows.shape[1])
        qw = quantize_weight(rows / cols, "int8", axis=0)  # symmetric, one scale per row
        noise = float(np.sum((qw.dequantize() * cols - rows) ** 2))
        sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        if best is None or sqnr > best[3]:
            best = (qw.q.reshape(w.shape), qw.scale.astype(np.float64), cols if alpha else None, sqnr)
    return best
