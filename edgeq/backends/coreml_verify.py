"""Structural verification of a saved ``.mlpackage`` against the QDQ ONNX model it was built from.

Runs anywhere coremltools imports (no Core ML runtime): the package's MIL program is read back from its
protobuf and weight blob, then

* the op types are counted;
* every quantized weight of the QDQ model (a ``DequantizeLinear`` of a constant int8/uint8/int4/uint4 tensor)
  must be a ``constexpr_*`` op whose stored integers have the intended dtype and equal the ONNX integers
  exactly, and whose dequantized values ``scale * (q - zero_point)`` match ONNX's ``DequantizeLinear`` output
  within the precision the scales are stored in (1e-6 relative for float32 scales, 2^-10 for float16);
* every activation ``QuantizeLinear`` must be a ``quantize`` op with the same scale and the same integer
  mapping (uint8 with zero point 128 and int8 without one are the same mapping; Core ML prefers the latter);
* the bytes of float constants and of compressed weights are totalled, so a silently decompressed model shows.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import coremltools as ct
import numpy as np
import onnx
from coremltools.converters.mil.mil import types
from onnx import numpy_helper

from edgeq.backends.coreml_context import can_fold, fold_node, sanitize
from edgeq.backends.coreml_lower import default_opset
from edgeq.backends.coreml_quant import COMPRESSIBLE, parse_weight_op_name, strip_pass_suffix

logger = logging.getLogger(__name__)

_DATA_INPUT = {"constexpr_affine_dequantize": "quantized_data", "constexpr_blockwise_shift_scale": "data"}
_SCALE_INPUT = {"constexpr_affine_dequantize": "scale", "constexpr_blockwise_shift_scale": "scale"}
_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8}


@dataclass(frozen=True)
class WeightCheck:
    onnx_name: str  # the DequantizeLinear output
    expected_dtype: str
    stored_dtype: str | None  # None: not stored compressed
    mil_op: str | None
    max_abs_diff: float
    max_rel_diff: float  # max |package - onnx| / max |onnx|
    tolerance: float
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class CoremlVerification:
    path: Path
    op_counts: dict[str, int]
    weights: tuple[WeightCheck, ...]
    activation_pairs_expected: int
    activation_pairs_found: int
    compressed_weight_bytes: int
    float_const_bytes: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def compressed_by_dtype(self) -> dict[str, int]:
        return dict(Counter(w.stored_dtype for w in self.weights if w.stored_dtype))

    def summary(self) -> str:
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"{self.path}: {status}; {sum(self.op_counts.values())} ops",
                 (f"  compressed weights: {self.compressed_by_dtype or 'none'} "
                 f"({self.compressed_weight_bytes} bytes; float constants {self.float_const_bytes} bytes)"),
                 f"  activation quantize/dequantize: {self.activation_pairs_found}/{self.activation_pairs_expected}"]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])


def load_program(mlmodel):
    """The MIL program of a saved ML Program package (weights read from its blob file)."""
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, mlmodel.weights_dir)


def iter_ops(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from iter_ops(inner)


def op_counts_from_spec(spec) -> dict[str, int]:
    counts: Counter = Counter()

    def walk(block):
        for op in block.operations:
            counts[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        walk(function.block_specializations[function.opset])
    return dict(sorted(counts.items()))


def _constants(model: onnx.ModelProto):
    """Walk the QDQ model folding what is constant; yield (node, constant inputs) for every Q/DQ node."""
    opset = default_opset(model)
    consts = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        inputs = [consts.get(name) if name else None for name in node.input]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            yield node, inputs, opset
        ready = all(v is not None or not name for v, name in zip(inputs, node.input))
        if ready and (can_fold(node) or node.op_type == "DequantizeLinear"):
            try:
                consts.update(zip(node.output, fold_node(node, inputs, opset)))
            except Exception as exc:  # noqa: BLE001 - anything unfoldable is simply not a constant
                logger.debug("not folding %s: %s", node.name or node.op_type, exc)


def _tolerance(scale_dtype) -> float:
    return 1e-6 if scale_dtype == np.float32 else 2.0 ** -10


def _same_integers(q: np.ndarray, constexpr_ops) -> list:
    """Constexpr ops holding exactly ``q`` (or its transpose), for weights whose op name did not survive."""
    found = []
    for op, _ in constexpr_ops:
        data = op.inputs[_DATA_INPUT[op.op_type]].val
        for perm in [None] + ([(1, 0)] if q.ndim == 2 else []):
            view = data if perm is None else data.T
            if view.shape == q.shape and np.array_equal(view.astype(np.int64), q.astype(np.int64)):
                found.append((op, perm))
    return found


def _check_weight(node, inputs, opset, candidates, float_consts) -> WeightCheck:
    q = inputs[0]
    expected_dtype = q.dtype.name
    reference = fold_node(node, inputs, opset)[0].astype(np.float64)
    peak = max(float(np.abs(reference).max()), 1e-30)
    name = node.output[0]
    if not candidates:
        for op, value in float_consts:
            if value.shape == reference.shape and np.allclose(value, reference, rtol=1e-3, atol=1e-3 * peak):
                return WeightCheck(name, expected_dtype, None, op.name, 0.0, 0.0, 0.0,
                                   f"weight {name!r} is stored as a float constant ({op.name}), not compressed")
        return WeightCheck(name, expected_dtype, None, None, 0.0, 0.0, 0.0,
                           f"weight {name!r} has no constexpr op in the package")
    worst = None
    for op, perm in candidates:
        data_var = op.inputs[_DATA_INPUT[op.op_type]]
        stored = types.builtin_to_string(data_var.dtype)
        undo = None if perm is None else np.argsort(perm)
        ints = data_var.val if undo is None else np.transpose(data_var.val, undo)
        values = op.materialized_val_inference()
        values = (values if undo is None else np.transpose(values, undo)).astype(np.float64)
        tolerance = _tolerance(op.inputs[_SCALE_INPUT[op.op_type]].val.dtype)
        diff = float(np.abs(values - reference).max()) if values.shape == reference.shape else float("inf")
        problem = None
        if stored != expected_dtype:
            problem = f"weight {name!r} is stored as {stored}, expected {expected_dtype}"
        elif ints.shape != q.shape or not np.array_equal(ints.astype(np.int64), q.astype(np.int64)):
            problem = f"weight {name!r}: stored integers differ from the ONNX {expected_dtype} tensor"
        elif diff / peak > tolerance:
            problem = (f"weight {name!r}: dequantized values differ from ONNX DequantizeLinear by {diff:.3g} "
                       f"({diff / peak:.3g} relative, tolerance {tolerance:.3g})")
        check = WeightCheck(name, expected_dtype, stored, op.name, diff, diff / peak, tolerance, problem)
        if worst is None or (check.problem and not worst.problem) or check.max_rel_diff > worst.max_rel_diff:
            worst = check
    return worst


_INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def _quantize_mapping(scale, zero_point, dtype: str):
    """(scale, lowest, highest) in units of scale: two quantizers with equal mappings are interchangeable
    (uint8 with zero point 128 is int8 without one)."""
    scale = np.asarray(scale, np.float64).reshape(-1)
    zp = np.zeros(1) if zero_point is None else np.asarray(zero_point, np.float64).reshape(-1)
    low, high = _INT_RANGE[dtype]
    return scale, np.broadcast_to(low - zp, scale.shape), np.broadcast_to(high - zp, scale.shape)


def _same_mapping(expected, op) -> bool:
    scale, low, high = expected
    got_scale, got_low, got_high = _quantize_mapping(op.scale.val, None if op.zero_point is None else
                                                     op.zero_point.val, op.output_dtype.val)
    if got_scale.shape != scale.shape:
        return False
    tolerance = _tolerance(op.scale.val.dtype) * np.abs(scale).max()
    return (np.abs(got_scale - scale).max() <= tolerance and np.array_equal(got_low, low)
            and np.array_equal(got_high, high))


def _expected_mapping(node, inputs):
    zp = inputs[2] if len(inputs) > 2 else None
    if zp is not None:
        dtype = zp.dtype.name
    else:
        output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
        dtype = "int8" if output_dtype == onnx.TensorProto.INT8 else "uint8"
    if dtype not in _INT_RANGE:
        return None
    return _quantize_mapping(inputs[1], zp, dtype)


def _check_activation(node, inputs, by_name, unmatched: list) -> str | None:
    """Problem with the package's quantize op for an activation QuantizeLinear, or None.

    The op is found by name, or failing that (coremltools' passes may rebuild quantize ops) as any not yet
    matched quantize op with the same mapping."""
    label = node.name or node.output[0]
    expected = _expected_mapping(node, inputs)
    if expected is None:
        return f"activation QuantizeLinear {label!r} quantizes to a type Core ML's quantize cannot produce"
    named = [op for op in by_name.get(("quantize", sanitize(node.output[0])), []) if op in unmatched]
    for op in named + [op for op in unmatched if op not in named]:
        if _same_mapping(expected, op):
            unmatched.remove(op)
            return None
    if named:
        op = named[0]
        return (f"quantize {op.name}: scale {op.scale.val}, zero point "
                f"{None if op.zero_point is None else op.zero_point.val}, {op.output_dtype.val} do not match "
                f"QuantizeLinear {label!r} (scale {inputs[1]}, zero point {inputs[2] if len(inputs) > 2 else None})")
    return f"activation QuantizeLinear {label!r} has no quantize op with its scale and zero point in the package"


def verify_package(path: Path, reference: onnx.ModelProto) -> CoremlVerification:
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    program = load_program(mlmodel)
    ops = [op for function in program.functions.values() for op in iter_ops(function)]
    by_name: dict[tuple[str, str], list] = {}
    constexpr: dict[str, list] = {}
    float_consts, float_bytes, compressed_bytes = [], 0, 0
    for op in ops:
        by_name.setdefault((op.op_type, strip_pass_suffix(op.name)), []).append(op)
        if op.op_type in _DATA_INPUT:
            base, perm = parse_weight_op_name(op.name)
            constexpr.setdefault(base, []).append((op, perm))
            data = op.inputs[_DATA_INPUT[op.op_type]]
            compressed_bytes += data.val.size * _BITS.get(types.builtin_to_string(data.dtype), 8) // 8
        elif op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and \
                np.issubdtype(op.outputs[0].val.dtype, np.floating):
            value = op.outputs[0].val
            float_bytes += value.nbytes
            if value.size > 1:
                float_consts.append((op, value.astype(np.float64)))
                if value.ndim == 2:  # linear layers store (out, in): a MatMul weight appears transposed
                    float_consts.append((op, value.T.astype(np.float64)))
    all_constexpr = [(op, perm) for found in constexpr.values() for op, perm in found]
    weights, problems, expected_pairs, found_pairs = [], [], 0, 0
    unmatched = [op for op in ops if op.op_type == "quantize"]
    for node, inputs, opset in _constants(reference):
        if node.op_type == "DequantizeLinear":
            q = inputs[0]
            if q is not None and q.dtype.name in COMPRESSIBLE and q.ndim > 0:
                candidates = constexpr.get(sanitize(node.output[0])) or _same_integers(q, all_constexpr)
                weights.append(_check_weight(node, inputs, opset, candidates, float_consts))
        elif inputs[0] is None:  # QuantizeLinear of an activation
            expected_pairs += 1
            problem = _check_activation(node, inputs, by_name, unmatched)
            found_pairs += problem is None
            if problem:
                problems.append(problem)
    problems = [w.problem for w in weights if w.problem] + problems
    return CoremlVerification(path, op_counts_from_spec(mlmodel.get_spec()), tuple(weights), expected_pairs,
                              found_pairs, compressed_bytes, float_bytes, tuple(problems))
