"""Quantization arithmetic: integer ranges, scale/zero-point selection and weight quantization."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

try:
    import ml_dtypes  # noqa: F401  (onnx depends on it; gives numpy int4/float8 dtypes)
except ImportError:  # pragma: no cover
    ml_dtypes = None


@dataclass(frozen=True)
class IntRange:
    qmin: int
    qmax: int
    np_dtype: object
    onnx_type: int
    bits: int


INT_TYPES = {
    "int8": IntRange(-128, 127, np.int8, onnx.TensorProto.INT8, 8),
    "uint8": IntRange(0, 255, np.uint8, onnx.TensorProto.UINT8, 8),
    "int16": IntRange(-32768, 32767, np.int16, onnx.TensorProto.INT16, 16),
    "uint16": IntRange(0, 65535, np.uint16, onnx.TensorProto.UINT16, 16),
    "int4": IntRange(-8, 7, None, onnx.TensorProto.INT4, 4),
    "uint4": IntRange(0, 15, None, onnx.TensorProto.UINT4, 4),
    "int32": IntRange(-(2**31), 2**31 - 1, np.int32, onnx.TensorProto.INT32, 32),
}
FP8_MAX = {"float8e4m3fn": 448.0}
FP8_ONNX = {"float8e4m3fn": onnx.TensorProto.FLOAT8E4M3FN}


def narrow_numpy_dtype(dtype: str):
    """The ml_dtypes numpy type for dtypes numpy lacks (int4, uint4, float8), else None."""
    if ml_dtypes is None:
        return None
    return {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "float8e4m3fn": ml_dtypes.float8_e4m3fn}.get(dtype)


def is_float8(dtype: str) -> bool:
    return dtype in FP8_MAX


def required_opset(dtype: str) -> int:
    """The lowest opset whose QuantizeLinear/DequantizeLinear accept ``dtype``."""
    if dtype in ("int16", "uint16", "int4", "uint4"):
        return 21
    if dtype in FP8_MAX:
        return 19
    return 10


def levels(dtype: str) -> int:
    if dtype in INT_TYPES:
        r = INT_TYPES[dtype]
        return r.qmax - r.qmin + 1
    return 256


def activation_params(lo: float, hi: float, dtype: str, *, symmetric: bool,
                      min_range: float = 1e-5) -> tuple[np.float32, int]:
    """Scale and zero point covering ``[lo, hi]`` (which must contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < min_range:
        hi = lo + min_range
    if dtype in FP8_MAX:
        return np.float32(max(-lo, hi) / FP8_MAX[dtype]), 0
    r = INT_TYPES[dtype]
    if symmetric:
        amax = max(-lo, hi)
        if r.qmin < 0:
            return np.float32(amax / r.qmax), 0
        mid = (r.qmax + 1) // 2
        return np.float32(amax / (r.qmax - mid)), mid
    scale = (hi - lo) / (r.qmax - r.qmin)
    zp = int(np.clip(round(r.qmin - lo / scale), r.qmin, r.qmax))
    return np.float32(scale), zp


def observed_params(obs, spec, dtype: str | None = None) -> tuple[np.float32, int]:
    """Scale and zero point that a profile's activation spec (``observer``, ``percentile``, ``symmetric``,
    ``min_real_range``) gives a tensor with calibration observer ``obs``, in ``dtype`` (default: the spec's)."""
    dtype = dtype or spec.dtype
    lo, hi = obs.range(spec.observer, percentile=spec.percentile, symmetric=spec.symmetric, levels=levels(dtype))
    return activation_params(lo, hi, dtype, symmetric=spec.symmetric, min_range=spec.min_real_range)


def quantize_array(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: str) -> np.ndarray:
    r = INT_TYPES[dtype]
    q = np.clip(np.round(x / scale) + zp, r.qmin, r.qmax)
    return q.astype(np.int32 if r.np_dtype is None else r.np_dtype)


def broadcast_params(scale: np.ndarray, zero_point: np.ndarray, *, axis: int | None, block_size: int,
                     shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor, per-channel (``axis``) or blockwise (``block_size`` along ``axis``) scale and zero point,
    broadcastable to a weight of ``shape``."""
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    if block_size:
        cut = tuple(slice(0, d) for d in shape)
        return (np.repeat(scale, block_size, axis=axis)[cut], np.repeat(zero_point, block_size, axis=axis)[cut])
    if axis is not None:
        view = [1] * len(shape)
        view[axis] = -1
        return scale.reshape(view), zero_point.reshape(view)
    return scale, zero_point


@dataclass
class QuantizedWeight:
    q: np.ndarray  # integer values (int32 holder for 4-bit types)
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    block_size: int
    dtype: str

    def dequantize(self) -> np.ndarray:
        z = np.zeros_like(self.scale) if is_float8(self.dtype) else self.zero_point
        s, z = broadcast_params(self.scale, z, axis=self.axis, block_size=self.block_size, shape=self.q.shape)
        return ((self.q.astype(np.float64) - z) * s).astype(np.float32)


def quantize_weight(w: np.ndarray, dtype: str, *, symmetric: bool = True, axis: int | None = None,
                    block_size: int = 0, clip_ratio: np.ndarray | float | None = None) -> QuantizedWeight:
    """Quantize a constant: per-tensor (axis None), per-channel along ``axis``, or blockwise along ``axis``."""
    w = np.asarray(w, dtype=np.float32)
    if is_float8(dtype):
        return _quantize_weight_fp8(w, dtype, axis)
    r = INT_TYPES[dtype]
    if block_size:
        k = w.shape[axis]
        pad = (-k) % block_size
        wp = np.pad(w, [(0, pad) if i == axis else (0, 0) for i in range(w.ndim)]) if pad else w
        shape = list(wp.shape)
        shape[axis:axis + 1] = [wp.shape[axis] // block_size, block_size]
        blocks = wp.reshape(shape)
        red = axis + 1
        lo, hi = blocks.min(axis=red), blocks.max(axis=red)
    elif axis is not None:
        red = tuple(i for i in range(w.ndim) if i != axis)
        lo, hi = w.min(axis=red), w.max(axis=red)
    else:
        lo, hi = np.array(w.min()), np.array(w.max())
    if clip_ratio is not None:
        lo, hi = lo * clip_ratio, hi * clip_ratio
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        amax = np.maximum(-lo, hi)
        qmax = r.qmax if r.qmin < 0 else (r.qmax - (r.qmax + 1) // 2)
        scale = amax / qmax
        zp = np.zeros_like(scale) if r.qmin < 0 else np.full_like(scale, (r.qmax + 1) // 2)
    else:
        scale = (hi - lo) / (r.qmax - r.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(r.qmin - lo / safe), r.qmin, r.qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    s_full, z_full = broadcast_params(scale, zp, axis=axis, block_size=block_size, shape=w.shape)
    q = np.clip(np.round(w / s_full) + z_full, r.qmin, r.qmax)
    holder = np.int32 if r.np_dtype is None else r.np_dtype
    zp_arr = zp.astype(holder)
    return QuantizedWeight(q.astype(holder), scale.astype(np.float32), zp_arr, axis, block_size, dtype)


def requantize_for_bias(q: np.ndarray, scale: np.ndarray, bias: np.ndarray, input_scale: float, *, axis: int,
                        limit: int = 2**30) -> tuple[np.ndarray, np.ndarray] | None:
    """Symmetric weight ``(q, scale)`` with scales raised so that ``bias / (input_scale * scale)`` fits in
    ``limit``; None when it already fits. A channel with near-zero weights (BatchNorm folded with gamma ~ 0) has a
    tiny scale and a bias that would need far more than 31 bits; its weights round to ~0 under either scale."""
    scale = np.asarray(scale, np.float64)
    need = np.abs(np.asarray(bias, np.float64)) / (input_scale * limit)
    new = np.maximum(scale.reshape(-1), need) if scale.size > 1 else np.asarray(max(scale.item(), need.max()))
    if np.array_equal(new, scale.reshape(np.shape(new))):
        return None
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis % q.ndim] = -1
    qmax = np.iinfo(q.dtype).max
    real = q.astype(np.float64) * scale.reshape(shape)
    requantized = np.clip(np.round(real / new.reshape(shape)), -qmax, qmax).astype(q.dtype)
    return requantized, new.astype(np.float32).reshape(np.shape(scale))


def make_int_tensor(name: str, values: np.ndarray, dtype: str) -> onnx.TensorProto:
    """A TensorProto for ``values`` in ``dtype`` (packs 4-bit types)."""
    r = INT_TYPES[dtype]
    if r.bits == 4:
        return onnx.helper.make_tensor(name, r.onnx_type, list(values.shape), values.astype(np.int32).ravel().tolist())
    return onnx.numpy_helper.from_array(np.asarray(values, dtype=r.np_dtype), name)


def _quantize_weight_fp8(w: np.ndarray, dtype: str, axis: int | None) -> QuantizedWeight:
    """FP8 weights: scale = amax / fp8_max (per channel or per tensor); values are rounded by the cast to fp8."""
    fmax = FP8_MAX[dtype]
    if axis is not None:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red)
        shape = [1] * w.ndim
        shape[axis] = -1
    else:
        amax, shape = np.array(np.abs(w).max()), None
    scale = np.where(amax > 0, amax / fmax, 1.0).astype(np.float32)
    full = scale.reshape(shape) if shape else scale
    q = np.clip(w / full, -fmax, fmax).astype(narrow_numpy_dtype(dtype)).astype(np.float32)
    return QuantizedWeight(q, scale, np.zeros_like(scale), axis, 0, dtype)
