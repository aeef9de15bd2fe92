"""What the QNN execution provider can place on the HTP, as data for a static linter.

Sources: the operator list in onnxruntime-qnn's ``QNN-ExecutionProvider.md`` and its op-builder registry, checked
against onnxruntime-qnn 2.7.0 (QAIRT 2.51) on the x86_64 HTP emulator with uint8 QDQ models. Placement is decided
per QDQ node group, so an op in :data:`HTP_SUPPORTED_OPS` can still be refused for its dtypes or shapes; the
constraints in :data:`HTP_QDQ_CONSTRAINTS` cover the cases edgeq's QNN profile can control. The authoritative
answer for one model is :func:`edgeq.backends.qnn.node_placement`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: ai.onnx op types the QNN EP takes on the HTP backend (the default ONNX domain).
HTP_SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        "Abs", "Add", "And", "ArgMax", "ArgMin", "Asin", "Atan", "AveragePool", "BatchNormalization", "Cast", "Ceil",
        "Clip", "Concat", "Conv", "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "DequantizeLinear", "Div",
        "Dropout", "Einsum", "Elu", "Equal", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements",
        "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
        "GRU", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "Inverse", "IsNaN",
        "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "LpNormalization", "LpPool",
        "LRN", "LSTM", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "NonZero", "Not", "Or", "Pad",
        "Pow", "PRelu", "QuantizeLinear", "RandomNormalLike", "RandomUniformLike", "Reciprocal", "ReduceL2",
        "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Resize", "RMSNormalization",
        "RoiAlign", "RotaryEmbedding", "Round", "ScatterElements", "ScatterND", "Selu", "Sigmoid", "Sign", "Sin",
        "Slice", "Softmax", "Softplus", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "STFT", "Sub", "Sum", "Tan", "Tanh",
        "ThresholdedRelu", "Tile", "TopK", "Transpose", "Unsqueeze", "Upsample", "Where",
    }
)  # fmt: skip

#: com.microsoft (contrib) op types the QNN EP takes on the HTP backend.
HTP_SUPPORTED_CONTRIB_OPS: frozenset[str] = frozenset(
    {
        "DequantizeLinear", "FusedMatMul", "Gelu", "MatMulNBits", "QuantizeLinear", "QuickGelu", "RotaryEmbedding",
        "SimplifiedLayerNormalization",
    }
)  # fmt: skip

#: Op types the EP takes only as part of a fused pattern, never on their own.
HTP_PATTERN_ONLY_OPS: dict[str, str] = {
    "Erf": "only inside the Gelu decomposition x * 0.5 * (1 + Erf(x / sqrt(2))), which the EP fuses into Gelu, "
    "and only when the pattern's interior tensors carry no Q/DQ (quantize its input and output only)",
    "ConvInteger": "only as DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul with constant 8-bit weights",
    "MatMulInteger": "only as DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul with constant 8-bit weights",
    "DynamicQuantizeLinear": "only feeding a ConvInteger or MatMulInteger pattern",
}

#: Documented as supported, but refused or failing on HTP for uint8 QDQ models with onnxruntime-qnn 2.7.0.
#: (Selu, ThresholdedRelu, Mod, InstanceNormalization and the fused Erf-Gelu compile only when a SoC, an HTP
#: arch or ``vtcm_mb`` is set: without one the x86_64 emulator fails them with QNN_COMMON_ERROR_MEM_ALLOC.)
HTP_KNOWN_FAILURES: dict[str, str] = {
    "ReduceProd": "a QDQ ReduceProd group is not taken (falls back to the CPU)",
    "GroupNormalization": "claimed for the NHWC layout and then rejected, which fails session creation",
}


@dataclass(frozen=True)
class HtpQdqConstraints:
    """Rules a QDQ model must follow for its groups to be placed and compiled on the HTP."""

    #: Activation (Q/DQ on every float tensor) dtypes the HTP runs natively. int8/int16 activations are taken
    #: for simple ops but converted; activation x activation MatMul refuses int16.
    activation_dtypes: tuple[str, ...] = ("uint8", "uint16")
    #: Weight dtypes for Conv/ConvTranspose/MatMul/Gemm initialisers. 16-bit weights are refused on MatMul and
    #: fail session creation on Conv.
    weight_dtypes: tuple[str, ...] = ("int8", "uint8")
    #: Ops whose constant weight may be quantized per channel, with the DequantizeLinear axis to use.
    #: Per-channel weights must be symmetric (all zero points 0); a non-zero per-channel zero point makes the
    #: EP claim a Conv for the NHWC layout and then reject it, which fails session creation.
    per_channel_weight_axis: dict[str, int] = field(
        default_factory=lambda: {"Conv": 0, "ConvTranspose": 1, "Gemm": 0, "MatMul": 1}
    )
    #: Bias of Conv/ConvTranspose/Gemm: int32, zero point 0, scale = input scale * weight scale (per channel).
    bias_dtype: str = "int32"
    #: LayerNormalization's scale (gamma) should be uint8: an int8 gamma is rejected by the HTP op validator
    #: when the bias is int32 or absent ("unsupported input/output datatypes for LayerNorm").
    layernorm_gamma_dtype: str = "uint8"
    #: Every graph input needs a fixed shape; nodes touching a symbolic dimension are refused.
    static_shapes: bool = True


HTP_QDQ_CONSTRAINTS = HtpQdqConstraints()
