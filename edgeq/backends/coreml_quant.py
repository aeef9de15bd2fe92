"""QDQ → Core ML: compressed weights and activation quantize/dequantize.

* ``DequantizeLinear`` of a constant int8/uint8/int4/uint4 tensor becomes a :class:`QuantizedWeight`, which
  is emitted as ``constexpr_affine_dequantize`` (iOS16/17: int8/uint8, per-tensor or per-channel) or
  ``constexpr_blockwise_shift_scale`` (iOS18: also int4/uint4 and per-block). The package stores the integers;
  Core ML expands them at load time or on the fly. A float copy of the weight is never written.
* ``DequantizeLinear`` of int32 (bias) and of integer types Core ML cannot store compressed is folded to float.
* ``QuantizeLinear`` → ``DequantizeLinear`` on an activation becomes ``quantize`` → ``dequantize`` (iOS17+)
  with the same scale and zero point.

The constexpr op of a weight is named after the ONNX ``DequantizeLinear`` output (see :func:`weight_op_name`),
which is how :mod:`edgeq.backends.coreml_verify` finds it again in the saved package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from edgeq.backends.coreml_context import LoweringContext, NodeUnsupported, fold_node, sanitize, translates

COMPRESSIBLE = ("int8", "uint8", "int4", "uint4")
# Suffixes coremltools' passes append to op names (fp16 casting); stripped when matching names.
_PASS_SUFFIX = re.compile(r"(_cast_fp16|_cast_fp32|_to_fp16|_to_fp32)+$")
_TRANSPOSED = re.compile(r"^(?P<base>.*?)__T(?P<perm>\d+)$")


def weight_op_name(source: str, perm: tuple[int, ...] | None) -> str:
    base = sanitize(source)
    if perm is None or list(perm) == sorted(perm):
        return base
    return f"{base}__T{''.join(str(p) for p in perm)}"


def parse_weight_op_name(mil_name: str) -> tuple[str, tuple[int, ...] | None]:
    """Inverse of :func:`weight_op_name` for a name read back from a package: (sanitized source, perm)."""
    name = _PASS_SUFFIX.sub("", mil_name)
    match = _TRANSPOSED.match(name)
    if match:
        return match["base"], tuple(int(c) for c in match["perm"])
    return name, None


def strip_pass_suffix(mil_name: str) -> str:
    return _PASS_SUFFIX.sub("", mil_name)


@dataclass(frozen=True)
class CompressedWeight:
    """One weight stored compressed in the package."""

    onnx_name: str  # the DequantizeLinear output
    mil_op: str
    op_type: str  # constexpr_affine_dequantize | constexpr_blockwise_shift_scale
    dtype: str  # int8 | uint8 | int4 | uint4
    granularity: str  # per_tensor | per_channel | per_block
    shape: tuple[int, ...]
    block_size: int | None


@dataclass
class QuantizedWeight:
    """A constant integer weight with its dequantization parameters, held until an op needs it.

    ``scale`` and ``zero_point`` are kept at the rank of ``data`` (one entry per block; size 1 along
    dimensions that share a scale), so a transpose of the weight is a transpose of all three.
    """

    source: str
    data: np.ndarray  # int8 or uint8 numpy array (int4/uint4 values widened)
    dtype: str
    scale: np.ndarray
    zero_point: np.ndarray | None  # None when all zeros
    granularity: str
    block_size: int | None
    perm: tuple[int, ...] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def transposed(self, perm) -> QuantizedWeight:
        perm = tuple(int(p) for p in perm)
        composed = perm if self.perm is None else tuple(self.perm[p] for p in perm)
        if composed == tuple(range(len(composed))):
            composed = None
        zp = None if self.zero_point is None else self.zero_point.transpose(perm)
        return QuantizedWeight(self.source, self.data.transpose(perm), self.dtype, self.scale.transpose(perm), zp,
                               self.granularity, self.block_size, composed, self._cache)

    def materialize(self, ctx: LoweringContext) -> Var:
        key = self.perm
        if key not in self._cache:
            self._cache[key] = self._emit(ctx)
        return self._cache[key]

    def _emit(self, ctx: LoweringContext) -> Var:
        name = ctx.unique_name(weight_op_name(self.source, self.perm))
        if ctx.target_level >= 18:
            op_type = "constexpr_blockwise_shift_scale"
            sub_byte = {"int4": types.np_int4_dtype, "uint4": types.np_uint4_dtype}.get(self.dtype)
            data = self.data.astype(sub_byte) if sub_byte is not None else self.data
            kwargs = {"data": data, "scale": self.scale}
            if self.zero_point is not None:
                kwargs["offset"] = self.zero_point.astype(sub_byte) if sub_byte is not None else self.zero_point
            var = mb.constexpr_blockwise_shift_scale(**kwargs, name=name)
        else:
            op_type = "constexpr_affine_dequantize"
            var = mb.constexpr_affine_dequantize(**self._affine_params(), name=name)
        ctx.weights.append(CompressedWeight(self.source, var.op.name, op_type, self.dtype, self.granularity,
                                            self.shape, self.block_size))
        return var

    def _affine_params(self) -> dict:
        zero = np.zeros(self.scale.shape, self.data.dtype)
        zp = self.zero_point if self.zero_point is not None else zero
        channel_axes = [a for a, s in enumerate(self.scale.shape) if s != 1]
        if not channel_axes:  # per-tensor (or a per-channel tensor with a single channel)
            return {"quantized_data": self.data, "scale": self.scale.reshape(()), "zero_point": zp.reshape(()),
                    "axis": 0}
        (axis,) = channel_axes
        return {"quantized_data": self.data, "scale": self.scale.reshape(-1), "zero_point": zp.reshape(-1),
                "axis": axis}


def _full_rank_params(ctx: LoweringContext, data: np.ndarray, scale: np.ndarray, zp: np.ndarray | None):
    """Scale and zero point at the rank of ``data``, and the granularity (ONNX DequantizeLinear semantics)."""
    rank = data.ndim
    axis = int(ctx.attr("axis", 1))
    axis = axis + rank if axis < 0 else axis
    block_size = int(ctx.attr("block_size", 0))
    if block_size > 0:
        if data.shape[axis] % block_size:
            raise NodeUnsupported(f"block_size {block_size} does not divide dimension {data.shape[axis]} of "
                                  f"{ctx.node.input[0]!r}; Core ML needs whole blocks")
        return scale, zp, "per_block", block_size
    shape = [1] * rank
    if scale.size == 1:
        granularity = "per_tensor"
    else:
        shape[axis] = scale.size
        granularity = "per_channel"
    return scale.reshape(shape), None if zp is None else zp.reshape(shape), granularity, None


def _weight_dequantize(ctx: LoweringContext, data: np.ndarray):
    dtype = data.dtype.name
    if dtype not in COMPRESSIBLE or data.ndim == 0:
        if dtype != "int32" and data.ndim:
            ctx.note(f"{ctx.node.input[0]!r}: {dtype} weights have no compressed Core ML form; stored as float")
        inputs = [ctx.value(i) if ctx.has_input(i) else None for i in range(len(ctx.node.input))]
        return fold_node(ctx.node, inputs, ctx.opset)[0]
    scale = ctx.const(1, "DequantizeLinear scale")
    zp = ctx.optional_const(2, "DequantizeLinear zero point")
    scale, zp, granularity, block_size = _full_rank_params(ctx, data, scale, zp)
    if ctx.target_level < 18 and (dtype in ("int4", "uint4") or granularity == "per_block"):
        what = f"{dtype} weights" if dtype in ("int4", "uint4") else "per-block quantized weights"
        raise NodeUnsupported(f"{what} need constexpr_blockwise_shift_scale: set minimum_deployment_target to "
                              "iOS18 or macOS15")
    widened = data.astype(np.int8 if dtype in ("int8", "int4") else np.uint8)
    if zp is not None:
        zp = zp.astype(widened.dtype)
        if not zp.any():
            zp = None
    return QuantizedWeight(ctx.node.output[0], widened, dtype, np.ascontiguousarray(scale), zp, granularity,
                           block_size)


def _activation_params(ctx: LoweringContext, x: Var, what: str):
    if ctx.target_level < 17:
        raise NodeUnsupported(f"activation {what} needs Core ML's quantize/dequantize ops: "
                              "set minimum_deployment_target to iOS17 or later")
    if int(ctx.attr("block_size", 0)):
        raise NodeUnsupported(f"block-wise {what} on an activation has no Core ML equivalent")
    scale = ctx.const(1, f"{what} scale")
    zp = ctx.optional_const(2, f"{what} zero point")
    params = {"scale": scale.astype(np.float16 if scale.dtype == np.float16 else np.float32)}
    if scale.size > 1:
        axis = int(ctx.attr("axis", 1))
        params["axis"] = axis + x.rank if axis < 0 else axis
        params["scale"] = params["scale"].reshape(-1)
    else:
        params["scale"] = params["scale"].reshape(())
    if zp is not None:
        zp = zp.reshape(params["scale"].shape)
    return params, zp


def _canonical_zero_point(zp: np.ndarray | None, dtype: str) -> tuple[np.ndarray | None, str]:
    """The zero point and dtype Core ML prefers for the same mapping: no zero point when it is 0, and uint8
    with zero point 128 as int8 without one (u = i + 128). coremltools' nullify_redundant_quantization_zero_point
    pass would make this rewrite anyway, renaming the ops; doing it here keeps their names."""
    if zp is None or not zp.any():
        return None, dtype
    if dtype == "uint8" and np.all(zp == 128):
        return None, "int8"
    return zp.astype(dtype), dtype


@translates("DequantizeLinear")
def dequantize_linear(ctx: LoweringContext, node):
    x = ctx.value(0)
    if isinstance(x, np.ndarray):
        return _weight_dequantize(ctx, x)
    if not isinstance(x, Var):
        raise NodeUnsupported("DequantizeLinear of an already dequantized weight")
    if x.dtype not in (types.int8, types.uint8):
        raise NodeUnsupported(f"activation DequantizeLinear of {types.builtin_to_string(x.dtype)}: "
                              "Core ML dequantize takes int8/uint8 only")
    params, zp = _activation_params(ctx, x, "DequantizeLinear")
    if zp is not None and zp.dtype == np.uint8 and x.dtype == types.int8:  # its QuantizeLinear went int8
        zp = (zp.astype(np.int16) - 128).astype(np.int8)
    if zp is not None and zp.any():
        params["zero_point"] = zp.astype(types.nptype_from_builtin(x.dtype))
    return mb.dequantize(input=x, **params, name=ctx.out_name())


@translates("QuantizeLinear")
def quantize_linear(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    params, zp = _activation_params(ctx, x, "QuantizeLinear")
    output_dtype = zp.dtype.name if zp is not None else {2: "uint8", 3: "int8"}.get(ctx.attr("output_dtype", 2))
    if output_dtype not in ("int8", "uint8"):
        raise NodeUnsupported(f"activation QuantizeLinear to {output_dtype}: Core ML quantize outputs int8/uint8 only")
    zp, output_dtype = _canonical_zero_point(zp, output_dtype)
    if zp is not None:
        params["zero_point"] = zp
    params["scale"] = params["scale"].astype(types.nptype_from_builtin(x.dtype))
    ctx.activation_qdq.append(node.name or node.output[0])
    return mb.quantize(input=x, **params, output_dtype=output_dtype, name=ctx.out_name())
