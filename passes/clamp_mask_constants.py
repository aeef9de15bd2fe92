"""Clamp attention-mask constants to a magnitude every number format on the target can hold.

Matches: float constants with non-finite values or magnitudes of at least ``limit`` (default: the profile's
``activations.max_abs_range``) whose consumers are all elementwise mask arithmetic (``MASK_PROPAGATING``), e.g. the
``finfo(float32).min`` in Hugging Face's extended mask ``(1 - mask) * min``. Rewrites: clips them to
``[-limit, limit]``. Why: whole-graph targets run what stays unquantized in fp16, where ``finfo(float32).min`` is
``-inf`` and ``0 * -inf`` is NaN, and a uint16 ``DequantizeLinear`` of it overflows float32; both wipe out every
attention row, not only the masked positions.
Skips (with a reason): such constants that also feed other ops (they are data, not a mask). Numerics: exact where
the mask keeps a position (``0 * c == 0``); a masked score becomes ``score - limit`` instead of ``score + min``,
whose softmax weight is still exactly 0 in float32 for ``limit >= 1e4`` and scores below ~1e4.
Targets: QNN (qnn, qnn-a16w8); runs before calibration so the ranges see the clamped values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.op_tables import MASK_PROPAGATING
from edgeq.pass_base import GraphPass, PassContext, PassResult


class ClampMaskConstantsPass(GraphPass):
    name = "clamp_mask_constants"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        limit: float | None = None  # None: the profile's activations.max_abs_range

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        limit = self.options.limit
        if limit is None:
            limit = ctx.profile.activations.max_abs_range if ctx.profile is not None else 1.0e4
        clamped: dict[str, float] = {}
        for name, t in graph.tensors().items():
            if not isinstance(t, gs.Constant) or t.values.dtype.kind != "f" or not t.values.size:
                continue
            v = np.asarray(t.values)
            if np.isfinite(v).all() and np.abs(v).max() <= limit:
                continue
            users = {n.op for n in t.outputs}
            if not users or not users <= MASK_PROPAGATING:
                others = ", ".join(sorted(users - MASK_PROPAGATING)) or "nothing"
                self.skip(result, name, f"holds {_extreme(v):.3g} but also feeds {others}; not a mask constant")
                continue
            t.values = np.clip(np.nan_to_num(v, nan=0.0, posinf=limit, neginf=-limit), -limit, limit).astype(v.dtype)
            clamped[name] = _extreme(v)
            result.rewrites += 1
        result.changed = result.rewrites > 0
        result.notes.update(limit=float(limit), clamped=clamped)
        return result


def _extreme(v: np.ndarray) -> float:
    flat = v.ravel()
    return float(flat[np.argmax(np.where(np.isnan(flat), -np.inf, np.abs(flat)))])
