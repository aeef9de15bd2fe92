"""ONNX → MIL translators for the layers: convolutions, Gemm/MatMul, pooling, normalization.

Padding is always made explicit (``pad_type="custom"``): ONNX ``auto_pad`` is resolved here from the static
shapes, so Core ML never has to guess which side gets the odd pixel.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from edgeq.backends.coreml_context import (
    LoweringContext,
    NodeUnsupported,
    rank_of,
    shape_of,
    to_mil_array,
    translates,
)
from edgeq.backends.coreml_quant import QuantizedWeight
from edgeq.op_tables import conv_pads


def _spatial_pads(ctx: LoweringContext, in_sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dimension, with ONNX auto_pad resolved."""
    return conv_pads(ctx.attr("auto_pad", "NOTSET"), ctx.attr("pads"), in_sizes, kernel, strides, dilations)


def _flat(pads: list[tuple[int, int]]) -> list[int]:
    return [p for pair in pads for p in pair]


def _window(ctx: LoweringContext, x: Var, kernel):
    n = len(kernel)
    strides = [int(s) for s in ctx.attr("strides", [1] * n)]
    dilations = [int(d) for d in ctx.attr("dilations", [1] * n)]
    return strides, dilations, _spatial_pads(ctx, x.shape[2:], kernel, strides, dilations)


def _weight(ctx: LoweringContext, index: int, like: Var) -> Var:
    return ctx.var(ctx.value(index), like)


@translates("Conv")
def conv(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    kernel = [int(k) for k in shape_of(ctx.value(1))[2:]]
    strides, dilations, pads = _window(ctx, x, kernel)
    bias = ctx.input_var(2, like=x) if ctx.has_input(2) else None
    return mb.conv(x=x, weight=_weight(ctx, 1, x), bias=bias, strides=strides, pad_type="custom", pad=_flat(pads),
                   dilations=dilations, groups=int(ctx.attr("group", 1)), name=ctx.out_name())


@translates("ConvTranspose")
def conv_transpose(ctx: LoweringContext, node):
    """Run the transposed convolution unpadded, then crop (pads) or zero-extend (output_padding) to size."""
    x = ctx.input_var(0)
    w_shape = shape_of(ctx.value(1))
    kernel = [int(k) for k in w_shape[2:]]
    n = len(kernel)
    strides = [int(s) for s in ctx.attr("strides", [1] * n)]
    dilations = [int(d) for d in ctx.attr("dilations", [1] * n)]
    out_pad = [int(p) for p in ctx.attr("output_padding", [0] * n)]
    group = int(ctx.attr("group", 1))
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(x.shape[2:], strides, kernel, dilations)]
    output_shape = ctx.attr("output_shape")
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = list(output_shape)[-n:] if output_shape is not None else [i * s for i, s in zip(x.shape[2:], strides)]
        pads = []
        for f, extra, want in zip(full, out_pad, wanted):
            total = f + extra - want
            if total < 0:
                raise NodeUnsupported(f"output_shape {list(wanted)} is larger than the transposed convolution")
            small = total // 2
            pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
    elif auto_pad == "VALID":
        pads = [(0, 0)] * n
    else:
        flat = list(ctx.attr("pads", [0] * 2 * n))
        pads = [(int(flat[i]), int(flat[i + n])) for i in range(n)]
    y = mb.conv_transpose(x=x, weight=_weight(ctx, 1, x), strides=strides, dilations=dilations, groups=group,
                          pad_type="valid", name=ctx.tmp_name("deconv"))
    begin = [0, 0] + [b for b, _ in pads]
    end = [int(y.shape[0]), int(y.shape[1])] + [f + o - e for f, o, (_, e) in zip(full, out_pad, pads)]
    crop_end = [min(e, int(s)) for e, s in zip(end, y.shape)]
    if begin != [0] * len(begin) or crop_end != list(y.shape):
        y = mb.slice_by_index(x=y, begin=begin, end=crop_end, name=ctx.tmp_name("crop"))
    grow = [e - c for e, c in zip(end, crop_end)][2:]
    if any(grow):
        y = mb.pad(x=y, pad=[p for g in grow for p in (0, g)], mode="constant", constant_val=0.0,
                   name=ctx.tmp_name("outpad"))
    if ctx.has_input(2):
        bias = ctx.var(_reshaped(ctx, ctx.value(2), [-1] + [1] * n), like=x)
        return mb.add(x=y, y=bias, name=ctx.out_name())
    return mb.identity(x=y, name=ctx.out_name())


def _as_linear_weight(value, transposed: bool):
    """A (N, K) constant for ``mb.linear`` from a B operand that is (K, N), or (N, K) when ``transposed``."""
    if isinstance(value, QuantizedWeight):
        return value if transposed else value.transposed((1, 0))
    return value if transposed else value.T


