"""Blockwise 4-bit weight DequantizeLinear + MatMul -> ONNX Runtime's ``com.microsoft.MatMulNBits``.

Matches: ``MatMul(A, DequantizeLinear(W_q, scale, zero_point, axis=0, block_size=B))`` where ``W_q`` is a constant
int4/uint4 ``[K, N]`` weight quantized in blocks of ``B`` along K (as ``insert_qdq`` emits for int4 weight-only
profiles) and ``B`` is a power of two >= 16. Rewrites: one ``MatMulNBits`` node whose packed weight is
``[N, ceil(K/B), B/2]`` uint8 (two 4-bit values per byte, low nibble first, unsigned with the zero point folded
in), scales ``[N * ceil(K/B)]`` and uint8 zero points. Skips (with reason): other bit widths, per-channel or
per-tensor weights, non-constant weights, a DQ feeding something other than MatMul. Precondition: ``insert_qdq``
ran with ``weights.block_size``. Numerically exact with respect to the QDQ model (same integers, same scales) up
to float accumulation order. Targets: ONNX Runtime CPU/GPU (``ort-int4``, as a post pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.ir import const_value
from edgeq.pass_base import GraphPass, PassContext, PassResult


class MatMulNBitsPass(GraphPass):
    name = "to_matmulnbits"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        accuracy_level: int = 0  # MatMulNBits' compute precision for A (0: same as A's type)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for mm in [n for n in graph.nodes if n.op == "MatMul"]:
            dq = mm.inputs[1].inputs[0] if mm.inputs[1].inputs else None
            if dq is None or dq.op != "DequantizeLinear":
                continue
            label = f"MatMul {mm.name}"
            block = int(dq.attrs.get("block_size", 0))
            narrow = getattr(dq.inputs[0], "edgeq_narrow_dtype", None)
            if narrow is None and isinstance(dq.inputs[0], gs.Constant):
                narrow = str(np.asarray(dq.inputs[0].values).dtype)
            if narrow not in ("int4", "uint4") or not block:
                self.skip(result, label, "weight is not blockwise 4-bit")
                continue
            if block < 16 or block & (block - 1):
                self.skip(result, label, f"block size {block} is not a power of two >= 16")
                continue
            if int(dq.attrs.get("axis", 1)) != 0 or any(c.op != "MatMul" for c in dq.outputs[0].outputs):
                self.skip(result, label, "blocks are not along K of a [K, N] weight used only by MatMul")
                continue
            q = const_value(dq.inputs[0])
            scale = const_value(dq.inputs[1])
            zp = const_value(dq.inputs[2]) if len(dq.inputs) > 2 else np.zeros_like(scale, dtype=np.int8)
            if q is None or scale is None or zp is None or q.ndim != 2:
                self.skip(result, label, "weight, scale or zero point is not a 2-D constant")
                continue
            packed, scales, zps = pack_nbits(q.astype(np.int32), scale, zp.astype(np.int32), block,
                                             signed=narrow == "int4")
            k, n = q.shape
            out = mm.outputs[0]
            base = mm.inputs[1].name
            node = gs.Node("MatMulNBits", f"{mm.name}/MatMulNBits", domain="com.microsoft",
                           attrs={"K": k, "N": n, "bits": 4, "block_size": block,
                                  "accuracy_level": self.options.accuracy_level},
                           inputs=[mm.inputs[0], gs.Constant(f"{base}/nbits", packed),
                                   gs.Constant(f"{base}/nbits_scales", scales),
                                   gs.Constant(f"{base}/nbits_zero_points", zps)],
                           outputs=[out])
            mm.outputs.clear()
            mm.inputs.clear()
            graph.nodes.append(node)
            result.rewrites += 1
        if result.rewrites:
            graph.import_domains = list(getattr(graph, "import_domains", None) or [])
            if not any(d.domain == "com.microsoft" for d in graph.import_domains):
                import onnx

                graph.import_domains.append(onnx.helper.make_opsetid("com.microsoft", 1))
        result.changed = result.rewrites > 0
        return result


def pack_nbits(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int, *, signed: bool):
    """Pack ``[K, N]`` 4-bit integers blockwise along K into MatMulNBits' ``[N, blocks, block/2]`` uint8 layout."""
    k, n = q.shape
    blocks = -(-k // block)
    offset = 8 if signed else 0
    u = np.full((blocks * block, n), offset, dtype=np.int32)
    u[:k] = q + offset
    u = u.T.reshape(n, blocks, block)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    scales = np.ascontiguousarray(scale.T).reshape(-1).astype(np.float32)  # scale is [blocks, N]
    z = (zp.T + offset).astype(np.uint8)  # [N, blocks]
    if blocks % 2:
        z = np.concatenate([z, np.full((n, 1), offset, np.uint8)], axis=1)
    zps = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return packed, scales, zps
