"""A numpy interpreter for the MIL program inside a saved package, for checking lowerings where Core ML
cannot run (coremltools predicts on macOS only).

Most ops are evaluated by coremltools itself: the op is rebuilt with constant inputs and its own value
inference computes the result, so the semantics are coremltools' rather than edgeq's. The ops coremltools
cannot evaluate (convolution, pooling, batch/instance norm, resizing, dequantize, compressed weights) have
numpy implementations here, written from the MIL op documentation. Results are rounded to each op's output
dtype, so a float16 program is evaluated with float16 intermediates (accumulation happens in float32).
This is a semantic check of the program, not a model of Core ML's kernels or the Neural Engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, types

from edgeq.backends.coreml_verify import load_program  # noqa: F401 (re-exported for callers)

_NUMPY: dict[str, Callable] = {}


def _implements(*op_types: str):
    def register(fn):
        for op_type in op_types:
            _NUMPY[op_type] = fn
        return fn

    return register


class _QuietPrecisionWarnings(logging.Filter):
    """coremltools warns each time value inference yields float64 for a float32 tensor; here that is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "might lose precision" not in record.getMessage()


def evaluate_program(program, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``program``'s main function on ``feeds`` (keyed by the program's input names)."""
    ct_logger = logging.getLogger("coremltools")
    quiet = _QuietPrecisionWarnings()
    ct_logger.addFilter(quiet)
    try:
        return _evaluate(program, feeds)
    finally:
        ct_logger.removeFilter(quiet)


def _evaluate(program, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    function = program.functions["main"]
    env: dict[str, np.ndarray] = {}
    for name, var in function.inputs.items():
        env[name] = np.asarray(feeds[name]).astype(types.nptype_from_builtin(var.dtype))
    for op in function.operations:
        if op.op_type == "const":
            results = [op.outputs[0].val]
        elif op.op_type.startswith("constexpr_"):
            results = [op.materialized_val_inference()]
        elif op.op_type in _NUMPY:
            results = _NUMPY[op.op_type](_Args(op, env))
            results = results if isinstance(results, (tuple, list)) else [results]
        else:
            results = _by_coremltools(op, env, function.opset_version)
        for var, value in zip(op.outputs, results):
            env[var.name] = _as_dtype(value, var)
    return {var.name: env[var.name] for var in function.outputs}


def _as_dtype(value, var) -> np.ndarray:
    if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
        return np.asarray(value).astype(types.nptype_from_builtin(var.dtype))
    return value


def _value(var, env):
    value = env.get(var.name, var.val)
    if isinstance(value, (np.bool_, np.integer)):  # numpy scalars trip coremltools' value inference
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "US" and value.ndim == 0:
        return str(value)
    return value


def _by_coremltools(op, env, opset) -> list:
    kwargs = {}
    for name, var in op.inputs.items():
        kwargs[name] = [_value(v, env) for v in var] if isinstance(var, (list, tuple)) else _value(var, env)
    with Function({}, opset_version=opset):
        outputs = getattr(mb, op.op_type)(**kwargs)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    if any(out.val is None for out in outputs):
        raise NotImplementedError(f"the reference interpreter cannot evaluate MIL op {op.op_type!r}")
    return [out.val for out in outputs]


class _Args:
    """An op's inputs as numpy values (float inputs widened to float32 for computing)."""

    def __init__(self, op, env):
        self.op, self.env = op, env

    def __call__(self, name, default=None):
        var = self.op.inputs.get(name)
        if var is None:
            return default
        value = _value(var, self.env)
        if isinstance(value, np.ndarray) and value.dtype == np.float16:
            return value.astype(np.float32)
        return value


