"""ONNX → MIL translators for shape and data movement: reshape, slicing, gather, resize, pad, tile.

Every shape is static by the time a translator runs, so shape arguments (Reshape's 0 and -1, Slice's clamped
bounds, Expand's broadcast) are resolved here to plain integer lists.
"""

from __future__ import annotations

import math

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from edgeq.backends.coreml_context import LoweringContext, NodeUnsupported, shape_of, translates
from edgeq.backends.coreml_quant import QuantizedWeight


def _axes(ctx: LoweringContext, index: int, what: str):
    """Axes given as input ``index`` (newer opsets) or as the ``axes`` attribute (older ones)."""
    if ctx.has_input(index):
        return [int(a) for a in ctx.const(index, what).reshape(-1)]
    axes = ctx.attr("axes")
    return None if axes is None else [int(a) for a in axes]


@translates("Shape")
def shape(ctx: LoweringContext, node):
    dims = np.array(shape_of(ctx.value(0)), dtype=np.int64)
    start, end = ctx.attr("start", 0), ctx.attr("end")
    return dims[start:end]


@translates("Size")
def size(ctx: LoweringContext, node):
    return np.array(math.prod(shape_of(ctx.value(0))), dtype=np.int64)


@translates("Reshape")
def reshape(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    in_shape = [int(d) for d in x.shape]
    target = [int(d) for d in ctx.const(1, "Reshape shape").reshape(-1)]
    if not ctx.attr("allowzero", 0):
        target = [in_shape[i] if d == 0 else d for i, d in enumerate(target)]
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = math.prod(in_shape) // known
    return mb.reshape(x=x, shape=target, name=ctx.out_name())


@translates("Flatten")
def flatten(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    dims = [int(d) for d in x.shape]
    axis = int(ctx.attr("axis", 1)) % (len(dims) + 1) if dims else 0
    return mb.reshape(x=x, shape=[math.prod(dims[:axis]), math.prod(dims[axis:])], name=ctx.out_name())


@translates("Transpose")
def transpose(ctx: LoweringContext, node):
    value = ctx.value(0)
    rank = len(shape_of(value))
    perm = [int(p) for p in ctx.attr("perm", list(reversed(range(rank))))]
    if isinstance(value, QuantizedWeight):  # keep the weight compressed: transpose its integers instead
        return value.transposed(perm)
    return mb.transpose(x=ctx.var(value), perm=perm, name=ctx.out_name())


@translates("Squeeze")
def squeeze(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    axes = _axes(ctx, 1, "Squeeze axes")
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    return mb.squeeze(x=x, axes=sorted(a % x.rank for a in axes), name=ctx.out_name())


@translates("Unsqueeze")
def unsqueeze(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    axes = _axes(ctx, 1, "Unsqueeze axes")
    out_rank = x.rank + len(axes)
    return mb.expand_dims(x=x, axes=sorted(a % out_rank for a in axes), name=ctx.out_name())


@translates("Concat")
def concat(ctx: LoweringContext, node):
    values = [ctx.value(i) for i in range(len(node.input))]
    like = ctx.first_var(values)
    rank = len(shape_of(values[0]))
    return mb.concat(values=[ctx.var(v, like) for v in values], axis=int(ctx.attr("axis")) % rank,
                     name=ctx.out_name())


@translates("Split")
def split(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    axis = int(ctx.attr("axis", 0)) % x.rank
    dim = int(x.shape[axis])
    if ctx.has_input(1):
        sizes = [int(s) for s in ctx.const(1, "Split sizes")]
    elif ctx.attr("split") is not None:
        sizes = [int(s) for s in ctx.attr("split")]
    else:
        parts = int(ctx.attr("num_outputs", len(node.output)))
        chunk = math.ceil(dim / parts)
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    if any(s <= 0 for s in sizes):
        raise NodeUnsupported(f"Split into sizes {sizes}: Core ML has no empty tensors")
    return tuple(mb.split(x=x, split_sizes=sizes, axis=axis, name=ctx.out_name()))


@translates("Slice")
def slice_(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    dims = [int(d) for d in x.shape]
    if ctx.opset >= 10:
        starts, ends = ctx.const(1, "Slice starts"), ctx.const(2, "Slice ends")
        axes = ctx.optional_const(3, "Slice axes")
        steps = ctx.optional_const(4, "Slice steps")
    else:
        starts, ends, axes, steps = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes"), None
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    begin, end, stride = [0] * len(dims), list(dims), [1] * len(dims)
    end_mask = [False] * len(dims)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) % len(dims)
        b, e2, st2 = slice(int(s), int(e), int(st)).indices(dims[a])
        if len(range(b, e2, st2)) == 0:
            raise NodeUnsupported(f"Slice selects nothing on axis {a}: Core ML has no empty tensors")
        begin[a], end[a], stride[a] = b, e2, st2
        end_mask[a] = e2 < 0  # a reversed slice that runs through index 0
    return mb.slice_by_index(x=x, begin=begin, end=end, stride=stride, end_mask=end_mask, name=ctx.out_name())


@translates("Gather")
def gather(ctx: LoweringContext, node):
    """Gather with constant indices, or an embedding lookup: constant (possibly compressed) table, run-time ids."""
    data, indices = ctx.value(0), ctx.value(1)
    axis = int(ctx.attr("axis", 0)) % len(shape_of(data))
    if isinstance(indices, np.ndarray):
        dim = shape_of(data)[axis]
        indices = np.where(indices < 0, indices + dim, indices).astype(np.int32)
    else:
        ctx.note(f"{node.name or node.output[0]}: run-time Gather indices must be non-negative on Core ML")
    like = data if isinstance(data, Var) else None
    if isinstance(data, Var) and data.dtype == types.bool:  # MIL gathers numbers only: a mask goes via int32
        picked = mb.gather(x=mb.cast(x=data, dtype="int32", name=ctx.tmp_name("as_int")), indices=ctx.var(indices),
                           axis=axis, name=ctx.tmp_name("gather"))
        return mb.cast(x=picked, dtype="bool", name=ctx.out_name())
    return mb.gather(x=ctx.var(data, like), indices=ctx.var(indices), axis=axis, name=ctx.out_name())


@translates("Expand")
def expand(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    in_shape = tuple(int(d) for d in x.shape)
    out_shape = np.broadcast_shapes(in_shape, tuple(int(d) for d in ctx.const(1, "Expand shape")))
    if len(out_shape) > len(in_shape):
        in_shape = (1,) * (len(out_shape) - len(in_shape)) + in_shape
        x = mb.reshape(x=x, shape=list(in_shape), name=ctx.tmp_name("rank"))
    reps = [o // i for o, i in zip(out_shape, in_shape)]
    if all(r == 1 for r in reps):
        return mb.identity(x=x, name=ctx.out_name())
    return mb.tile(x=x, reps=reps, name=ctx.out_name())


@translates("Tile")
def tile(ctx: LoweringContext, node):
    reps = [int(r) for r in ctx.const(1, "Tile repeats")]
    return mb.tile(x=ctx.input_var(0), reps=reps, name=ctx.out_name())


@translates("Pad")
def pad(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    rank = x.rank
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(ctx.attr("mode", "constant"))
    if mode is None:
        raise NodeUnsupported(f"Pad mode {ctx.attr('mode')!r} has no Core ML equivalent")
    if ctx.opset >= 11:
        pads = [int(p) for p in ctx.const(1, "Pad pads")]
        value = ctx.optional_const(2, "Pad constant_value")
        value = 0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0])
        axes = ctx.optional_const(3, "Pad axes")
    else:
        pads, value, axes = [int(p) for p in ctx.attr("pads")], float(ctx.attr("value", 0.0)), None
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + len(axes)]
    if min(begin + end) < 0:
        raise NodeUnsupported(f"negative Pad {pads} (cropping) is not supported")
    first = next((a for a in range(rank) if begin[a] or end[a]), rank)
    if first == rank:
        return mb.identity(x=x, name=ctx.out_name())
    flat = [p for a in range(first, rank) for p in (begin[a], end[a])]
    return mb.pad(x=x, pad=flat, mode=mode, constant_val=value, name=ctx.out_name())


_LINEAR_SAMPLING = {"half_pixel": "UNALIGN_CORNERS", "pytorch_half_pixel": "UNALIGN_CORNERS",
                    "align_corners": "STRICT_ALIGN_CORNERS", "asymmetric": "DEFAULT"}


def _resize_sizes(ctx: LoweringContext, x: Var) -> tuple[list[int], list[float] | None]:
    dims = [int(d) for d in x.shape]
    scales_index, sizes_index = (1, None) if ctx.opset < 11 else (2, 3)
    sizes = ctx.optional_const(sizes_index, "Resize sizes") if sizes_index else None
    scales = ctx.optional_const(scales_index, "Resize scales")
    axes = ctx.attr("axes")
    axes = list(range(len(dims))) if axes is None else [int(a) % len(dims) for a in axes]
    if sizes is not None and sizes.size:
        out = list(dims)
        for a, s in zip(axes, sizes):
            out[a] = int(s)
        return out, None
    full_scales = [1.0] * len(dims)
    for a, s in zip(axes, scales):
        full_scales[a] = float(s)
    return [math.floor(d * s) for d, s in zip(dims, full_scales)], full_scales


@translates("Resize")
def resize(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    out, scales = _resize_sizes(ctx, x)
    dims = [int(d) for d in x.shape]
    if x.rank != 4 or out[:2] != dims[:2]:
        raise NodeUnsupported(f"Resize from {dims} to {out}: Core ML resizes the last two axes of 4-D tensors")
    mode = ctx.attr("mode", "nearest")
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest":
        nearest = ctx.attr("nearest_mode", "round_prefer_floor")
        factors = [o // d for o, d in zip(out[2:], dims[2:])]
        whole = all(o % d == 0 for o, d in zip(out[2:], dims[2:]))
        floor_like = (ctm == "asymmetric" and nearest == "floor") or (
            ctm in ("half_pixel", "pytorch_half_pixel") and nearest.startswith("round_prefer"))
        if not (whole and floor_like):
            raise NodeUnsupported(f"nearest Resize {dims[2:]}->{out[2:]} with coordinate_transformation_mode="
                                  f"{ctm}, nearest_mode={nearest}: only whole upscale factors are supported")
        return mb.upsample_nearest_neighbor(x=x, scale_factor_height=factors[0], scale_factor_width=factors[1],
                                            name=ctx.out_name())
    if mode != "linear" or ctm not in _LINEAR_SAMPLING:
        raise NodeUnsupported(f"Resize mode={mode}, coordinate_transformation_mode={ctm} is not supported")
    if scales is not None and any(abs(o / d - s) > 1e-6 for o, d, s in zip(out[2:], dims[2:], scales[2:])):
        raise NodeUnsupported(f"linear Resize scales {scales[2:]} do not give whole output sizes {out[2:]}")
    if min(out[2:]) == 1 and ctm != "half_pixel":
        raise NodeUnsupported(f"linear Resize to size 1 with coordinate_transformation_mode={ctm}")
    if ctx.attr("antialias", 0) and any(o < d for o, d in zip(out[2:], dims[2:])):
        raise NodeUnsupported("antialiased downscaling has no Core ML equivalent")
    return mb.resize_bilinear(x=x, target_size_height=out[2], target_size_width=out[3],
                              sampling_mode=_LINEAR_SAMPLING[ctm], name=ctx.out_name())
