"""Facts about ONNX op types that quantization needs: which inputs carry data, weights, biases."""

from __future__ import annotations

# Inputs that hold tensor data (others are shapes, indices, axes, scales...). Ops not listed: every input is data.
DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (0,), "Expand": (0,), "Tile": (0,), "Slice": (0,), "Gather": (0,), "GatherElements": (0,),
    "GatherND": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Pad": (0,), "Resize": (0,), "Upsample": (0,),
    "Split": (0,), "TopK": (0,), "Where": (1, 2), "Clip": (0,), "ReduceMean": (0,), "ReduceSum": (0,),
    "ReduceMax": (0,), "ReduceMin": (0,), "ReduceProd": (0,), "ReduceL2": (0,), "ReduceSumSquare": (0,),
    "LayerNormalization": (0, 1, 2), "InstanceNormalization": (0, 1, 2), "GroupNormalization": (0, 1, 2),
    "ScatterND": (0, 2), "ScatterElements": (0, 2), "Trilu": (0,), "CumSum": (0,), "Dropout": (0,),
    "ConstantOfShape": (), "Range": (), "Shape": (), "Size": (), "NonZero": (), "OneHot": (),
    "ArgMax": (), "ArgMin": (), "Cast": (), "CastLike": (), "Equal": (), "Less": (), "Greater": (),
    "LessOrEqual": (), "GreaterOrEqual": (), "Not": (), "And": (), "Or": (), "IsNaN": (), "IsInf": (),
    "NonMaxSuppression": (), "RandomNormalLike": (), "RandomUniformLike": (), "EyeLike": (),
    "LSTM": (), "GRU": (), "RNN": (), "Loop": (), "If": (), "Scan": (),
    "QuantizeLinear": (), "DequantizeLinear": (),
}

# Inputs that are weights (quantized with the weight spec when constant) and their per-channel axis given the
# weight's rank and the node's attributes (None = per-tensor only).
WEIGHT_INPUTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "LayerNormalization": 1,
                 "InstanceNormalization": 1, "GroupNormalization": 1}
BIAS_INPUTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}

# Ops whose output is a rearrangement/subset of their data input: the output shares the input's scale.
SCALE_SHARING = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "Slice", "Gather",
    "GatherElements", "GatherND", "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Dropout",
    "GlobalMaxPool", "ReduceMax", "ReduceMin",
})

# Ops that are never worth a Q/DQ pair in themselves (they move integers, or are control flow).
NEVER_QUANTIZED = frozenset({
    "Shape", "Size", "Cast", "ConstantOfShape", "Range", "NonZero", "Equal", "Less", "Greater", "Not", "And",
    "Or", "ArgMax", "ArgMin", "Loop", "If", "Scan", "QuantizeLinear", "DequantizeLinear", "TopK",
    "NonMaxSuppression", "Constant", "LessOrEqual", "GreaterOrEqual", "IsNaN", "IsInf", "OneHot", "EyeLike",
    "RandomNormalLike", "RandomUniformLike", "CumSum",
})

# Elementwise ops through which an attention-mask constant travels before it is added to scores.
MASK_PROPAGATING = frozenset({"Mul", "Sub", "Add", "Where", "Cast", "Unsqueeze", "Expand", "Reshape", "Min",
                              "Max", "Neg", "Squeeze", "Concat", "Tile", "Transpose", "Slice"})


def data_inputs(op: str, n_inputs: int) -> tuple[int, ...]:
    if op in DATA_INPUTS:
        return tuple(i for i in DATA_INPUTS[op] if i < n_inputs)
    return tuple(range(n_inputs))


def weight_axis(op: str, attrs: dict, rank: int) -> int | None:
    """The output-channel axis of a weight input, or None where only per-tensor is valid."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if int(attrs.get("group", 1)) == 1 else None
    if op == "Gemm":
        return 0 if int(attrs.get("transB", 0)) else 1
    if op == "MatMul":
        return rank - 1 if rank >= 2 else None
    return None


def reduction_axis(op: str, attrs: dict, rank: int) -> int | None:
    """The input-channel (reduction) axis of a weight, used for blockwise quantization."""
    if op == "Gemm":
        return 1 if int(attrs.get("transB", 0)) else 0
    if op == "MatMul":
        return rank - 2 if rank >= 2 else None
    return None


def conv_pads(auto_pad: str, pads, in_sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dimension of a Conv/pooling node, with ONNX ``auto_pad`` resolved."""
    n = len(kernel)
    if auto_pad in ("NOTSET", ""):
        flat = list(pads) if pads is not None else [0] * 2 * n
        return [(int(flat[i]), int(flat[i + n])) for i in range(n)]
    if auto_pad == "VALID":
        return [(0, 0)] * n
    result = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        result.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
    return result
