"""Compute in float16, keeping float32 islands where float16 would overflow or where the profile asks for float32.

Matches: every default-domain node whose ONNX schema ties a float32 output to its float32 inputs through one type
parameter that admits float16 (``Conv``, ``MatMul``, ``Add``, ``Softmax``, ``Resize``'s data, ...). Rewrites: those
inputs and outputs to float16 — float32 constants get float16 copies, values coming from float32 parts of the
graph pass through ``Cast(to=FLOAT16)``, values leaving for float32 parts (and graph outputs) through
``Cast(to=FLOAT)``; graph inputs and outputs keep their float32 types. Inputs whose type the schema fixes or leaves
free (``Resize`` scales, ``Cast``, ``ConstantOfShape``) are untouched.

Kept in float32, each with a reason in the report (the *islands*):
- op types in ``keep_ops`` (normalisations, whose variance of large activations overflows float16) and nodes the
  precision plan keeps in float;
- nodes with a tensor whose calibrated magnitude exceeds ``max_abs`` (float16's largest value is 65504; the
  default leaves 4x headroom for data beyond the calibration set) or a constant float16 cannot hold;
- integer layers and their neighbours: nodes reading a dequantized activation or feeding a ``QuantizeLinear``
  (TensorRT fuses those patterns only without a Cast in between), and Q/DQ nodes themselves. A dequantized
  *weight* (weight-only INT8/INT4, opset >= 19) does not stop a layer: its ``DequantizeLinear`` gets a float16
  scale and feeds the layer directly (W8A16 / W4A16, TensorRT's weight-only form);
- ops without a float16 schema, other domains, nodes with subgraphs, and nodes whose tensor types are unknown.

Preconditions: shape inference ran (tensor types are known); calibration statistics give the ranges (without them
only the op and constant rules apply, and a note says so). Runs after ``insert_qdq`` (``post_passes``), so a
profile can combine INT8 layers with float16 for the rest. Not exact: every converted value is rounded to float16
(relative error <= 2^-11 per value). ONNX Runtime CPU runs float16 nodes it has no kernel for in float32 between
inserted casts, which simulates float16 storage with float32 arithmetic (TensorRT and Core ML accumulate float16
matrix products in float32 too). Targets: tensorrt-fp16, coreml-fp16, and any profile listing it in
``post_passes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgeq.ir import const_value
from edgeq.pass_base import GraphPass, PassContext, PassResult

FP16_MAX = 65504.0
_NEVER = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike"})
_INTEGER_LAYERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})  # with DQ inputs: run in integers


@dataclass(frozen=True)
class _Plan:
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


class ConvertFloat16Pass(GraphPass):
    name = "to_fp16"
    needs_stats = True

    @dataclass(frozen=True, kw_only=True)
    class Options:
        keep_ops: tuple[str, ...] = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")
        max_abs: float = 16384.0  # a tensor calibrated beyond this magnitude keeps its node in float32
        # "all": every eligible node; "overrides": only nodes a profile override gives precision fp16 (what edgeq
        # runs by itself when a profile has fp16 overrides but no to_fp16 pass)
        scope: str = "all"

        def __post_init__(self):
            object.__setattr__(self, "keep_ops", tuple(self.keep_ops))
            if not 0 < self.max_abs <= FP16_MAX:
                raise ValueError(f"max_abs must be in (0, {FP16_MAX:g}], got {self.max_abs}")
            if self.scope not in ("all", "overrides"):
                raise ValueError(f"scope must be all or overrides, got {self.scope!r}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        stats = ctx.stats.tensors if ctx.stats is not None else {}
        if ctx.stats is None:
            result.notes["ranges"] = "no calibration statistics: islands from op types and constants only"
        keep_float = set(getattr(ctx.precision, "float_nodes", ()) or ())
        overrides = list(getattr(ctx.profile, "overrides", ()) or ())
        plans: dict[int, _Plan] = {}  # by id(node): graphsurgeon nodes are not hashable
        for node in graph.nodes:
            label = f"{node.op} {node.name}"
            asked = {ov.precision for ov in overrides if ov.matches(node.op, node.name, [t.name for t in node.outputs])}
            if self.options.scope == "overrides" and "fp16" not in asked:
                continue
            if "float" in asked:
                self.skip(result, label, "kept in float32 by a profile override (--keep-float)")
                continue
            plan, reason = self._plan(node, graph, stats, keep_float - ({node.name} if "fp16" in asked else set()))
            if plan is not None:
                plans[id(node)] = plan
            elif reason:
                self.skip(result, label, reason)
        result.rewrites = len(plans)
        if plans:
            _rewrite(graph, plans, ctx.spill)
            result.changed = True
        result.notes.update(float16_nodes=len(plans), float32_islands=len(result.skipped))
        return result

    def _plan(self, node: gs.Node, graph: gs.Graph, stats: dict, keep_float: set) -> tuple[_Plan | None, str]:
        if node.op in _NEVER or (node.domain or "") not in ("", "ai.onnx"):
            return None, ""
        if node.op in self.options.keep_ops:
            return None, f"{node.op} is in keep_ops"
        if node.name in keep_float:
            return None, "kept in float by the precision plan"
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return None, "has a subgraph"
        params = _tied_params(node, int(graph.opset))
        if params is None:
            return None, ""
        inputs = [i for i, p in enumerate(params[0]) if p and i < len(node.inputs) and node.inputs[i].name]
        outputs = [i for i, p in enumerate(params[1]) if p and i < len(node.outputs) and node.outputs[i].name]
        tied = [node.inputs[i] for i in inputs] + [node.outputs[i] for i in outputs]
        types = [_dtype(t, stats) for t in tied]
        if not outputs or any(d is None for d in types):
            return None, "tensor types unknown" if outputs else ""
        if any(d != np.float32 for d in types):
            return None, ""  # not float32 data (integer arithmetic, or already another float type)
        dequantized = [t for t in (node.inputs[i] for i in inputs) if t.inputs and t.inputs[0].op == "DequantizeLinear"]
        if any(not _is_weight_dq(t, int(graph.opset)) for t in dequantized):
            return None, "" if node.op in _INTEGER_LAYERS else "reads a dequantized value"
        if any(c.op == "QuantizeLinear" for i in outputs for c in node.outputs[i].outputs):
            return None, "feeds a QuantizeLinear"
        for t in tied:
            if isinstance(t, gs.Constant):
                v = const_value(t)  # large models: read from disk, not kept
                finite = np.abs(v[np.isfinite(v)]) if v.size else v
                if finite.size and finite.max() > FP16_MAX:  # inf stays inf; a huge finite value would become it
                    return None, f"constant {t.name} holds {float(finite.max()):.3g}, beyond float16's " \
                                 f"{FP16_MAX:g}"
            else:
                peak = _finite_peak(stats.get(t.name))
                if peak > self.options.max_abs:
                    return None, f"{t.name} reaches {peak:.3g} on the calibration data (> max_abs " \
                                 f"{self.options.max_abs:g}; float16 max {FP16_MAX:g})"
        return _Plan(tuple(inputs), tuple(outputs)), ""


def _tied_params(node: gs.Node, opset: int) -> tuple[list[bool], list[bool]] | None:
    """Per formal input and output: whether its type parameter is shared by an input and an output and admits
    float16 (so the node computes in whatever float type its data has). None: no such parameter."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    ins = _expand(schema.inputs, len(node.inputs))
    outs = _expand(schema.outputs, len(node.outputs))
    shared = {p for p in ins if p in outs and "tensor(float16)" in allowed.get(p, ())}
    if not shared:
        return None
    return [p in shared for p in ins], [p in shared for p in outs]


