"""ONNX → MIL translators for element-wise math, activations, comparisons, reductions and softmax."""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from edgeq.backends.coreml_context import LoweringContext, NodeUnsupported, to_mil_array, translates

_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Pow": "pow", "Equal": "equal", "Greater": "greater",
           "Less": "less", "GreaterOrEqual": "greater_equal", "LessOrEqual": "less_equal", "And": "logical_and",
           "Or": "logical_or", "Xor": "logical_xor", "Max": "maximum", "Min": "minimum", "Sum": "add"}
_UNARY = {"Sqrt": "sqrt", "Abs": "abs", "Exp": "exp", "Erf": "erf", "Floor": "floor", "Ceil": "ceil",
          "Round": "round", "Sin": "sin", "Cos": "cos", "Sign": "sign", "Not": "logical_not", "Relu": "relu",
          "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus"}
# ONNX -> MIL cast targets (Core ML has no int64/float64: they narrow to int32/fp32).
_CAST = {1: "fp32", 10: "fp16", 11: "fp32", 6: "int32", 7: "int32", 12: "int32", 13: "int32", 9: "bool",
         3: "int8", 2: "uint8"}


def _scalar(value: float, like: Var) -> np.ndarray:
    return to_mil_array(np.array(value), like)


@translates(*_BINARY)
def binary(ctx: LoweringContext, node):
    """Element-wise binary ops (variadic Max/Min/Sum fold left); numpy broadcasting, like ONNX."""
    values = [ctx.value(i) for i in range(len(node.input))]
    like = ctx.first_var(values)
    op = getattr(mb, _BINARY[node.op_type])
    if node.op_type == "Pow" and isinstance(values[1], np.ndarray) and values[1].size == 1 and values[1] == 2:
        x = ctx.var(values[0], like)
        return mb.mul(x=x, y=x, name=ctx.out_name())
    result = ctx.var(values[0], like)
    for i, value in enumerate(values[1:], start=2):
        name = ctx.out_name() if i == len(values) else ctx.tmp_name(f"acc{i}")
        result = op(x=result, y=ctx.var(value, like), name=name)
    if len(values) == 1:
        result = mb.identity(x=result, name=ctx.out_name())
    return result


@translates("Div")
def div(ctx: LoweringContext, node):
    like = ctx.first_var([ctx.value(0), ctx.value(1)])
    x, y = ctx.input_var(0, like), ctx.input_var(1, like)
    if types.is_float(x.dtype):
        return mb.real_div(x=x, y=y, name=ctx.out_name())
    # ONNX integer Div truncates toward zero; MIL floor_div floors. They agree for non-negative operands.
    ctx.note(f"{ctx.node.name or ctx.node.output[0]}: integer Div lowered as floor division")
    return mb.floor_div(x=x, y=y, name=ctx.out_name())


@translates(*_UNARY)
def unary(ctx: LoweringContext, node):
    return getattr(mb, _UNARY[node.op_type])(x=ctx.input_var(0), name=ctx.out_name())


@translates("Reciprocal")
def reciprocal(ctx: LoweringContext, node):
    x = ctx.input_var(0)  # real_div rather than mb.inverse, which adds an epsilon to the denominator
    return mb.real_div(x=_scalar(1.0, x), y=x, name=ctx.out_name())


