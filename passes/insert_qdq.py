"""Q/DQ insertion driven by the target profile.

Matches: the inputs (and, for whole-graph targets, the outputs) of the ops the profile quantizes. Rewrites:
* activations: ``T -> QuantizeLinear -> DequantizeLinear -> consumer`` with per-tensor scale/zero point from the
  calibration statistics and the profile's observer; one pair per tensor, shared by its quantized consumers, while
  float consumers keep reading ``T``. Outputs of scale-sharing ops (Reshape, Transpose, MaxPool...) reuse their
  input's parameters; the profile's fixed-scale ops (Sigmoid, Tanh) get fixed output parameters.
* weights: constants become integer initializers + ``DequantizeLinear`` (per-channel on the output-channel axis,
  per-tensor, or blockwise for int4); biases become int32 with ``scale = s_input * s_weight`` when asked (a weight
  channel whose bias would not fit in 31 bits gets a wider scale instead of a clipped bias). With input moments
  (``weights.rounding: gptq``) and ``weights.bias_correction``, each layer's mean output error on the calibration
  inputs, ``(Q - W) x̄``, is subtracted from its bias: the Conv/Gemm bias (one is added when missing) or the constant
  of the Add after a MatMul (:func:`edgeq.rounding.bias_shift`).
* whole-graph targets: an op whose only consumer is a Relu/Clip takes that activation's output range, since the
  target fuses the two and quantizes once.
* ``placement.quantize_outputs_of`` (ort-cpu): those ops' outputs get a Q/DQ pair that every consumer reads (but
  a layer kept in float, which reads the float value), so ONNX Runtime fuses DQ -> op -> Q into an integer kernel; an elementwise op listed there (Add) only where all its
  inputs are such quantized outputs (a CNN's residual join -> QLinearAdd, not a transformer's residual stream).
Skips, with a reason per tensor: non-float and shape/index tensors, attention-mask arithmetic with huge constants,
tensors whose calibrated magnitude exceeds ``activations.max_abs_range``, tensors that would mostly round to zero
(more than ``activations.max_underflow`` of their magnitude below half a step; whole-graph targets widen them to
16 bits instead when the opset allows; elsewhere a tensor summed only by weight layers is held to
``activations.max_underflow_other`` and one read only by elementwise ops is not checked), tensors without
statistics, nodes kept in float by the profile or overrides, a small layer reading the network input
(``placement.float_input_layers``). Preconditions: canonicalised float graph without Q/DQ
nodes; opset high enough for the dtypes (the pipeline upgrades it). Not numerically exact: the quantization error is
bounded by the scales.
Targets: all (placement modes ``inputs`` for TensorRT/ORT-CPU, ``all`` for QNN, ``weights`` for Core ML; ``none``
inserts nothing, for float16 profiles).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from edgeq.errors import UnsupportedModelError
from edgeq.ir import const_value, has_const_value, name_nodes, narrow_constant, tensor_dtype
from edgeq.op_tables import (BIAS_INPUTS, MASK_PROPAGATING, NEVER_QUANTIZED, SCALE_SHARING, WEIGHT_INPUTS,
                             data_inputs, reduction_axis, weight_axis)
from edgeq.pass_base import GraphPass, PassContext, PassResult
from edgeq.quant_math import (INT_TYPES, activation_params, is_float8, observed_params, quantize_weight,
                              required_opset, requantize_for_bias)
from edgeq.rounding import bias_shift, gptq_round, search_block_scales

# Largest int32 bias magnitude written: one bit of headroom for the accumulation it is added to.
BIAS_LIMIT = 2**30

# Activations a whole-graph target fuses into the op before them (clamps: exact on a clamped input).
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Softmax", "LayerNormalization", "Einsum"})


@dataclass
class ActQuant:
    scale: np.float32
    zero_point: int
    dtype: str
    uses: list = field(default_factory=list)  # (node, input index)
    to_output: bool = False


class InsertQdqPass(GraphPass):
    name = "insert_qdq"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        profile, stats = ctx.profile, ctx.stats
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
            raise UnsupportedModelError("the model already contains QuantizeLinear/DequantizeLinear nodes; "
                                        "give edgeq the float model")
        name_nodes(graph)
        result = PassResult()
        if profile.placement.mode == "none":  # float-only profiles (float16): nothing to quantize
            result.notes.update(quantized_activations=0, quantized_weights=0)
            return result
        plan = _Planner(self, graph, profile, stats, ctx.precision, result)
        acts, weights = plan.plan()
        _Rewriter(graph, profile, result, ctx.moments, ctx.spill).apply(acts, weights, plan.params_of)
        result.changed = result.rewrites > 0
        result.notes.update(quantized_activations=len(acts), quantized_weights=len(weights))
        return result


class _Planner:
    def __init__(self, p: InsertQdqPass, graph, profile, stats, precision, result: PassResult):
        self.p, self.graph, self.profile, self.stats, self.result = p, graph, profile, stats, result
        self.precision = precision
        self.place = profile.placement
        self.act_spec = profile.activations
        self.float_nodes = self._float_nodes()
        self.mask_path = self._mask_path()
        self.params_of: dict[str, ActQuant] = {}
        self.skipped: set[str] = set()

    # -- which nodes stay float ------------------------------------------------------------------------------
    def _float_nodes(self) -> set[str]:
        out = set()
        for node in self.graph.nodes:
            if node.op in self.place.float_ops or node.op in NEVER_QUANTIZED or node.domain not in ("", "ai.onnx", None):
                out.add(node.name)
            outputs = [t.name for t in node.outputs]
            if any(ov.precision in ("float", "fp16") and ov.matches(node.op, node.name, outputs)
                   for ov in self.profile.overrides):
                out.add(node.name)
        if self.precision is not None:
            out |= set(self.precision.float_nodes)
        self.float_reasons = self._input_layers(out) if self.place.float_input_layers > 0 else {}
        out |= set(self.float_reasons)
        if self.place.mode == "all":
            nodes, tensors = erf_gelu_interiors(self.graph)
            out |= nodes
            self.gelu_tensors = tensors
        return out

    def _shape(self, t: gs.Tensor) -> list[int] | None:
        """A tensor's static shape, or the shape calibration saw (symbolic dims in the graph), else None."""
        shape = t.shape
        if shape is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
            return [int(d) for d in shape]
        seen = self.stats.get(t.name).shape if self.stats is not None and t.name in self.stats else None
        return [int(d) for d in seen] if seen is not None else None

    def _input_layers(self, already: set[str]) -> dict[str, str]:
        """Layers reading a network input directly whose multiply-accumulates are a small share of the model's (and
        which are at most a tenth of its layers).
        Quantizing the network input (normalised pixels, audio) costs more than any inner tensor (EfficientNet-Lite0:
        the input's Q/DQ alone takes 5.3 dB off the logits' SQNR), while such a stem is a few percent of the work."""
        layers = [n for n in self.graph.nodes if n.op in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
        macs = {id(n): _macs(n, self._shape) for n in layers}
        if not layers or any(v is None for v in macs.values()):
            return {}  # shapes unknown: no share to judge by
        total = sum(macs.values()) or 1
        inputs = {t.name for t in self.graph.inputs}
        out = {}
        for node in layers:
            share = macs[id(node)] / total
            if node.name in already or share > self.place.float_input_layers or not node.inputs:
                continue
            t = node.inputs[0]
            while t.inputs and t.inputs[0].op in SCALE_SHARING | {"Pad"} and t.name not in inputs:
                t = t.inputs[0].inputs[0]
            if t.name in inputs:
                out[node.name] = (f"reads the network input {t.name} and does {share:.1%} of the model's "
                                  f"multiply-accumulates; kept in float (placement.float_input_layers: "
                                  f"{self.place.float_input_layers:g})")
        if len(out) > 0.1 * len(layers):
            return {}  # a small model: its first layer is not a small part of it
        return out

    def _act_dtype(self, node: gs.Node | None) -> str:
        dtype = self.act_spec.dtype
        for ov in self.profile.overrides:
            if node is not None and ov.precision in ("int16", "uint16", "int8", "uint8") and \
                    ov.matches(node.op, node.name, [t.name for t in node.outputs]):
                dtype = ov.precision
        if self.precision is not None and node is not None and node.name in self.precision.wide_nodes:
            dtype = "uint16" if self.act_spec.dtype.startswith("u") else "int16"
        return dtype

    # -- attention-mask arithmetic ---------------------------------------------------------------------------
    def _mask_path(self) -> dict[str, str]:
        limit = self.act_spec.max_abs_range
        compute: set[str] = set()
        mask: dict[str, str] = {}
        for node in self.graph.nodes:  # topologically sorted
            ins = [t for t in node.inputs if t.name]
            if node.op in COMPUTE_OPS or any(t.name in compute for t in ins):
                compute.update(t.name for t in node.outputs)
            if node.op not in MASK_PROPAGATING:
                continue
            seed = None
            for t in ins:
                v = const_value(t)
                if v is not None and v.dtype.kind == "f" and v.size and \
                        (not np.isfinite(v).all() or np.abs(v).max() >= limit):
                    seed = f"constant {t.name} holds {float(v.ravel()[np.argmax(np.abs(v.ravel()))]):.3g}"
                elif t.name in mask:
                    seed = mask[t.name]
            if seed is None:
                continue
            others = [t for t in ins if t.name not in mask and not has_const_value(t)]
            if any(t.name in compute for t in others):
                continue  # merge point (scores + mask): the output is ordinary activation data
            for t in node.outputs:
                mask[t.name] = seed
        return mask

    # -- planning ---------------------------------------------------------------------------------------------
    def plan(self):
        acts: dict[str, ActQuant] = {}
        weights: list[tuple[gs.Node, int, str]] = []  # (node, input index, kind)
        mode = self.place.mode
        fused_outputs: set[str] = set()  # mode "inputs": outputs of quantize_outputs_of ops
        for name in sorted(getattr(self, "gelu_tensors", ())):
            self.skipped.add(name)
            self.p.skip(self.result, name, "inside an Erf-form GELU; left unquantized so the target fuses it into "
                                           "one GELU op")
        for node in self.graph.nodes:
            if node.name in self.float_nodes:
                if node.op in self.place.ops or mode == "all":
                    if node.op not in NEVER_QUANTIZED:
                        self.p.skip(self.result, f"{node.op} {node.name}",
                                    self.float_reasons.get(node.name, "kept in float (profile/override)"))
                continue
            if mode == "inputs" and node.op in self.place.quantize_outputs_of and \
                    self._joins_quantized(node, fused_outputs):
                for t in node.outputs:
                    if t.name and t not in self.graph.outputs and self._is_float(t) and t.name not in self.skipped:
                        self._activation(acts, t, node)
                        fused_outputs.add(t.name)
            if mode != "all" and node.op not in self.place.ops and not (self.place.residual_add and node.op == "Add"):
                continue
            for idx in self._inputs_to_quantize(node):
                t = node.inputs[idx]
                if has_const_value(t):
                    kind = self._const_kind(node, idx)
                    if kind:
                        weights.append((node, idx, kind))
                    continue
                if mode == "weights":
                    continue
                self._use_activation(acts, t, node, idx)
            if mode == "all":
                for t in node.outputs:
                    if t.name and self._is_float(t) and t.name not in self.skipped:
                        q = self._activation(acts, t, node)
                        if q is not None and (t in self.graph.outputs):
                            q.to_output = bool(self.place.quantize_graph_outputs)
        if mode == "all" or fused_outputs:
            # Whole-graph targets: every consumer reads the dequantized value, float islands included, so each
            # quantized op's output feeds only its QuantizeLinear (the node-unit form QNN compiles and ONNX
            # Runtime fuses into an integer kernel).
            tensors = self.graph.tensors()
            for name, q in acts.items():
                if mode != "all" and name not in fused_outputs:
                    continue
                t = tensors[name]
                for consumer in t.outputs:
                    if consumer.op in ("QuantizeLinear", "DequantizeLinear"):
                        continue
                    if mode != "all" and consumer.name in self.float_nodes:
                        # A layer kept in float reads the float value. Reading the DequantizeLinear would make
                        # DQ -> Conv/Gemm -> (Relu/Clip) -> Q, which ONNX Runtime's WeightBiasQuantization turns
                        # into an integer kernel with *per-tensor* int8 weights of its own: worse than quantizing.
                        continue
                    for idx in data_inputs(consumer.op, len(consumer.inputs)):
                        if consumer.inputs[idx] is t and (consumer, idx) not in q.uses:
                            q.uses.append((consumer, idx))
        return acts, weights

    def _joins_quantized(self, node: gs.Node, fused_outputs: set[str]) -> bool:
        """Compute ops always qualify; an elementwise op (a CNN's residual Add) only when every input is the
        quantized output of such an op, so ONNX Runtime fuses DQ, DQ -> Add -> Q into QLinearAdd. A transformer's
        residual Add reads a MatMul's float output and stays float."""
        if node.op in COMPUTE_OPS:
            return True
        ins = [t for t in node.inputs if t.name]
        return len(ins) >= 2 and all(not has_const_value(t) and t.name in fused_outputs for t in ins)

    def _inputs_to_quantize(self, node: gs.Node) -> list[int]:
        idxs = [i for i in data_inputs(node.op, len(node.inputs)) if node.inputs[i].name]
        if self.place.mode == "weights":
            return [i for i in idxs if WEIGHT_INPUTS.get(node.op) == i]
        if node.op == "Add" and self.place.mode == "inputs" and node.op not in self.place.ops:
            return self._residual_input(node)
        return idxs

    def _residual_input(self, node: gs.Node) -> list[int]:
        acts = [i for i, t in enumerate(node.inputs[:2]) if not has_const_value(t)]
        if len(acts) != 2:
            return []
        prods = [node.inputs[i].inputs[0] if node.inputs[i].inputs else None for i in acts]
        conv = [p is not None and p.op in ("Conv", "ConvTranspose") for p in prods]
        if not any(conv):
            return []
        if all(conv):  # two conv branches: quantize the shortcut (the one computed first)
            order = {id(n): k for k, n in enumerate(self.graph.nodes)}
            return [acts[0] if order[id(prods[0])] < order[id(prods[1])] else acts[1]]
        return [acts[conv.index(False)]]

    def _const_kind(self, node: gs.Node, idx: int) -> str | None:
        if WEIGHT_INPUTS.get(node.op) == idx:
            return "weight"
        if BIAS_INPUTS.get(node.op) == idx:
            return "bias" if self.profile.weights.bias == "int32" else None
        if self.place.mode == "all":
            return "const"
        if node.op in ("MatMul", "Gemm") and idx in (0, 1):
            return "weight"
        return None

    def _is_float(self, t: gs.Tensor) -> bool:
        dt = tensor_dtype(t)
        if dt is None and self.stats is not None and self.stats.dtype(t.name):
            dt = np.dtype(self.stats.dtype(t.name))
        return dt is not None and np.dtype(dt).kind == "f"

    def _use_activation(self, acts, t, node, idx):
        q = self._activation(acts, t, node)
        if q is not None and (node, idx) not in q.uses:
            q.uses.append((node, idx))

    def _activation(self, acts: dict, t: gs.Tensor, consumer: gs.Node) -> ActQuant | None:
        if t.name in acts:
            return acts[t.name]
        if t.name in self.skipped:
            return None
        reason = self._reject(t)
        if reason:
            self.skipped.add(t.name)
            self.p.skip(self.result, t.name, reason)
            return None
        q = self._params(t, consumer)
        if q is None:
            return None
        lost = self._underflow(t, q)
        if lost:
            wide = "uint16" if q.dtype.startswith("u") else "int16"
            if self.place.mode == "all" and q.dtype in ("int8", "uint8") and \
                    (self.graph.opset or 0) >= required_opset(wide):
                q = self._params(t, consumer, dtype=wide)  # whole-graph targets cannot leave it in float
                self.p.skip(self.result, t.name, f"{lost}; given {wide} activations instead")
            else:
                self.skipped.add(t.name)
                self.p.skip(self.result, t.name, f"{lost}; kept in float")
                return None
        acts[t.name] = q
        self.params_of[t.name] = q
        return q

    def _underflow(self, t: gs.Tensor, q: ActQuant) -> str | None:
        """Attention probabilities over a long axis (and activations with a few huge outliers) hold most of their
        magnitude below half a quantization step: it would round to zero, and the MatMul they feed would lose that
        share of its input (Whisper's 1500-frame softmax loses 30-50%). Measured on the calibration histogram."""
        # Whole-graph targets widen to 16 bits, which stays on the accelerator: the strict limit everywhere. Where
        # the alternative is float (a float Conv behind DequantizeLinear is slower than FP32 on ONNX Runtime CPU),
        # the strict limit holds for products of two activations, the looser one for tensors summed by a weight
        # layer, and elementwise-only tensors are not checked (each flushed value is off by at most half a step,
        # like any rounded value; the harm of flushing is in sums over many of them).
        field = "max_underflow"
        if self.place.mode != "all":
            reaches = self._summed_by(t)
            if reaches is None:
                return None
            if reaches == "weights":
                field = "max_underflow_other"
        limit = getattr(self.act_spec, field)
        if limit >= 1.0 or q.dtype not in INT_TYPES or t.name not in self.stats:
            return None
        lost = flushed_fraction(self.stats.get(t.name), float(q.scale) / 2)
        if lost <= limit:
            return None
        return (f"{lost:.0%} of its calibrated magnitude lies below half a {q.dtype} step ({float(q.scale):.3g}) "
                f"and would round to zero (activations.{field}: {limit:g})")

    @staticmethod
    def _summed_by(t: gs.Tensor) -> str | None:
        """What sums ``t`` first, looking through scale-sharing ops: ``"activations"`` when a MatMul/Gemm multiplies
        it by another activation (attention probabilities times values: every flushed element takes its share of
        the probabilities' mass, so a small flushed share already biases the output), ``"weights"`` when only
        layers with constant weights sum it, ``None`` when no Conv/MatMul/Gemm reads it."""
        seen, todo, found = set(), [t], None
        while todo:
            cur = todo.pop()
            if id(cur) in seen:
                continue
            seen.add(id(cur))
            for node in cur.outputs:
                if node.op in ("MatMul", "Gemm"):
                    others = [x for x in node.inputs[:2] if x is not cur]
                    if others and all(not has_const_value(x) for x in others):
                        return "activations"
                    found = "weights"
                elif node.op in ("Conv", "ConvTranspose"):
                    found = "weights"
                elif node.op in SCALE_SHARING:
                    todo.extend(node.outputs[:1])
        return found

    def _reject(self, t: gs.Tensor) -> str | None:
        if not self._is_float(t):
            return "not a float tensor"
        if t.name in getattr(self, "gelu_tensors", ()):
            return "inside an Erf-form GELU; left unquantized so the target fuses it into one GELU op"
        if t.name in self.mask_path:
            return f"attention-mask arithmetic ({self.mask_path[t.name]}); kept in float"
        if self.stats is None or t.name not in self.stats:
            return "no calibration statistics for this tensor"
        obs = self.stats.get(t.name)
        limit = self.act_spec.max_abs_range
        if max(abs(obs.min), abs(obs.max)) > limit:
            return f"calibrated range [{obs.min:.3g}, {obs.max:.3g}] exceeds +-{limit:g}; kept in float"
        return None

    def _params(self, t: gs.Tensor, consumer: gs.Node, *, dtype: str | None = None) -> ActQuant | None:
        prod = t.inputs[0] if t.inputs else None
        dtype = dtype or self._act_dtype(prod if prod is not None and self.place.mode == "all" else consumer)
        spec = self.act_spec
        if prod is not None and prod.op in self.place.fixed_output_scales and dtype == spec.dtype:
            fixed = self.place.fixed_output_scales[prod.op]
            return ActQuant(np.float32(fixed.scale), fixed.zero_point, dtype)
        if prod is not None and prod.op in SCALE_SHARING and prod.inputs and prod.inputs[0].name in self.params_of:
            src = self.params_of[prod.inputs[0].name]
            if src.dtype == dtype:
                return ActQuant(src.scale, src.zero_point, dtype)
        scale, zp = observed_params(self.stats.get(self._range_source(t, dtype)), spec, dtype)
        return ActQuant(scale, zp, dtype)

    def _range_source(self, t: gs.Tensor, dtype: str) -> str:
        """Whole-graph targets fuse ``op -> Relu/Clip`` into one op whose output is quantized once, with the
        activation's parameters. The op's own output therefore takes the activation's output range: the Q/DQ
        pair between them then clamps exactly as the activation does, so the QDQ model computes what the target
        computes instead of rounding to the op's wider range first."""
        fused_output = bool(t.inputs) and t.inputs[0].op in self.place.quantize_outputs_of
        if (self.place.mode != "all" and not fused_output) or t in self.graph.outputs or len(t.outputs) != 1:
            return t.name
        act = t.outputs[0]
        if act.op not in FUSABLE_ACTIVATIONS or act.name in self.float_nodes or act.inputs[0] is not t:
            return t.name
        out = act.outputs[0]
        if out.name not in self.stats or self._act_dtype(act) != dtype:
            return t.name
        return out.name


def _macs(node: gs.Node, shape_of) -> int | None:
    """Multiply-accumulates of a Conv/ConvTranspose/MatMul/Gemm from its shapes (None when they are unknown)."""
    out = shape_of(node.outputs[0]) if node.outputs else None
    w = shape_of(node.inputs[1]) if len(node.inputs) > 1 else None
    x = shape_of(node.inputs[0]) if node.inputs else None
    if not (out and w and x):
        return None
    if node.op == "Conv":
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if node.op == "ConvTranspose":
        return int(np.prod(x)) * int(np.prod(w[1:]))
    k = x[-1] if not (node.op == "Gemm" and node.attrs.get("transA", 0)) else x[0]
    return int(np.prod(out)) * int(k)


def flushed_fraction(obs, half_step: float) -> float:
    """Share of a tensor's calibrated L1 magnitude whose values lie within ``half_step`` of zero."""
    edges = obs.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    mass = np.abs(centers) * obs.hist
    total = float(mass.sum())
    return float(mass[np.abs(centers) < half_step].sum()) / total if total > 0 else 0.0


class _Rewriter:
    def __init__(self, graph: gs.Graph, profile, result: PassResult, moments=None, spill=None):
        self.graph, self.profile, self.result, self.spill = graph, profile, result, spill
        self.moments = moments if profile.weights.rounding == "gptq" else None
        self.gptq_ratios: list[float] = []
        self.weight_cache: dict[tuple, gs.Variable] = {}
        self.bias_shifts: list[tuple[gs.Node, np.ndarray]] = []

    def apply(self, acts: dict[str, ActQuant], weights, params_of):
        tensors = self.graph.tensors()
        for name, q in acts.items():
            if q.uses or q.to_output:
                self._insert_pair(tensors[name], q)
        for node, idx, kind in weights:
            if kind == "weight":
                self._weight(node, idx)
        weights = list(weights) + self._correct_biases()
        for node, idx, kind in weights:
            if kind == "const":
                self._const_activation(node, idx)
            elif kind == "bias":
                self._bias(node, idx)
        if self.gptq_ratios:  # layer output error of the chosen integers relative to round-to-nearest
            self.result.notes.update(gptq_rounded_weights=len(self.gptq_ratios),
                                     gptq_median_error_ratio=round(float(np.median(self.gptq_ratios)), 4))

    def _qdq_constants(self, base: str, scale, zp, dtype: str):
        s = gs.Constant(f"{base}/scale", np.asarray(scale, dtype=np.float32))
        if is_float8(dtype) or INT_TYPES[dtype].np_dtype is None:
            holder = np.float32 if is_float8(dtype) else np.int8
            z = narrow_constant(f"{base}/zero_point", np.zeros_like(np.asarray(zp), dtype=holder)
                                if is_float8(dtype) else np.asarray(zp, dtype=holder), dtype)
        else:
            z = gs.Constant(f"{base}/zero_point", np.asarray(zp, dtype=INT_TYPES[dtype].np_dtype))
        return s, z

    def _insert_pair(self, t: gs.Variable, q: ActQuant) -> None:
        s, z = self._qdq_constants(t.name, q.scale, q.zero_point, q.dtype)
        quant = gs.Variable(f"{t.name}/quantized", dtype=None if is_float8(q.dtype) else INT_TYPES[q.dtype].np_dtype,
                            shape=t.shape)
        deq = gs.Variable(f"{t.name}/dequantized", dtype=t.dtype, shape=t.shape)
        self.graph.nodes.append(gs.Node("QuantizeLinear", f"{t.name}/QuantizeLinear", inputs=[t, s, z],
                                        outputs=[quant]))
        self.graph.nodes.append(gs.Node("DequantizeLinear", f"{t.name}/DequantizeLinear", inputs=[quant, s, z],
                                        outputs=[deq]))
        for node, idx in q.uses:
            node.inputs[idx] = deq
        if q.to_output:
            pos = [i for i, o in enumerate(self.graph.outputs) if o is t]
            original = t.name
            t.name = f"{original}/float"
            quant.name, deq.name = f"{original}/quantized", original
            s.name, z.name = f"{original}/scale", f"{original}/zero_point"
            for i in pos:
                self.graph.outputs[i] = deq
        self.result.rewrites += 1

    def _weight(self, node: gs.Node, idx: int) -> None:
        t = node.inputs[idx]
        lazy = t._values if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) else None
        try:
            self._quantize_weight(node, idx, t)
        finally:
            if lazy is not None:  # drop the loaded float copy: large models keep weights on disk until needed
                t._values = lazy

    def _quantize_weight(self, node: gs.Node, idx: int, t: gs.Tensor) -> None:
        w = const_value(t)
        if w is None or w.dtype.kind != "f":
            return
        spec = self.profile.weights
        axis = weight_axis(node.op, node.attrs, w.ndim) if node.op in spec.per_channel_ops else None
        if node.op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization"):
            axis = None
        block = 0
        if spec.block_size and node.op in ("MatMul", "Gemm") and w.ndim == 2:
            axis, block = reduction_axis(node.op, node.attrs, w.ndim), spec.block_size
        key = (t.name, axis, block)
        if key not in self.weight_cache:
            qw = quantize_weight(w, spec.dtype, symmetric=spec.symmetric, axis=axis, block_size=block)
            qw = self._round_for_layer(node, t, w, qw)
            if is_float8(spec.dtype) or INT_TYPES[spec.dtype].np_dtype is None:
                qt = narrow_constant(f"{t.name}/quantized", qw.q, spec.dtype)
            else:
                qt = gs.Constant(f"{t.name}/quantized", qw.q)
                if self.spill is not None:
                    self.spill.put(qt)
            s, z = self._qdq_constants(t.name, qw.scale, qw.zero_point, spec.dtype)
            out = gs.Variable(f"{t.name}/dequantized", dtype=w.dtype, shape=list(w.shape))
            attrs = {}
            if axis is not None:
                attrs["axis"] = axis
            if block:
                attrs["block_size"] = block
            self.graph.nodes.append(gs.Node("DequantizeLinear", f"{t.name}/DequantizeLinear", attrs=attrs,
                                            inputs=[qt, s, z], outputs=[out]))
            self.weight_cache[key] = out
            self.result.rewrites += 1
        node.inputs[idx] = self.weight_cache[key]

    def _round_for_layer(self, node: gs.Node, t: gs.Tensor, w: np.ndarray, qw):
        """Error-compensating rounding (weights.rounding: gptq) where the layer's input moments were measured; with
        ``weights.bias_correction`` it also records the layer's mean output shift for :meth:`_correct_biases`."""
        layer = self.moments.get(node.name) if self.moments is not None else None
        if layer is None or len(t.outputs) != 1 or layer.op != node.op:
            return qw
        key = (node.name, t.name, qw.axis, qw.block_size, qw.dtype, qw.scale.tobytes())
        if key not in self.moments.rounded:
            searched = search_block_scales(w, qw, op=node.op, attrs=node.attrs, moments=layer)  # int4 blocks
            rounded, ratio = gptq_round(w, searched, op=node.op, attrs=node.attrs, moments=layer)
            self.moments.rounded[key] = (rounded if ratio < 1.0 else searched, ratio)
        rounded, ratio = self.moments.rounded[key]
        if ratio < 1.0:
            self.gptq_ratios.append(ratio)
        if self.profile.weights.bias_correction:
            shift_key = key + ("bias_shift",)
            if shift_key not in self.moments.rounded:
                self.moments.rounded[shift_key] = bias_shift(w, rounded, op=node.op, attrs=node.attrs, moments=layer)
            if self.moments.rounded[shift_key] is not None:
                self.bias_shifts.append((node, self.moments.rounded[shift_key]))
        return rounded

    def _correct_biases(self) -> list[tuple[gs.Node, int, str]]:
        """Subtract each layer's mean output error (``bias_shift``) from its bias: the Conv/Gemm bias input (added
        when missing), or the constant of the Add that is a MatMul's only consumer. Returns the biases this adds,
        for int32 quantization."""
        added, corrected = [], 0
        for node, shift in self.bias_shifts:
            idx = BIAS_INPUTS.get(node.op)
            if node.op == "Gemm":  # Y = alpha A B + beta C: the product's shift reaches C divided by beta
                alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
                if beta == 0:
                    continue
                shift = shift * (alpha / beta)
            if idx is not None:
                if len(node.inputs) > idx and node.inputs[idx].name:
                    target, pos = node, idx
                elif len(node.inputs) == idx and len(node.outputs) == 1:
                    zero = gs.Constant(f"{node.name}/bias", np.zeros(shift.size, np.float32))
                    node.inputs.append(zero)
                    target, pos = node, idx
                    if self.profile.weights.bias == "int32":
                        added.append((node, idx, "bias"))
                else:
                    continue
            else:
                target, pos = _bias_add(node, shift.size)
                if target is None:
                    continue
            b = const_value(target.inputs[pos])
            if b is None or b.dtype.kind != "f" or b.size not in (1, shift.size):
                continue
            new = b.astype(np.float64).reshape(-1) - shift  # a scalar bias broadcasts to one value per channel
            target.inputs[pos] = gs.Constant(f"{target.inputs[pos].name}/bias_corrected",
                                             new.reshape(b.shape if b.size == shift.size else -1).astype(b.dtype))
            corrected += 1
        if corrected:
            self.result.notes["bias_corrected_layers"] = corrected
        return added

    def _const_activation(self, node: gs.Node, idx: int) -> None:
        t = node.inputs[idx]
        v = const_value(t)
        if v is None or v.dtype.kind != "f":
            return
        act = self.profile.activations
        key = (t.name, "act")
        if key not in self.weight_cache:
            scale, zp = activation_params(float(v.min()), float(v.max()), act.dtype, symmetric=act.symmetric,
                                          min_range=act.min_real_range)
            r = INT_TYPES[act.dtype]
            # asarray: rounding a 0-d constant (an attention scale) yields a numpy scalar, not an array
            q = np.asarray(np.clip(np.round(v / scale) + zp, r.qmin, r.qmax), dtype=r.np_dtype)
            s, z = self._qdq_constants(t.name, scale, zp, act.dtype)
            out = gs.Variable(f"{t.name}/dequantized", dtype=v.dtype, shape=list(v.shape))
            self.graph.nodes.append(gs.Node("DequantizeLinear", f"{t.name}/DequantizeLinear",
                                            inputs=[gs.Constant(f"{t.name}/quantized", q), s, z], outputs=[out]))
            self.weight_cache[key] = out
            self.result.rewrites += 1
        node.inputs[idx] = self.weight_cache[key]

    def _bias(self, node: gs.Node, idx: int) -> None:
        b = const_value(node.inputs[idx])
        x_dq, w_dq = node.inputs[0], node.inputs[1]
        x_node = x_dq.inputs[0] if x_dq.inputs else None
        w_node = w_dq.inputs[0] if w_dq.inputs else None
        if b is None or x_node is None or w_node is None or x_node.op != "DequantizeLinear" or \
                w_node.op != "DequantizeLinear":
            self.result.skipped.append(_skip(node, "bias kept in float: input or weight is not quantized"))
            return
        s_x = np.asarray(x_node.inputs[1].values, np.float64)
        s_w = np.asarray(w_node.inputs[1].values, np.float64)
        if s_w.ndim > 1:
            self.result.skipped.append(_skip(node, "bias kept in float: blockwise weight scales"))
            return
        b = b.astype(np.float64).reshape(-1)
        per_channel = s_w.size > 1
        s_w = self._widen_for_bias(node, w_node, b, float(s_x), s_w)
        scale = (s_x * s_w).reshape(-1) if per_channel else np.asarray(s_x.item() * s_w.item())  # (1,): Cout=1
        q = np.clip(np.round(b / (scale if per_channel else float(scale))), -(2**31), 2**31 - 1).astype(np.int32)
        base = node.inputs[idx].name
        out = gs.Variable(f"{base}/dequantized", dtype=np.float32, shape=[b.size])
        # per-tensor weights get a per-tensor bias scale: QNN's Gemm misreads a per-axis bias next to them
        self.graph.nodes.append(gs.Node(
            "DequantizeLinear", f"{base}/DequantizeLinear", attrs={"axis": 0} if per_channel else {},
            inputs=[gs.Constant(f"{base}/quantized", q), gs.Constant(f"{base}/scale", np.asarray(scale, np.float32)),
                    gs.Constant(f"{base}/zero_point", np.zeros(b.size if per_channel else (), np.int32))],
            outputs=[out]))
        node.inputs[idx] = out
        self.result.rewrites += 1

    def _widen_for_bias(self, node: gs.Node, w_node: gs.Node, b: np.ndarray, s_x: float,
                        s_w: np.ndarray) -> np.ndarray:
        """Weight scales raised (and the weight requantized) where the int32 bias would saturate."""
        q_t, s_t = w_node.inputs[0], w_node.inputs[1]
        zp = const_value(w_node.inputs[2]) if len(w_node.inputs) > 2 else None
        if not isinstance(q_t, gs.Constant) or np.asarray(q_t.values).dtype.kind not in "iu":
            return s_w
        widened = requantize_for_bias(np.asarray(q_t.values), s_w, b, s_x, axis=int(w_node.attrs.get("axis", 1)),
                                      limit=BIAS_LIMIT)
        if widened is None:
            return s_w
        if len(w_node.outputs[0].outputs) != 1 or (zp is not None and np.any(zp != 0)):
            self.result.skipped.append(_skip(node, "int32 bias saturates; the weight is shared or asymmetric, "
                                                   "so the bias is clipped"))
            return s_w
        q_t.values, s_t.values = widened
        notes = self.result.notes
        notes["bias_widened_channels"] = notes.get("bias_widened_channels", 0) + int(np.sum(widened[1] != s_w))
        return np.asarray(widened[1], np.float64)