def _expand(formals, count: int) -> list[str]:
    types = []
    for i in range(count):
        f = formals[min(i, len(formals) - 1)] if formals else None
        if f is None or (i >= len(formals) and f.option != onnx.defs.OpSchema.FormalParameterOption.Variadic):
            types.append("")
        else:
            types.append(f.type_str)
    return types


def _finite_peak(obs) -> float:
    """Largest finite magnitude a tensor reached; infinities the float32 model itself produces (a -inf causal
    mask) are infinities in float16 too, so they do not count (the histogram covers the finite values)."""
    if obs is None or obs.count == 0:
        return 0.0
    peak = max(abs(obs.min), abs(obs.max))
    if np.isfinite(peak):
        return peak
    nonzero = np.flatnonzero(obs.hist)
    edges = obs.edges()
    return float(max(abs(edges[nonzero[0]]), abs(edges[nonzero[-1] + 1]))) if nonzero.size else 0.0


def _dtype(t: gs.Tensor, stats: dict):
    if isinstance(t, gs.Constant):
        return np.dtype(t.dtype).type
    if t.dtype is not None:
        return np.dtype(t.dtype).type
    obs = stats.get(t.name)
    return np.dtype(obs.dtype).type if obs is not None and obs.dtype else None


def _is_weight_dq(t: gs.Tensor, opset: int) -> bool:
    """``t`` is a dequantized constant (weight-only quantization) whose DequantizeLinear can output float16
    directly (a float16 scale needs opset 19): the layer then runs as W8A16 / W4A16."""
    dq = t.inputs[0]
    return opset >= 19 and isinstance(dq.inputs[0], gs.Constant) and len(dq.inputs) > 1 and \
        isinstance(dq.inputs[1], gs.Constant)