@translates("Neg")
def neg(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    return mb.mul(x=x, y=_scalar(-1, x), name=ctx.out_name())


@translates("Log")
def log(ctx: LoweringContext, node):
    return mb.log(x=ctx.input_var(0), epsilon=0.0, name=ctx.out_name())


@translates("Identity", "Dropout")
def identity(ctx: LoweringContext, node):
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        raise NodeUnsupported("Dropout's mask output has no Core ML equivalent")
    value = ctx.value(0)
    return value if not isinstance(value, Var) else mb.identity(x=value, name=ctx.out_name())


@translates("Clip")
def clip(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    if ctx.opset < 11:
        low, high = ctx.attr("min"), ctx.attr("max")
    else:
        low = ctx.optional_const(1, "Clip min")
        high = ctx.optional_const(2, "Clip max")
    low = None if low is None else float(np.asarray(low))
    high = None if high is None else float(np.asarray(high))
    if low == 0.0 and high == 6.0:
        return mb.relu6(x=x, name=ctx.out_name())
    if low == 0.0 and high is None:
        return mb.relu(x=x, name=ctx.out_name())
    if low is not None and high is not None and types.is_float(x.dtype):
        return mb.clip(x=x, alpha=_scalar(low, x), beta=_scalar(high, x), name=ctx.out_name())
    if low is not None:
        x = mb.maximum(x=x, y=_scalar(low, x), name=ctx.out_name() if high is None else ctx.tmp_name("min"))
    if high is not None:
        x = mb.minimum(x=x, y=_scalar(high, x), name=ctx.out_name())
    return x if low is not None or high is not None else mb.identity(x=x, name=ctx.out_name())


@translates("HardSigmoid")
def hard_sigmoid(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    return mb.sigmoid_hard(x=x, alpha=_scalar(ctx.attr("alpha", 0.2), x), beta=_scalar(ctx.attr("beta", 0.5), x),
                           name=ctx.out_name())


@translates("HardSwish")
def hard_swish(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    gate = mb.sigmoid_hard(x=x, alpha=_scalar(1 / 6, x), beta=_scalar(0.5, x), name=ctx.tmp_name("gate"))
    return mb.mul(x=x, y=gate, name=ctx.out_name())


@translates("LeakyRelu")
def leaky_relu(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    return mb.leaky_relu(x=x, alpha=_scalar(ctx.attr("alpha", 0.01), x), name=ctx.out_name())


@translates("Elu")
def elu(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    return mb.elu(x=x, alpha=_scalar(ctx.attr("alpha", 1.0), x), name=ctx.out_name())


@translates("PRelu")
def prelu(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    slope = ctx.input_var(1, like=x)
    negative = mb.mul(x=mb.minimum(x=x, y=_scalar(0, x), name=ctx.tmp_name("neg")), y=slope,
                      name=ctx.tmp_name("scaled"))
    return mb.add(x=mb.relu(x=x, name=ctx.tmp_name("pos")), y=negative, name=ctx.out_name())


@translates("Gelu")
def gelu(ctx: LoweringContext, node):
    mode = {"none": "EXACT", "tanh": "TANH_APPROXIMATION"}[ctx.attr("approximate", "none")]
    return mb.gelu(x=ctx.input_var(0), mode=mode, name=ctx.out_name())


def _softmax_axis(ctx: LoweringContext, x: Var) -> tuple[Var, int, list[int] | None]:
    """Softmax axis; before opset 13 ONNX flattens to 2-D at ``axis`` (default 1) and normalizes the rest."""
    if ctx.opset >= 13:
        return x, int(ctx.attr("axis", -1)) % x.rank, None
    axis = int(ctx.attr("axis", 1)) % x.rank
    if axis == x.rank - 1:
        return x, axis, None
    shape = [int(d) for d in x.shape]
    flat = mb.reshape(x=x, shape=[int(np.prod(shape[:axis])), -1], name=ctx.tmp_name("flat"))
    return flat, 1, shape


@translates("Softmax", "LogSoftmax")
def softmax(ctx: LoweringContext, node):
    x, axis, restore = _softmax_axis(ctx, ctx.input_var(0))
    last = restore is None
    name = ctx.out_name() if last else ctx.tmp_name("softmax")
    if node.op_type == "Softmax":
        y = mb.softmax(x=x, axis=axis, name=name)
    else:
        lse = mb.reduce_log_sum_exp(x=x, axes=[axis], keep_dims=True, name=ctx.tmp_name("lse"))
        y = mb.sub(x=x, y=lse, name=name)
    return y if last else mb.reshape(x=y, shape=restore, name=ctx.out_name())


_REDUCE = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max",
           "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod", "ReduceL2": "reduce_l2_norm",
           "ReduceL1": "reduce_l1_norm", "ReduceLogSumExp": "reduce_log_sum_exp",
           "ReduceSumSquare": "reduce_sum_square"}


@translates(*_REDUCE)
def reduce(ctx: LoweringContext, node):
    x = ctx.input_var(0)
    axes = ctx.const(1, "reduction axes") if ctx.has_input(1) else ctx.attr("axes")
    keep = bool(ctx.attr("keepdims", 1))
    if axes is None or len(axes) == 0:
        if ctx.attr("noop_with_empty_axes", 0):
            return mb.identity(x=x, name=ctx.out_name())
        axes = range(x.rank)
    axes = sorted(int(a) % x.rank for a in np.asarray(axes).reshape(-1))
    return getattr(mb, _REDUCE[node.op_type])(x=x, axes=axes, keep_dims=keep, name=ctx.out_name())


@translates("ArgMax", "ArgMin")
def arg_reduce(ctx: LoweringContext, node):
    if ctx.attr("select_last_index", 0):
        raise NodeUnsupported("select_last_index=1 has no Core ML equivalent")
    op = mb.reduce_argmax if node.op_type == "ArgMax" else mb.reduce_argmin
    return op(x=ctx.input_var(0), axis=int(ctx.attr("axis", 0)), keep_dims=bool(ctx.attr("keepdims", 1)),
              name=ctx.out_name())


@translates("Cast")
def cast(ctx: LoweringContext, node):
    to = int(ctx.attr("to"))
    if to not in _CAST:
        raise NodeUnsupported(f"Cast to ONNX type {to} has no Core ML equivalent")
    x = ctx.input_var(0)
    if _CAST[to] == types.builtin_to_string(x.dtype):
        return mb.identity(x=x, name=ctx.out_name())
    return mb.cast(x=x, dtype=_CAST[to], name=ctx.out_name())


@translates("Where")
def where(ctx: LoweringContext, node):
    like = ctx.first_var([ctx.value(1), ctx.value(2)])
    cond = ctx.input_var(0)
    return mb.select(cond=cond, a=ctx.input_var(1, like), b=ctx.input_var(2, like), name=ctx.out_name())