def _pairs(pad_type, pad, in_sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    if pad_type == "custom":
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(kernel))]
    if pad_type == "valid":
        return [(0, 0)] * len(kernel)
    pairs = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        pairs.append((total // 2, total - total // 2) if pad_type == "same" else (total - total // 2, total // 2))
    return pairs


def _window_params(a: _Args, x, kernel):
    n = len(kernel)
    strides = [int(s) for s in a("strides", [1] * n)]
    dilations = [int(d) for d in a("dilations", [1] * n)]
    pads = _pairs(a("pad_type", "valid"), a("pad", [0] * 2 * n), x.shape[2:], kernel, strides, dilations)
    return strides, dilations, pads


@_implements("conv")
def _conv(a: _Args):
    x, w = a("x"), a("weight")
    groups = int(a("groups", 1))
    kernel = w.shape[2:]
    strides, dilations, pads = _window_params(a, x, kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + pads)
    n, c = x.shape[:2]
    o = w.shape[0]
    out_sizes = [(x.shape[2 + i] - (k - 1) * d - 1) // s + 1 for i, (k, d, s) in enumerate(zip(kernel, dilations,
                                                                                              strides))]
    xg = x.reshape(n, groups, c // groups, *x.shape[2:])
    wg = w.reshape(groups, o // groups, c // groups, *kernel)
    out = np.zeros((n, groups, o // groups, *out_sizes), np.float32)
    for offset in np.ndindex(*kernel):
        window = tuple(slice(k * d, k * d + (m - 1) * s + 1, s)
                       for k, d, m, s in zip(offset, dilations, out_sizes, strides))
        out += np.einsum("ngc...,goc->ngo...", xg[(slice(None),) * 3 + window], wg[(slice(None),) * 3 + offset])
    out = out.reshape(n, o, *out_sizes)
    bias = a("bias")
    return out if bias is None else out + bias.reshape(1, -1, *[1] * len(kernel))


@_implements("conv_transpose")
def _conv_transpose(a: _Args):
    x, w = a("x"), a("weight")
    groups = int(a("groups", 1))
    kernel = w.shape[2:]
    n, c = x.shape[:2]
    strides = [int(s) for s in a("strides", [1] * len(kernel))]
    dilations = [int(d) for d in a("dilations", [1] * len(kernel))]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(x.shape[2:], strides, kernel, dilations)]
    o = w.shape[1] * groups
    xg = x.reshape(n, groups, c // groups, *x.shape[2:])
    wg = w.reshape(groups, c // groups, o // groups, *kernel)
    out = np.zeros((n, groups, o // groups, *full), np.float32)
    for offset in np.ndindex(*kernel):
        window = tuple(slice(k * d, k * d + (i - 1) * s + 1, s)
                       for k, d, i, s in zip(offset, dilations, x.shape[2:], strides))
        out[(slice(None),) * 3 + window] += np.einsum("ngc...,gco->ngo...", xg, wg[(slice(None),) * 3 + offset])
    out = out.reshape(n, o, *full)
    pad_type = a("pad_type", "valid")
    if pad_type == "custom":
        pad = a("pad")
        out = out[(slice(None),) * 2 + tuple(slice(int(pad[2 * i]), f - int(pad[2 * i + 1]))
                                             for i, f in enumerate(full))]
    elif pad_type != "valid":
        raise NotImplementedError(f"conv_transpose pad_type={pad_type!r}")
    bias = a("bias")
    return out if bias is None else out + bias.reshape(1, -1, *[1] * len(kernel))


def _pool(a: _Args, kind: str):
    x = a("x")
    kernel = [int(k) for k in a("kernel_sizes")]
    strides, _, pads = _window_params(a, x, kernel)
    ceil = bool(a("ceil_mode", False))
    outs, extra = [], []
    for size, k, s, (b, e) in zip(x.shape[2:], kernel, strides, pads):
        span = size + b + e - k
        m = (math.ceil(span / s) if ceil else span // s) + 1
        outs.append(m)
        extra.append(max(0, (m - 1) * s + k - (size + b + e)))
    widths = [(0, 0), (0, 0)] + [(b, e + x_) for (b, e), x_ in zip(pads, extra)]
    fill = -np.inf if kind == "max" else 0.0
    padded = np.pad(x, widths, constant_values=fill)
    if kind == "avg" and a("exclude_padding_from_average", False):
        counts = np.pad(np.ones(x.shape[2:], np.float32), widths[2:])
    else:
        counts = np.pad(np.ones([s + b + e for s, (b, e) in zip(x.shape[2:], pads)], np.float32),
                        [(0, x_) for x_ in extra])
    result = np.full(x.shape[:2] + tuple(outs), fill, np.float32)
    total = np.zeros(outs, np.float32)
    for offset in np.ndindex(*kernel):
        window = tuple(slice(k, k + (m - 1) * s + 1, s) for k, m, s in zip(offset, outs, strides))
        patch = padded[(slice(None),) * 2 + window]
        result = np.maximum(result, patch) if kind == "max" else result + patch
        total += counts[window]
    return result if kind == "max" else result / total


@_implements("max_pool")
def _max_pool(a: _Args):
    return _pool(a, "max")


@_implements("avg_pool")
def _avg_pool(a: _Args):
    return _pool(a, "avg")


def _channel(value, rank):
    return np.asarray(value).reshape(1, -1, *[1] * (rank - 2))


@_implements("batch_norm")
def _batch_norm(a: _Args):
    x = a("x")
    scale = _channel(a("gamma", np.ones(x.shape[1])), x.ndim)
    shift = _channel(a("beta", np.zeros(x.shape[1])), x.ndim)
    std = np.sqrt(_channel(a("variance"), x.ndim) + float(a("epsilon", 1e-5)))
    return (x - _channel(a("mean"), x.ndim)) / std * scale + shift


@_implements("instance_norm")
def _instance_norm(a: _Args):
    x = a("x")
    axes = tuple(range(2, x.ndim))
    norm = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + float(a("epsilon", 1e-5)))
    gamma, beta = a("gamma"), a("beta")
    norm = norm if gamma is None else norm * _channel(gamma, x.ndim)
    return norm if beta is None else norm + _channel(beta, x.ndim)


@_implements("dequantize")
def _dequantize(a: _Args):
    x, scale, zp, axis = a("input"), np.asarray(a("scale")), a("zero_point"), a("axis")
    shape = [1] * x.ndim
    if scale.ndim == 1:
        shape[int(axis)] = -1
    centered = x.astype(np.float32) - (0 if zp is None else np.asarray(zp, np.float32).reshape(shape))
    return centered * scale.reshape(shape)


def _grid(n_in: int, n_out: int, mode: str) -> np.ndarray:
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        grid = i * (n_in - 1) / (n_out - 1) if n_out > 1 else np.full(1, (n_in - 1) / 2 if mode == "ALIGN_CORNERS"
                                                                       else 0.0)
    elif mode == "DEFAULT":
        grid = i * ((n_in - n_in / n_out) / (n_out - 1) if n_out > 1 else 0.0)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        grid = 0.5 * delta + i * delta
    else:  # UNALIGN_CORNERS
        spacing = n_in / n_out
        grid = i * spacing + 0.5 * spacing - 0.5
    return np.clip(grid, 0, n_in - 1)


def _interpolate(x: np.ndarray, axis: int, grid: np.ndarray) -> np.ndarray:
    low = np.floor(grid).astype(int)
    high = np.minimum(low + 1, x.shape[axis] - 1)
    weight = (grid - low).reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)])
    return np.take(x, low, axis) * (1 - weight) + np.take(x, high, axis) * weight


@_implements("resize_bilinear")
def _resize_bilinear(a: _Args):
    x, mode = a("x"), a("sampling_mode", "DEFAULT")
    h, w = int(a("target_size_height", 1)), int(a("target_size_width", 1))
    x = _interpolate(x, -2, _grid(x.shape[-2], h, mode))
    return _interpolate(x, -1, _grid(x.shape[-1], w, mode))


@_implements("upsample_nearest_neighbor")
def _upsample_nearest(a: _Args):
    x = a("x")
    for axis, factor in ((-2, a("scale_factor_height", 1)), (-1, a("scale_factor_width", 1))):
        n_out = math.floor(x.shape[axis] * float(factor))
        x = np.take(x, np.minimum((np.arange(n_out) / float(factor)).astype(int), x.shape[axis] - 1), axis)
    return x


_REDUCTIONS = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod, "reduce_sum_square": lambda x, **kw: np.sum(x * x, **kw),
    "reduce_l1_norm": lambda x, **kw: np.sum(np.abs(x), **kw),
    "reduce_l2_norm": lambda x, **kw: np.sqrt(np.sum(x * x, **kw)),
    "reduce_log_sum_exp": lambda x, **kw: np.log(np.sum(np.exp(x), **kw)),
}


def _reduce(a: _Args):
    # coremltools' own value inference passes numpy bools as keepdims, which numpy 2 rejects.
    x, axes = a("x"), a("axes")
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(i) for i in np.asarray(axes).reshape(-1))
    return _REDUCTIONS[a.op.op_type](x, axis=axes, keepdims=bool(a("keep_dims", False)))


for _name in _REDUCTIONS:
    _implements(_name)(_reduce)