def _reads_as_float32(consumer: gs.Node, t: gs.Tensor, plans: dict[int, _Plan]) -> bool:
    plan = plans.get(id(consumer))
    return any(x is t and (plan is None or j not in plan.inputs) for j, x in enumerate(consumer.inputs))


def _rewrite(graph: gs.Graph, plans: dict[int, _Plan], spill=None) -> None:
    half: dict[str, gs.Tensor] = {}  # float32 tensor name -> its float16 twin
    new_nodes: list[gs.Node] = []
    graph_outputs = {id(t) for t in graph.outputs}
    converted = [(node, plans[id(node)]) for node in graph.nodes if id(node) in plans]
    for node, plan in converted:
        for i in plan.outputs:
            t = node.outputs[i]
            t16 = gs.Variable(f"{t.name}/fp16", dtype=np.float16, shape=t.shape)
            node.outputs[i] = t16
            half[t.name] = t16
            if id(t) in graph_outputs or any(_reads_as_float32(c, t, plans) for c in t.outputs):
                new_nodes.append(gs.Node("Cast", f"{t.name}/to_fp32", attrs={"to": onnx.TensorProto.FLOAT},
                                         inputs=[t16], outputs=[t]))
    for node, plan in converted:
        for i in plan.inputs:
            t = node.inputs[i]
            if t.name not in half:
                dq = t.inputs[0] if t.inputs and t.inputs[0].op == "DequantizeLinear" else None
                if dq is not None and id(t) not in graph_outputs and \
                        not any(_reads_as_float32(c, t, plans) for c in t.outputs):
                    scale = dq.inputs[1]  # the weight's DequantizeLinear outputs float16 itself: no Cast
                    dq.inputs[1] = gs.Constant(f"{scale.name}/fp16", const_value(scale).astype(np.float16))
                    t.dtype = np.float16
                    half[t.name] = t
                elif isinstance(t, gs.Constant):
                    half[t.name] = gs.Constant(f"{t.name}/fp16", const_value(t).astype(np.float16))
                    if spill is not None:  # large models: the float16 weights go to disk as they are made
                        spill.put(half[t.name])
                else:
                    t16 = gs.Variable(f"{t.name}/fp16", dtype=np.float16, shape=t.shape)
                    new_nodes.append(gs.Node("Cast", f"{t.name}/to_fp16", attrs={"to": onnx.TensorProto.FLOAT16},
                                             inputs=[t], outputs=[t16]))
                    half[t.name] = t16
            node.inputs[i] = half[t.name]
    graph.nodes.extend(new_nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
