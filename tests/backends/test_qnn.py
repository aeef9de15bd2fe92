"""Tests for edgeq.backends.qnn on the onnxruntime-qnn HTP emulator (x86_64) or a real HTP.

The models are built here in the QDQ form edgeq emits for the QNN profile: uint8 Q/DQ on every float tensor,
int8 per-channel Conv weights, int8 per-tensor MatMul/Gemm weights, int32 biases with scale s_in * s_w, uint8
LayerNormalization gamma, an Erf-form Gelu quantized at its input and output only (so QNN can fuse it), static
shapes. Scales come from a float run of the same graph on the test samples, so nothing saturates. The reference
is ONNX Runtime's CPU EP with graph optimisations off, which runs every Q/DQ literally in float: the exact
simulation of the quantized model.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.backends import qnn
from edgeq.backends.qnn_placement import build_placement
from edgeq.errors import BackendUnavailableError, CalibrationDataError, CompileError, EdgeqError, ModelLoadError

# A target SoC also gives the x86_64 emulator a VTCM, which some ops (the fused Gelu among them) need.
SM8650 = qnn.QnnOptions.for_soc("SM8650")

requires_qnn = pytest.mark.skipif(
    not qnn.qnn_available(), reason="onnxruntime-qnn with its HTP backend is not installed (pip install 'edgeq[qnn]')"
)


# ------------------------------------------------------------------------------------------------ model building
class QdqNet:
    """Builds one graph twice: in float (``ranges is None``) to calibrate, then in QDQ form with those ranges."""

    def __init__(self, ranges: dict[str, tuple[float, float]] | None, seed: int = 0):
        self.ranges = ranges
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.tensors: list[str] = []

    @property
    def quantized(self) -> bool:
        return self.ranges is not None

    def scale_zp(self, name: str) -> tuple[float, int]:
        low, high = self.ranges[name]
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255 or 1.0
        return scale, int(round(-low / scale))

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def act(self, name: str) -> str:
        """Q → DQ on a float tensor (identity in the calibration build)."""
        self.tensors.append(name)
        if not self.quantized:
            return name
        scale, zp = self.scale_zp(name)
        params = [self.const(f"{name}.s", np.array(scale, np.float32)), self.const(f"{name}.z", np.array(zp, np.uint8))]
        self.nodes.append(helper.make_node("QuantizeLinear", [name, *params], [f"{name}.q"], name=f"{name}/Q"))
        self.nodes.append(
            helper.make_node("DequantizeLinear", [f"{name}.q", *params], [f"{name}.dq"], name=f"{name}/DQ")
        )
        return f"{name}.dq"

    def op(self, op_type: str, inputs: list[str], name: str, *, quantize: bool = True, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return self.act(name) if quantize else name

    def _dq(self, name: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> str:
        inputs = [
            self.const(f"{name}.q", q),
            self.const(f"{name}.s", scale.astype(np.float32)),
            self.const(f"{name}.z", zp),
        ]
        kwargs = {} if axis is None else {"axis": axis}
        self.nodes.append(helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}/DQ", **kwargs))
        return name

    def weight(self, name: str, w: np.ndarray, axis: int | None = None) -> str:
        """Symmetric int8 weight, per channel along ``axis`` or per tensor."""
        if not self.quantized:
            return self.const(name, w.astype(np.float32))
        reduce = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
        scale = np.abs(w).max(axis=reduce) / 127
        shape = [-1 if i == axis else 1 for i in range(w.ndim)] if axis is not None else []
        q = np.clip(np.round(w / np.reshape(scale, shape)), -127, 127).astype(np.int8)
        return self._dq(name, q, np.asarray(scale), np.zeros(np.shape(scale), np.int8), axis)

    def weight_u8(self, name: str, w: np.ndarray) -> str:
        """Asymmetric uint8 per-tensor constant (LayerNorm gamma, scalar operands)."""
        if not self.quantized:
            return self.const(name, w.astype(np.float32))
        low, high = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
        scale = (high - low) / 255 or 1.0
        zp = int(round(-low / scale))
        q = np.clip(np.round(w / scale) + zp, 0, 255).astype(np.uint8)
        return self._dq(name, q, np.array(scale), np.array(zp, np.uint8), None)

    def bias(self, name: str, b: np.ndarray, input_act: str, weight: str) -> str:
        """int32 bias with scale = input scale * weight scale (per channel when the weight is)."""
        if not self.quantized:
            return self.const(name, b.astype(np.float32))
        w_scale = numpy_helper.to_array(next(i for i in self.inits if i.name == f"{weight}.s"))
        scale = (self.scale_zp(input_act)[0] * w_scale).astype(np.float32)
        q = np.round(b / scale).astype(np.int32)
        return self._dq(name, q, scale, np.zeros(scale.shape, np.int32), 0 if scale.ndim else None)

    def model(self, inputs: dict[str, list[int]], output: str) -> onnx.ModelProto:
        graph_outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]
        if not self.quantized:  # expose every activation for calibration
            graph_outputs = [
                helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                for t in dict.fromkeys(self.tensors)
                if t not in inputs
            ]
        graph = helper.make_graph(
            self.nodes, "qdq_net",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
            graph_outputs, self.inits,
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # also fills the outputs' shapes
        onnx.checker.check_model(model)
        return model


def small_cnn(net: QdqNet) -> tuple[dict[str, list[int]], str]:
    """Conv → Relu → Conv → Add(residual) → GlobalAveragePool → Flatten → Gemm."""
    rng = net.rng
    x = net.act("x")
    w1 = net.weight("conv1.w", rng.normal(0, 0.3, (8, 3, 3, 3)), axis=0)
    c1 = net.op("Conv", [x, w1, net.bias("conv1.b", rng.normal(0, 0.1, 8), "x", "conv1.w")], "conv1", pads=[1, 1, 1, 1])
    r1 = net.op("Relu", [c1], "relu1")
    w2 = net.weight("conv2.w", rng.normal(0, 0.2, (8, 8, 3, 3)), axis=0)
    c2 = net.op(
        "Conv", [r1, w2, net.bias("conv2.b", rng.normal(0, 0.1, 8), "relu1", "conv2.w")], "conv2", pads=[1, 1, 1, 1]
    )
    s = net.op("Add", [r1, c2], "residual")
    g = net.op("GlobalAveragePool", [s], "pool")
    f = net.op("Flatten", [g], "flatten")
    wf = net.weight("fc.w", rng.normal(0, 0.3, (10, 8)))
    y = net.op("Gemm", [f, wf, net.bias("fc.b", rng.normal(0, 0.1, 10), "flatten", "fc.w")], "fc", transB=1)
    return {"x": [1, 3, 16, 16]}, y


def transformer_block(net: QdqNet, seq: int = 8, dim: int = 32, heads: int = 2) -> tuple[dict[str, list[int]], str]:
    """Pre-norm attention (Q/K/V MatMuls, Softmax) and an Erf-form Gelu MLP, each with a residual Add."""
    rng, hd = net.rng, dim // heads

    def layer_norm(name: str, inp: str, inp_name: str) -> str:
        gamma = net.weight_u8(f"{name}.gamma", rng.uniform(0.8, 1.2, dim))
        beta = net.bias(f"{name}.beta", rng.normal(0, 0.05, dim), inp_name, f"{name}.gamma")
        return net.op("LayerNormalization", [inp, gamma, beta], name, axis=-1)

    def linear(name: str, inp: str, fan_in: int, fan_out: int) -> str:
        return net.op("MatMul", [inp, net.weight(f"{name}.w", rng.normal(0, fan_in**-0.5, (fan_in, fan_out)))], name)

    def scalar(name: str, value: float) -> str:
        return net.weight_u8(name, np.array(value, np.float32))

    def heads_first(name: str, inp: str, perm: list[int]) -> str:
        r = net.op(
            "Reshape", [inp, net.const(f"{name}.shape", np.array([1, seq, heads, hd], np.int64))], f"{name}.split"
        )
        return net.op("Transpose", [r], f"{name}.heads", perm=perm)

    x = net.act("x")
    h = layer_norm("ln1", x, "x")
    q = heads_first("q", linear("q_proj", h, dim, dim), [0, 2, 1, 3])
    k = heads_first("k", linear("k_proj", h, dim, dim), [0, 2, 3, 1])
    v = heads_first("v", linear("v_proj", h, dim, dim), [0, 2, 1, 3])
    scores = net.op("Mul", [net.op("MatMul", [q, k], "qk"), scalar("attn.scale", 1 / math.sqrt(hd))], "qk_scaled")
    probs = net.op("Softmax", [scores], "softmax", axis=-1)
    ctx = net.op("Transpose", [net.op("MatMul", [probs, v], "attn")], "attn.merge", perm=[0, 2, 1, 3])
    ctx = net.op("Reshape", [ctx, net.const("attn.shape", np.array([1, seq, dim], np.int64))], "attn.flat")
    r1 = net.op("Add", [x, linear("o_proj", ctx, dim, dim)], "residual1")
    h2 = layer_norm("ln2", r1, "residual1")
    up = linear("fc1", h2, dim, 2 * dim)
    # Erf-form Gelu; QNN fuses it into one Gelu only if its interior tensors carry no Q/DQ.
    inner = {"quantize": False}
    erf = net.op("Erf", [net.op("Div", [up, net.const("gelu.sqrt2", np.float32(math.sqrt(2)))], "gelu.div", **inner)],
                 "gelu.erf", **inner)  # fmt: skip
    gelu = net.op(
        "Mul",
        [up, net.op("Add", [erf, net.const("gelu.one", np.float32(1))], "gelu.add", **inner)],
        "gelu.mul",
        **inner,
    )
    gelu = net.op("Mul", [gelu, net.const("gelu.half", np.float32(0.5))], "gelu")
    y = net.op("Add", [r1, linear("fc2", gelu, 2 * dim, dim)], "residual2")
    return {"x": [1, seq, dim]}, y


def cpu_session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every Q/DQ literal
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@dataclasses.dataclass
class BuiltModel:
    path: Path
    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    output_scale: float


def build_qdq(tmp_path: Path, builder, name: str, samples: int = 3) -> BuiltModel:
    float_net = QdqNet(None)
    inputs, _ = builder(float_net)
    float_model = float_net.model(inputs, "")
    rng = np.random.default_rng(1)
    feeds = [{k: rng.normal(0, 1, shape).astype(np.float32) for k, shape in inputs.items()} for _ in range(samples)]
    session = cpu_session(float_model)
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, tuple[float, float]] = {}
    for feed in feeds:
        for tensor, value in zip(names, session.run(None, feed), strict=True):
            low, high = ranges.get(tensor, (math.inf, -math.inf))
            ranges[tensor] = (min(low, float(value.min())), max(high, float(value.max())))
    ranges.update({tensor: (-4.0, 4.0) for tensor in inputs})  # inputs are N(0, 1)
    net = QdqNet(ranges)
    _, output = builder(net)
    model = net.model(inputs, output)
    path = tmp_path / f"{name}.qdq.onnx"
    onnx.save(model, path)
    return BuiltModel(path, model, feeds, net.scale_zp(output.removesuffix(".dq"))[0])


def assert_within_steps(
    actual: np.ndarray, expected: np.ndarray, scale: float, steps: float, mean_steps: float = 1.0
) -> None:
    """|actual - expected| <= ``steps`` output quantization steps everywhere, <= ``mean_steps`` on average, unbiased."""
    diff = (actual.astype(np.float64) - expected.astype(np.float64)) / scale
    assert np.abs(diff).max() <= steps + 1e-3, f"max diff {np.abs(diff).max():.2f} steps (allowed {steps})"
    assert np.abs(diff).mean() <= mean_steps, f"mean diff {np.abs(diff).mean():.2f} steps (allowed {mean_steps})"
    assert abs(diff.mean()) <= 0.25, f"HTP outputs are biased by {diff.mean():.2f} steps"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, BuiltModel]:
    root = tmp_path_factory.mktemp("qnn_models")
    return {"cnn": build_qdq(root, small_cnn, "cnn"), "transformer": build_qdq(root, transformer_block, "transformer")}


# ------------------------------------------------------------------------------------------ no onnxruntime-qnn needed
@pytest.mark.parametrize(
    ("soc", "soc_model", "htp_arch", "provider"),
    [
        ("SM8650", "SM8650", "v75", {"soc_model": "57", "htp_arch": "75"}),
        ("sm8550", "SM8550", "v73", {"soc_model": "43", "htp_arch": "73"}),
        ("SC8380XP", "SC8380XP", "v73", {"soc_model": "60", "htp_arch": "73"}),
        ("SM8750", "SM8750", "v79", {"soc_model": "69", "htp_arch": "79"}),
        ("v68", None, "v68", {"htp_arch": "68"}),
        ("V81", None, "v81", {"htp_arch": "81"}),
    ],
)
def test_soc_maps_to_provider_options(soc, soc_model, htp_arch, provider):
    options = qnn.QnnOptions.for_soc(soc)
    assert (options.soc_model, options.htp_arch) == (soc_model, htp_arch)
    assert provider.items() <= options.provider_options().items()
    assert options.provider_options()["backend_type"] == "htp"


@pytest.mark.parametrize("soc", ["SM9999", "v70", "snapdragon", "69", ""])
def test_unknown_soc_is_a_user_error_listing_valid_values(soc):
    with pytest.raises(EdgeqError, match="SM8650.*v73|valid"):
        qnn.QnnOptions.for_soc(soc)


def test_options_validate_and_normalise():
    assert qnn.QnnOptions(soc_model="57").soc_model == "SM8650"  # QNN's numeric SoC ID
    assert qnn.QnnOptions(htp_arch="73").htp_arch == "v73"
    with pytest.raises(EdgeqError, match="HTP v75, not v73"):
        qnn.QnnOptions(soc_model="SM8650", htp_arch="v73")
    with pytest.raises(EdgeqError, match="htp_performance_mode"):
        qnn.QnnOptions(htp_performance_mode="turbo")
    with pytest.raises(EdgeqError, match="backend"):
        qnn.QnnOptions(backend="gpu")
    with pytest.raises(TypeError):
        qnn.QnnOptions("SM8650")  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        qnn.QnnOptions().soc_model = "SM8650"
    # An explicit fp16 "1" without soc_model is refused by the EP, so it is only sent with a soc_model.
    assert "enable_htp_fp16_precision" not in qnn.QnnOptions().provider_options()
    assert qnn.QnnOptions(enable_htp_fp16_precision=False).provider_options()["enable_htp_fp16_precision"] == "0"


def test_missing_package_names_the_extra(monkeypatch, models):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # makes the import fail
    assert not qnn.qnn_available()
    with pytest.raises(BackendUnavailableError, match=r"pip install 'edgeq\[qnn\]'"):
        qnn.create_session(models["cnn"].path)


def test_supported_op_tables_are_consistent():
    assert {"Conv", "MatMul", "Gemm", "Softmax", "LayerNormalization", "GlobalAveragePool"} <= qnn.HTP_SUPPORTED_OPS
    assert "Erf" not in qnn.HTP_SUPPORTED_OPS and "Erf" in qnn.HTP_PATTERN_ONLY_OPS
    assert not qnn.HTP_SUPPORTED_OPS & set(qnn.HTP_KNOWN_FAILURES)
    assert qnn.HTP_QDQ_CONSTRAINTS.per_channel_weight_axis["Conv"] == 0


def test_placement_maps_layout_renamed_nodes_back():
    qnn_ep, cpu_ep = "QNNExecutionProvider", "CPUExecutionProvider"
    assigned = [("conv_token_3", "Conv", qnn_ep), ("Transpose_token_1", "Transpose", qnn_ep),
                ("d/duplicated", "DequantizeLinear", qnn_ep), ("hm", "Hardmax", cpu_ep)]  # fmt: skip
    model_nodes = [("d", "DequantizeLinear"), ("conv", "Conv"), ("id", "Identity"), ("hm", "Hardmax")]
    placement = build_placement(Path("m.onnx"), model_nodes, assigned, 1)
    assert [n.name for n in placement.on_qnn] == ["d", "conv"]
    assert [n.name for n in placement.not_on_qnn] == ["hm"]
    assert [n.name for n in placement.rewritten] == ["id"]
    assert [n.name for n in placement.inserted] == ["Transpose_token_1"]
    assert not placement.fully_on_qnn


# ----------------------------------------------------------------------------------------------- on the HTP
# The HTP requantises every tensor with its own fixed-point kernels (Softmax, LayerNorm, fused Gelu included), so
# each layer can land one step away from the float simulation and the difference propagates: measured on the
# emulator for v68/v75/v79, the CNN's outputs are within 2 steps (mean 0.35) and the transformer block's, a chain
# of ~20 requantisations through two residual branches, within 4 steps (mean 0.7).
@pytest.mark.qnn
@requires_qnn
@pytest.mark.parametrize(("name", "steps"), [("cnn", 2), ("transformer", 5)])
def test_whole_graph_runs_on_htp_and_matches_cpu_qdq(models, name, steps):
    built = models[name]
    placement = qnn.node_placement(built.path, options=SM8650)
    assert placement.fully_on_qnn, placement.to_dict()["not_on_qnn"]
    expected_ops = {"Conv", "Gemm"} if name == "cnn" else {"MatMul", "Softmax", "LayerNormalization", "Erf"}
    assert {n.op_type for n in placement.on_qnn} >= expected_ops

    reference = cpu_session(str(built.path))
    for htp_out, feed in zip(qnn.run_on_qnn(built.path, built.feeds, options=SM8650), built.feeds, strict=True):
        assert_within_steps(htp_out[0], reference.run(None, feed)[0], built.output_scale, steps=steps)


@pytest.mark.qnn
@requires_qnn
@pytest.mark.parametrize("embed", [False, True])
def test_compile_context_writes_a_loadable_model_with_the_same_outputs(models, tmp_path, embed):
    built = models["cnn"]
    output = tmp_path / "out" / "cnn.ctx.onnx"
    result = qnn.compile_context(built.path, output, options=SM8650, embed_context_binary=embed)

    expected_files = {"cnn.ctx.onnx"} if embed else {"cnn.ctx.onnx", "cnn.ctx_qnn.bin"}
    assert {p.name for p in output.parent.iterdir()} == expected_files  # no staging folder or side files left
    assert {f.path.name for f in result.files} == expected_files
    assert all(f.size_bytes == f.path.stat().st_size > 0 for f in result.files)
    assert result.context_graphs == 1 and result.qnn_sdk_version and result.wall_time_s > 0
    assert result.placement.fully_on_qnn and result.target == "QNN HTP (SM8650 (Snapdragon 8 Gen 3, HTP v75))"
    assert {op: result.op_types[op] for op in ("Conv", "Relu", "Add", "Gemm")} == {
        "Conv": 2,
        "Relu": 1,
        "Add": 1,
        "Gemm": 1,
    }
    assert [n.op_type for n in onnx.load(output).graph.node] == ["EPContext"]

    jit = list(qnn.run_on_qnn(built.path, built.feeds, options=SM8650))
    compiled = qnn.make_runner(output, options=SM8650)  # detects the EP-context model and loads it
    assert compiled.output_names == [o.name for o in built.model.graph.output]
    for feed, expected in zip(built.feeds, jit, strict=True):
        np.testing.assert_array_equal(compiled(feed)[0], expected[0])  # the same QNN graph, compiled ahead of time


def _with_hardmax(tmp_path: Path) -> Path:
    net = QdqNet({"x": (-1, 1), "relu": (0, 1), "hardmax": (0, 1)})
    x = net.act("x")
    h = net.op("Hardmax", [net.op("Relu", [x], "relu")], "hardmax")
    path = tmp_path / "hardmax.onnx"
    onnx.save(net.model({"x": [1, 16]}, h), path)
    return path


@pytest.mark.qnn
@requires_qnn
def test_unsupported_op_with_fallback_disabled_names_the_node(tmp_path):
    path = _with_hardmax(tmp_path)
    with pytest.raises(CompileError, match=r"hardmax \(Hardmax\): Operators of type `Hardmax` are not supported"):
        qnn.create_session(path)
    placement = qnn.node_placement(path)
    assert [(n.name, n.ep) for n in placement.not_on_qnn if not n.is_qdq] == [("hardmax", "CPUExecutionProvider")]
    assert {n.name for n in placement.on_qnn} >= {"relu", "x/Q"}

    output = tmp_path / "out" / "hardmax.ctx.onnx"
    with pytest.raises(CompileError, match="hardmax"):
        qnn.compile_context(path, output)
    assert list(output.parent.iterdir()) == []  # staging folder and ORT's side files cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardmax.onnx", "out"]

    session = qnn.create_session(path, options=qnn.QnnOptions(disable_cpu_fallback=False))
    assert session.run(None, {"x": np.ones((1, 16), np.float32)})[0].shape == (1, 16)


@pytest.mark.qnn
@requires_qnn
def test_dynamic_shapes_and_bad_inputs_are_user_errors(models, tmp_path):
    model = onnx.ModelProto()
    model.CopyFrom(models["cnn"].model)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(model, dynamic)
    with pytest.raises(CompileError, match=r"static input shapes.*x \[N, 3, 16, 16\]"):
        qnn.node_placement(dynamic)
    with pytest.raises(ModelLoadError, match="not found"):
        qnn.create_session(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="not an EP-context model"):
        qnn.load_context_model(models["cnn"].path)
    with pytest.raises(CalibrationDataError, match=r"'x' has shape \[1, 3, 8, 8\]"):
        next(qnn.run_on_qnn(models["cnn"].path, [{"x": np.zeros((1, 3, 8, 8), np.float32)}]))
