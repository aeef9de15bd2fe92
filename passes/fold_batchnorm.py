"""BatchNormalization folding into the preceding Conv / ConvTranspose / Gemm.

Matches: ``Conv|ConvTranspose|Gemm -> BatchNormalization`` (inference mode) where the first node's output feeds only
the BatchNormalization, its weight (and bias, if any) and the BN parameters are constants. Rewrites: scales the
weight per output channel by ``gamma / sqrt(var + eps)`` and sets the bias to ``(b - mean) * that + beta``; the BN is
removed and the producer writes the BN's output tensor. Skips (with reason): non-constant parameters, parameters
whose shapes do not match the channels or whose variance is not positive, a shared producer output, training-mode
BN, grouped ConvTranspose. Numerically exact up to float rounding (~1e-6).
All targets (runs during canonicalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgeq.ir import const_value
from edgeq.pass_base import GraphPass, PassContext, PassResult


class FoldBatchNormPass(GraphPass):
    name = "fold_batchnorm"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        producers: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            label = f"BatchNormalization {bn.name}"
            x = bn.inputs[0]
            prod = x.inputs[0] if x.inputs else None
            if prod is None or prod.op not in self.options.producers:
                self.skip(result, label, f"not preceded by {'/'.join(self.options.producers)}")
                continue
            if len(x.outputs) != 1 or x in graph.outputs:
                self.skip(result, label, f"output of {prod.op} {prod.name} is also used elsewhere")
                continue
            if len(bn.outputs) > 1 and any(t.outputs for t in bn.outputs[1:]) or bn.attrs.get("training_mode", 0):
                self.skip(result, label, "training-mode BatchNormalization")
                continue
            params = [const_value(t) for t in bn.inputs[1:5]]
            w = const_value(prod.inputs[1]) if len(prod.inputs) > 1 else None
            b = const_value(prod.inputs[2]) if len(prod.inputs) > 2 else None
            if any(p is None for p in params) or w is None or (len(prod.inputs) > 2 and b is None):
                self.skip(result, label, "BN parameters or the producer's weight/bias are not constant")
                continue
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)
            axis = self._out_axis(prod, w)
            if axis is None:
                self.skip(result, label, f"cannot fold into {prod.op} {prod.name} (grouped transpose or Gemm "
                                         f"with transA/alpha)")
                continue
            channels = w.shape[axis] if w.ndim > axis else -1
            if any(p.shape != (channels,) for p in (gamma, beta, mean, var)) or \
                    (b is not None and b.shape != (channels,)):
                self.skip(result, label, f"parameter shapes do not match the {channels} output channels of "
                                         f"{prod.op} {prod.name}")
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                factor = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
            if not np.isfinite(factor).all():
                self.skip(result, label, "variance + epsilon is not positive (or a parameter is not finite)")
                continue
            shape = [1] * w.ndim
            shape[axis] = -1
            new_w = (w.astype(np.float64) * factor.reshape(shape)).astype(w.dtype)
            base = b.astype(np.float64) if b is not None else np.zeros_like(mean)
            new_b = ((base - mean) * factor + beta).astype(w.dtype)
            prod.inputs[1] = gs.Constant(f"{prod.name}/weight_bnfolded", new_w)
            bias = gs.Constant(f"{prod.name}/bias_bnfolded", new_b)
            if prod.op == "Gemm":
                prod.attrs["beta"] = 1.0
            if len(prod.inputs) > 2:
                prod.inputs[2] = bias
            else:
                prod.inputs.append(bias)
            y = bn.outputs[0]
            bn.outputs.clear()
            bn.inputs.clear()
            prod.outputs[0] = y
            result.rewrites += 1
        result.changed = result.rewrites > 0
        return result

    @staticmethod
    def _out_axis(prod: gs.Node, w: np.ndarray) -> int | None:
        if prod.op == "Conv":
            return 0
        if prod.op == "ConvTranspose":
            return 1 if int(prod.attrs.get("group", 1)) == 1 else None
        if prod.op == "Gemm":
            if prod.attrs.get("transA", 0) or float(prod.attrs.get("alpha", 1.0)) != 1.0:
                return None
            if len(prod.inputs) > 2 and float(prod.attrs.get("beta", 1.0)) != 1.0:
                return None
            return 0 if prod.attrs.get("transB", 0) else 1
        return None