def _bias_add(node: gs.Node, channels: int) -> tuple[gs.Node | None, int]:
    """The Add that is ``node``'s only consumer and adds a constant vector along the last axis (a MatMul's bias),
    and the index of that constant; ``(None, -1)`` when there is none."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None, -1
    add = out.outputs[0]
    for pos, t in enumerate(add.inputs):
        if t is out or not has_const_value(t):
            continue
        shape = tuple(t.shape or ())
        if int(np.prod(shape)) == channels and (not shape or shape[-1] == channels):
            return add, pos
    return None, -1


def erf_gelu_interiors(graph: gs.Graph) -> tuple[set[str], set[str]]:
    """Nodes and tensors inside ``x * 0.5 * (1 + erf(x / sqrt(2)))`` (any order of the two Muls)."""
    nodes: set[str] = set()
    tensors: set[str] = set()

    def only_consumer(t: gs.Tensor, op: str) -> gs.Node | None:
        return t.outputs[0] if len(t.outputs) == 1 and t.outputs[0].op == op else None

    for erf in [n for n in graph.nodes if n.op == "Erf"]:
        scale = erf.inputs[0].inputs[0] if erf.inputs[0].inputs else None
        if scale is None or scale.op not in ("Div", "Mul"):
            continue
        x = next((t for t in scale.inputs if not has_const_value(t)), None)
        add = only_consumer(erf.outputs[0], "Add")
        mul = only_consumer(add.outputs[0], "Mul") if add is not None else None
        if x is None or mul is None:
            continue
        inner = [scale, erf, add, mul]
        other = next(t for t in mul.inputs if t is not add.outputs[0])
        if other is not x:  # 0.5 applied to x first: Mul(x, 0.5) feeds the final Mul
            half = other.inputs[0] if other.inputs else None
            if half is None or half.op != "Mul" or x not in half.inputs:
                continue
            inner.append(half)
        else:
            last = only_consumer(mul.outputs[0], "Mul")
            if last is not None and any(has_const_value(t) for t in last.inputs):
                inner.append(last)
        nodes.update(n.name for n in inner)
        result = _gelu_output(inner)
        tensors.update(t.name for n in inner for t in n.outputs if t is not result)
    return nodes, tensors


def _gelu_output(inner: list[gs.Node]) -> gs.Tensor:
    """The GELU's result: the output of the node whose output leaves the pattern."""
    names = {id(n) for n in inner}
    for n in inner:
        if any(id(c) not in names for c in n.outputs[0].outputs) or not n.outputs[0].outputs:
            return n.outputs[0]
    return inner[-1].outputs[0]


def _skip(node: gs.Node, reason: str):
    from edgeq.pass_base import Skip

    return Skip("insert_qdq", f"{node.op} {node.name}", reason)