@translates("Gemm")
def gemm(ctx: LoweringContext, node):
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))
    a = ctx.input_var(0)
    if trans_a:
        a = mb.transpose(x=a, perm=[1, 0], name=ctx.tmp_name("transA"))
    b = ctx.value(1)
    c = ctx.value(2) if ctx.has_input(2) else None
    bias = None
    if isinstance(c, np.ndarray) and alpha == 1.0:
        n = shape_of(b)[0 if trans_b else 1]
        if c.size in (1, n) and c.ndim <= 2 and (c.ndim < 2 or c.shape[0] == 1):
            bias, c = to_mil_array(np.broadcast_to(beta * c.reshape(-1), (n,)), like=a), None
    if not isinstance(b, Var):
        y = mb.linear(x=a, weight=ctx.var(_as_linear_weight(b, trans_b), like=a), bias=bias,
                      name=ctx.out_name() if c is None and alpha == 1.0 else ctx.tmp_name("linear"))
    else:
        y = mb.matmul(x=a, y=b, transpose_y=trans_b, name=ctx.tmp_name("matmul"))
        if bias is not None:
            y = mb.add(x=y, y=bias, name=ctx.out_name() if c is None and alpha == 1.0 else ctx.tmp_name("bias"))
    if alpha != 1.0:
        y = mb.mul(x=y, y=to_mil_array(np.array(alpha), like=y),
                   name=ctx.out_name() if c is None else ctx.tmp_name("alpha"))
    if c is not None:
        c_var = ctx.var(c, like=y)
        if beta != 1.0:
            c_var = mb.mul(x=c_var, y=to_mil_array(np.array(beta), like=y), name=ctx.tmp_name("beta"))
        y = mb.add(x=y, y=c_var, name=ctx.out_name())
    return y


@translates("MatMul")
def matmul(ctx: LoweringContext, node):
    a, b = ctx.value(0), ctx.value(1)
    if not isinstance(b, Var) and rank_of(b) == 2 and isinstance(a, Var) and 1 <= a.rank <= 3:
        return mb.linear(x=a, weight=ctx.var(_as_linear_weight(b, False), like=a), name=ctx.out_name())
    like = ctx.first_var([a, b])
    return mb.matmul(x=ctx.var(a, like), y=ctx.var(b, like), name=ctx.out_name())


def _pool(ctx: LoweringContext, kind: str):
    x = ctx.input_var(0)
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise NodeUnsupported("MaxPool's Indices output has no Core ML equivalent")
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    strides, dilations, pads = _window(ctx, x, kernel)
    if any(d != 1 for d in dilations):
        raise NodeUnsupported(f"dilated pooling (dilations={dilations}) has no Core ML equivalent")
    if ctx.attr("storage_order", 0):
        raise NodeUnsupported("MaxPool storage_order=1 is not supported")
    common = {"x": x, "kernel_sizes": kernel, "strides": strides, "pad_type": "custom", "pad": _flat(pads),
                  "ceil_mode": bool(ctx.attr("ceil_mode", 0)), "name": ctx.out_name()}
    if kind == "max":
        return mb.max_pool(**common)
    return mb.avg_pool(**common, exclude_padding_from_average=not ctx.attr("count_include_pad", 0))


@translates("MaxPool")
def max_pool(ctx: LoweringContext, node):
    return _pool(ctx, "max")


@translates("AveragePool")
def average_pool(ctx: LoweringContext, node):
    return _pool(ctx, "avg")


