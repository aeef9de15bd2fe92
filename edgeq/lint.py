"""``edgeq check``: static legality of a (quantized) model for a target, each finding with node and rule.

Errors make the model illegal or numerically wrong on the target (exit 1); warnings are legal but cost accuracy
or speed (e.g. a layer left in float). Rules are chosen by the profile's compile backend.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearAdd",
                           "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool",
                           "QLinearGlobalAveragePool", "QLinearConcat", "DynamicQuantizeLinear",
                           "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention"})
COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_TYPE = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity:<7} {self.rule:<28} {self.node}: {self.message}"


@dataclass
class LintResult:
    target: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"target": self.target, "passed": self.passed, "errors": len(self.errors),
                "warnings": len(self.warnings), "by_rule": dict(Counter(f.rule for f in self.findings)),
                "findings": [f.__dict__ for f in self.findings]}


class _Model:
    def __init__(self, model: onnx.ModelProto, base_dir: str = ""):
        self.model = model
        self.base_dir = base_dir  # where external tensors (large models' per-channel scales) are read from
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        for n in self.g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.inits[n.output[0]] = n.attribute[0].t
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return numpy_helper.to_array(t, self.base_dir) if t is not None and t.data_type not in (22, 23) else None

    def dtype(self, name: str) -> str:
        t = self.inits.get(name)
        return _TYPE.get(t.data_type, "?") if t is not None else "?"

    def fed_by_dq(self, name: str) -> bool:
        p = self.producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    def qdq_dtype(self, node: onnx.NodeProto) -> str:
        if len(node.input) > 2 and node.input[2]:
            return self.dtype(node.input[2])
        if node.op_type == "DequantizeLinear" and node.input[0] in self.inits:
            return self.dtype(node.input[0])
        return "uint8"

    def is_weight_dq(self, node: onnx.NodeProto) -> bool:
        return node.op_type == "DequantizeLinear" and node.input[0] in self.inits

    def n_scales(self, node: onnx.NodeProto) -> int:
        s = self.const(node.input[1]) if len(node.input) > 1 else None
        return int(s.size) if s is not None else 1


def check_model(model: onnx.ModelProto, profile, *, path: str = "") -> LintResult:
    """Lint ``model`` for ``profile``'s backend; ``path``: the file it was loaded from, whose folder holds any
    external data that was not loaded."""
    backend = profile.compile.backend
    m = _Model(model, str(Path(path).parent) if path else "")
    result = LintResult(target=profile.name)
    rules = {"tensorrt": _tensorrt, "qnn": _qnn, "coreml": _coreml, "ort": _ort}.get(backend)
    if rules is not None:
        rules(m, profile, result.findings)
    _common(m, profile, result.findings)
    return result


def _common(m: _Model, profile, out: list[Finding]) -> None:
    for n in m.g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            s = m.const(n.input[1]) if len(n.input) > 1 else None
            if s is not None and (not np.isfinite(s).all() or (s <= 0).any()):
                out.append(Finding("qdq-bad-scale", n.name, "scale is zero, negative or not finite"))


def _tensorrt(m: _Model, profile, out: list[Finding]) -> None:
    legal = {"int8", "float8e4m3fn", "int4"}
    for n in m.g.node:
        if n.op_type in QOPERATOR_OPS:
            out.append(Finding("trt-qoperator", n.name, f"{n.op_type} is a QOperator op; TensorRT needs Q/DQ form"))
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        dtype = m.qdq_dtype(n)
        if dtype not in legal or (dtype == "int4" and not m.is_weight_dq(n)):
            out.append(Finding("trt-qdq-dtype", n.name, f"{dtype} Q/DQ; TensorRT takes int8, fp8 and "
                                                         f"int4 (weights only)"))
        zp = m.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None and zp.dtype.kind in "iu" and np.any(zp != 0):
            out.append(Finding("trt-zero-point", n.name, "non-zero zero point; TensorRT is symmetric only"))
        if not m.is_weight_dq(n) and m.n_scales(n) > 1 and n.op_type == "QuantizeLinear":
            out.append(Finding("trt-per-axis-activation", n.name, "per-axis quantization of an activation"))
    quantized = any(n.op_type == "DequantizeLinear" for n in m.g.node)
    for n in m.g.node:
        if n.op_type in COMPUTE and quantized:
            missing = [i for i in n.input[:2] if i and not m.fed_by_dq(i)]
            if missing:
                out.append(Finding("trt-unquantized-input", n.name, f"{n.op_type} input(s) {', '.join(missing)} "
                                   "have no Q/DQ; the layer runs in float", "warning"))
        if n.op_type == "Add":
            direct = [m.producer.get(i) for i in n.input]
            if any(p is not None and p.op_type in ("Conv", "ConvTranspose") for p in direct):
                continue  # TensorRT fuses that Conv with the Add; the other input may carry Q/DQ
            for i in n.input:
                dq = m.producer.get(i)
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                q = m.producer.get(dq.input[0])
                src = m.producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
                if src is not None and src.op_type in ("Conv", "ConvTranspose"):
                    out.append(Finding("trt-residual-fusion", n.name, f"Q/DQ between {src.op_type} {src.name} and "
                                       "the residual Add, and no input comes straight from a Conv: TensorRT "
                                       "cannot fuse Conv+Add; leave one Conv output unquantized into the Add"))
                    break


def _qnn_supported() -> frozenset[str]:
    try:
        from edgeq.backends.qnn import HTP_SUPPORTED_OPS

        return frozenset(HTP_SUPPORTED_OPS)
    except (ImportError, AttributeError):
        return frozenset()


def _qnn(m: _Model, profile, out: list[Finding]) -> None:
    import onnx_graphsurgeon as gs

    from edgeq.passes.insert_qdq import erf_gelu_interiors

    supported = _qnn_supported()
    fused_gelu, _ = erf_gelu_interiors(gs.import_onnx(m.model)) if any(n.op_type == "Erf" for n in m.g.node) \
        else (set(), set())
    for vi in m.g.input:
        if vi.name in m.inits:
            continue
        if any(not d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim):
            out.append(Finding("qnn-dynamic-shape", vi.name, "dynamic input shape; QNN HTP needs static shapes "
                               "(re-export with fixed shapes or use 'edgeq compile --input-shape')"))
    for n in m.g.node:
        if n.op_type in QOPERATOR_OPS:
            out.append(Finding("qnn-qoperator", n.name, f"{n.op_type} is a QOperator op; QNN EP needs Q/DQ form"))
            continue
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            dtype = m.qdq_dtype(n)
            if not m.is_weight_dq(n) and dtype not in ("uint8", "uint16"):
                out.append(Finding("qnn-activation-dtype", n.name, f"{dtype} activation; QNN HTP takes uint8/uint16"))
            if m.is_weight_dq(n) and m.n_scales(n) > 1:
                users = [c.op_type for c in m.consumers.get(n.output[0], [])]
                if any(u in ("MatMul",) for u in users):
                    out.append(Finding("qnn-per-channel-matmul", n.name, "per-channel weight feeding MatMul; QNN "
                                       "supports per-channel only on Conv/ConvTranspose (and Gemm)"))
            continue
        if n.domain not in ("", "ai.onnx"):
            out.append(Finding("qnn-unsupported-op", n.name, f"{n.domain}.{n.op_type} is a custom/contrib op "
                               "that QNN HTP does not run"))
            continue
        if n.name in fused_gelu:
            continue  # QNN fuses the Erf-form GELU into one op
        if supported and n.op_type not in supported and n.op_type != "Constant":
            out.append(Finding("qnn-unsupported-op", n.name, f"{n.op_type} is not supported by QNN HTP; it would "
                               "fall back to the CPU"))
        if n.op_type == "LayerNormalization":
            axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
            if axis not in (-1,):
                out.append(Finding("qnn-layernorm-axis", n.name, f"LayerNormalization over axis {axis}; QNN "
                                   "normalises over the last axis only", "warning"))
        if n.op_type in COMPUTE or n.op_type in ("Softmax", "LayerNormalization", "Gelu", "Sigmoid", "Tanh", "Add",
                                                 "Mul"):
            float_in = [i for i in n.input if i and i not in m.inits and not m.fed_by_dq(i)
                        and _is_float_tensor(m, i)]
            if float_in and any(n.op_type != "Constant" for _ in [0]):
                out.append(Finding("qnn-float-op", n.name, f"{n.op_type} reads unquantized {', '.join(float_in)}; "
                                   "it runs in fp16 on HTP or falls back to the CPU", "warning"))


def _is_float_tensor(m: _Model, name: str) -> bool:
    p = m.producer.get(name)
    if p is None:
        for vi in m.g.input:
            if vi.name == name:
                return vi.type.tensor_type.elem_type in (1, 10, 11)
        return False
    return p.op_type not in ("Shape", "Cast", "Equal", "Less", "Greater", "Not", "ArgMax", "NonZero", "Range",
                             "ConstantOfShape", "Size") or (p.op_type == "Cast" and any(
                                 a.name == "to" and a.i in (1, 10, 11) for a in p.attribute))


def _coreml(m: _Model, profile, out: list[Finding]) -> None:
    try:
        from edgeq.backends.coreml import SUPPORTED_OPS
    except (ImportError, AttributeError):
        SUPPORTED_OPS = None
    if SUPPORTED_OPS is None:
        return
    unsupported = Counter()
    for n in m.g.node:
        if n.op_type not in SUPPORTED_OPS and n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            unsupported[n.op_type] += 1
            out.append(Finding("coreml-unsupported-op", n.name, f"{n.op_type} has no Core ML lowering in edgeq"))


def _ort(m: _Model, profile, out: list[Finding]) -> None:
    for n in m.g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not m.is_weight_dq(n):
            if m.qdq_dtype(n) == "int8":
                out.append(Finding("ort-int8-activation", n.name, "int8 activations run on ORT's slow S8S8 CPU "
                                   "path; uint8 activations use the fast U8S8 kernels", "warning"))


def format_result(result: LintResult) -> str:
    lines = [str(f) for f in result.findings]
    lines.append(f"{result.target}: {'legal' if result.passed else 'NOT legal'} "
                 f"({len(result.errors)} errors, {len(result.warnings)} warnings)")
    return "\n".join(lines)