@translates("GlobalAveragePool", "GlobalMaxPool")
def global_pool(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    reduce = mb.reduce_mean if node.op_type == "GlobalAveragePool" else mb.reduce_max
    return reduce(x=x, axes=list(range(2, x.rank)), keep_dims=True, name=ctx.out_name())


def _channel_shape(x: Var) -> list[int]:
    return [-1] + [1] * (x.rank - 2)


@translates("BatchNormalization")
def batch_norm(ctx: LoweringContext, node):
    if any(node.output[1:]):
        raise NodeUnsupported("BatchNormalization in training mode (running statistics outputs)")
    x = ctx.input_var(0)
    gamma, beta, mean, var = (ctx.const(i, what) for i, what in
                              enumerate(("scale", "bias", "mean", "variance"), start=1))
    eps = float(ctx.attr("epsilon", 1e-5))
    if 3 <= x.rank <= 5:
        return mb.batch_norm(x=x, mean=to_mil_array(mean, x), variance=to_mil_array(var, x),
                             gamma=to_mil_array(gamma, x), beta=to_mil_array(beta, x), epsilon=eps,
                             name=ctx.out_name())
    scale = gamma / np.sqrt(var.astype(np.float64) + eps)
    shift = beta - mean * scale
    shape = _channel_shape(x) if x.rank >= 2 else [-1]
    y = mb.mul(x=x, y=to_mil_array(scale.reshape(shape), x), name=ctx.tmp_name("scale"))
    return mb.add(x=y, y=to_mil_array(shift.reshape(shape), x), name=ctx.out_name())


def _normalize(ctx: LoweringContext, x: Var, axes: list[int], eps: float, name: str) -> Var:
    """(x - mean) / sqrt(var + eps) over ``axes``, in MIL primitives."""
    mean = mb.reduce_mean(x=x, axes=axes, keep_dims=True, name=ctx.tmp_name("mean"))
    centered = mb.sub(x=x, y=mean, name=ctx.tmp_name("centered"))
    var = mb.reduce_mean(x=mb.mul(x=centered, y=centered, name=ctx.tmp_name("sq")), axes=axes, keep_dims=True,
                         name=ctx.tmp_name("var"))
    var = mb.add(x=var, y=to_mil_array(np.array(eps), x), name=ctx.tmp_name("var_eps"))
    return mb.real_div(x=centered, y=mb.sqrt(x=var, name=ctx.tmp_name("std")), name=name)


def _affine(ctx: LoweringContext, y: Var, gamma, beta, shape) -> Var:
    if gamma is not None:
        last = beta is None
        y = mb.mul(x=y, y=ctx.var(_reshaped(ctx, gamma, shape), y),
                   name=ctx.out_name() if last else ctx.tmp_name("gamma"))
    if beta is not None:
        y = mb.add(x=y, y=ctx.var(_reshaped(ctx, beta, shape), y), name=ctx.out_name())
    return y


def _reshaped(ctx: LoweringContext, value, shape):
    if isinstance(value, np.ndarray):
        return value.reshape(shape)
    return mb.reshape(x=ctx.var(value), shape=shape, name=ctx.tmp_name("affine"))


@translates("LayerNormalization")
def layer_norm(ctx: LoweringContext, node):
    if any(node.output[1:]):
        raise NodeUnsupported("LayerNormalization's Mean/InvStdDev outputs have no Core ML equivalent")
    x = ctx.input_var(0)
    axis = int(ctx.attr("axis", -1))
    axes = list(range(axis % x.rank, x.rank))
    eps = float(ctx.attr("epsilon", 1e-5))
    norm_shape = [int(d) for d in x.shape[axes[0]:]]
    gamma, beta = ctx.value(1), ctx.value(2) if ctx.has_input(2) else None
    if isinstance(gamma, np.ndarray) and (beta is None or isinstance(beta, np.ndarray)):
        beta = np.zeros(norm_shape) if beta is None else np.broadcast_to(beta, norm_shape)
        return mb.layer_norm(x=x, axes=axes, gamma=to_mil_array(np.broadcast_to(gamma, norm_shape), x),
                             beta=to_mil_array(beta, x), epsilon=eps, name=ctx.out_name())
    y = _normalize(ctx, x, axes, eps, ctx.tmp_name("norm"))
    return _affine(ctx, y, gamma, beta, shape_of(gamma))


@translates("InstanceNormalization")
def instance_norm(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    gamma, beta = ctx.const(1, "scale"), ctx.const(2, "bias")
    eps = float(ctx.attr("epsilon", 1e-5))
    if x.rank == 4:
        return mb.instance_norm(x=x, gamma=to_mil_array(gamma, x), beta=to_mil_array(beta, x), epsilon=eps,
                                name=ctx.out_name())
    y = _normalize(ctx, x, list(range(2, x.rank)), eps, ctx.tmp_name("norm"))
    return _affine(ctx, y, gamma, beta, _channel_shape(x))


@translates("GroupNormalization")
def group_norm(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    groups = int(ctx.attr("num_groups"))
    eps = float(ctx.attr("epsilon", 1e-5))
    channels = int(x.shape[1])
    gamma, beta = ctx.const(1, "scale"), ctx.const(2, "bias")
    if gamma.size == groups and groups != channels:  # opset 18: one scale per group
        gamma, beta = np.repeat(gamma, channels // groups), np.repeat(beta, channels // groups)
    grouped = mb.reshape(x=x, shape=[int(x.shape[0]), groups, -1], name=ctx.tmp_name("grouped"))
    y = _normalize(ctx, grouped, [2], eps, ctx.tmp_name("norm"))
    y = mb.reshape(x=y, shape=[int(d) for d in x.shape], name=ctx.tmp_name("ungrouped"))
    return _affine(ctx, y, gamma, beta, _channel_shape(x))
