"""Tests for edgeq's ONNX → Core ML lowering (edgeq/backends/coreml*.py).

The models are built here with onnx.helper: a small CNN (BatchNorm, depthwise, residual, pooling, Gemm) and a
transformer block (LayerNorm, attention with MatMul/Softmax, Erf/Gelu MLP, Reshape/Transpose), plus QDQ
versions made by hand. On Linux coremltools builds and reads packages but cannot run them, so numerics are
checked with edgeq's numpy interpreter of the saved MIL program against ONNX Runtime; Core ML prediction
itself is tested on macOS only.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import BackendUnavailableError, CompileError, EdgeqError, OutputError, UnsupportedModelError

ct = pytest.importorskip("coremltools", reason="coremltools (pip install 'edgeq[coreml]') is not installed")

from edgeq.backends import coreml
from edgeq.backends.coreml import CoremlOptions

pytestmark = pytest.mark.coreml
needs_macos = pytest.mark.skipif(not coreml.predict_available(), reason="Core ML prediction needs macOS")

RNG = np.random.default_rng(7)


# --------------------------------------------------------------------------------------------- model builders
def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _randn(*shape, scale=1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True))
    return model


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _bn(prefix: str, x: str, y: str, channels: int, inits: list) -> onnx.NodeProto:
    inits += [_init(f"{prefix}.g", 1 + _randn(channels, scale=0.1)), _init(f"{prefix}.b", _randn(channels, scale=0.1)),
              _init(f"{prefix}.m", _randn(channels, scale=0.1)),
              _init(f"{prefix}.v", np.abs(1 + _randn(channels, scale=0.1)))]
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in "gbmv"], [y], epsilon=1e-5,
                            name=f"/{prefix}/bn")


def make_cnn(batch=1) -> onnx.ModelProto:
    """Conv-BN-ReLU, depthwise (auto_pad) + BN + Relu6 (Clip), pointwise + BN, residual Add, pools, Gemm."""
    inits: list = []
    def conv(name, x, y, **attrs):
        return helper.make_node("Conv", [x, name + ".w", name + ".bias"], [y], name=f"/{name}/Conv", **attrs)

    inits += [_init("c1.w", _randn(16, 3, 3, 3, scale=0.3)), _init("c1.bias", _randn(16, scale=0.1)),
              _init("dw.w", _randn(16, 1, 3, 3, scale=0.3)), _init("dw.bias", _randn(16, scale=0.1)),
              _init("pw.w", _randn(16, 16, 1, 1, scale=0.3)), _init("pw.bias", _randn(16, scale=0.1)),
              _init("fc.w", _randn(10, 16, scale=0.3)), _init("fc.bias", _randn(10, scale=0.1)),
              _init("clip.min", np.array(0.0, np.float32)), _init("clip.max", np.array(6.0, np.float32))]
    nodes = [
        conv("c1", "x", "c1", pads=[1, 1, 1, 1], strides=[2, 2]),
        _bn("bn1", "c1", "b1", 16, inits),
        helper.make_node("Relu", ["b1"], ["r1"], name="/relu1"),
        conv("dw", "r1", "d", group=16, auto_pad="SAME_UPPER"),
        _bn("bn2", "d", "b2", 16, inits),
        helper.make_node("Clip", ["b2", "clip.min", "clip.max"], ["r2"], name="/relu6"),
        conv("pw", "r2", "p"),
        _bn("bn3", "p", "b3", 16, inits),
        helper.make_node("Add", ["b3", "r1"], ["res"], name="/residual"),
        helper.make_node("MaxPool", ["res"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="/maxpool"),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0, name="/avgpool"),
        helper.make_node("GlobalAveragePool", ["ap"], ["gap"], name="/gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="/flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.bias"], ["logits"], transB=1, name="/fc/Gemm"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="/softmax"),
    ]
    return _model(nodes, [_vi("x", [batch, 3, 32, 32])], [_vi("probs", [batch, 10])], inits)


def make_transformer(opset=17, tokens=8, dim=32, heads=4) -> onnx.ModelProto:
    """Pre-LN block: LayerNorm, fused QKV MatMul, Split, multi-head attention, MLP with Gelu (Erf before
    opset 20), residuals. The head reshape takes its batch size from Shape/Gather (folded: shapes are static)."""
    hd = dim // heads
    inits = [_init("ln1.g", 1 + _randn(dim, scale=0.1)), _init("ln1.b", _randn(dim, scale=0.1)),
             _init("ln2.g", 1 + _randn(dim, scale=0.1)), _init("ln2.b", _randn(dim, scale=0.1)),
             _init("qkv.w", _randn(dim, 3 * dim, scale=0.2)), _init("qkv.b", _randn(3 * dim, scale=0.1)),
             _init("o.w", _randn(dim, dim, scale=0.2)), _init("fc1.w", _randn(dim, 2 * dim, scale=0.2)),
             _init("fc1.b", _randn(2 * dim, scale=0.1)), _init("fc2.w", _randn(2 * dim, dim, scale=0.2)),
             _init("heads.shape", np.array([tokens, heads, hd], np.int64)),
             _init("zero", np.array([0], np.int64)), _init("merged.shape", np.array([0, tokens, dim], np.int64)),
             _init("scale", np.array(1 / np.sqrt(hd), np.float32)),
             _init("split", np.array([dim, dim, dim], np.int64))]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln1.g", "ln1.b"], ["ln1"], axis=-1, epsilon=1e-5,
                         name="/attn/ln"),
        helper.make_node("MatMul", ["ln1", "qkv.w"], ["qkv0"], name="/attn/qkv/MatMul"),
        helper.make_node("Add", ["qkv0", "qkv.b"], ["qkv"], name="/attn/qkv/Add"),
        helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=-1, name="/attn/split"),
        helper.make_node("Shape", ["x"], ["x.shape"], name="/attn/shape"),
        helper.make_node("Gather", ["x.shape", "zero"], ["batch"], axis=0, name="/attn/batch"),
        helper.make_node("Concat", ["batch", "heads.shape"], ["hshape"], axis=0, name="/attn/hshape"),
    ]
    for t in "qkv":
        nodes.append(helper.make_node("Reshape", [t, "hshape"], [f"{t}.h"], name=f"/attn/{t}/Reshape"))
        perm = [0, 2, 3, 1] if t == "k" else [0, 2, 1, 3]
        nodes.append(helper.make_node("Transpose", [f"{t}.h"], [f"{t}.t"], perm=perm, name=f"/attn/{t}/Transpose"))
    nodes += [
        helper.make_node("MatMul", ["q.t", "k.t"], ["scores0"], name="/attn/qk/MatMul"),
        helper.make_node("Mul", ["scores0", "scale"], ["scores"], name="/attn/scale"),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1, name="/attn/softmax"),
        helper.make_node("MatMul", ["attn", "v.t"], ["ctx"], name="/attn/av/MatMul"),
        helper.make_node("Transpose", ["ctx"], ["ctx.t"], perm=[0, 2, 1, 3], name="/attn/merge/Transpose"),
        helper.make_node("Reshape", ["ctx.t", "merged.shape"], ["merged"], name="/attn/merge/Reshape"),
        helper.make_node("MatMul", ["merged", "o.w"], ["proj"], name="/attn/o/MatMul"),
        helper.make_node("Add", ["x", "proj"], ["h"], name="/attn/residual"),
        helper.make_node("LayerNormalization", ["h", "ln2.g", "ln2.b"], ["ln2"], axis=-1, epsilon=1e-5,
                         name="/mlp/ln"),
        helper.make_node("MatMul", ["ln2", "fc1.w"], ["fc10"], name="/mlp/fc1/MatMul"),
        helper.make_node("Add", ["fc10", "fc1.b"], ["fc1"], name="/mlp/fc1/Add"),
    ]
    if opset >= 20:
        nodes.append(helper.make_node("Gelu", ["fc1"], ["act"], name="/mlp/gelu"))
    else:
        inits += [_init("sqrt2", np.array(np.sqrt(2), np.float32)), _init("one", np.array(1, np.float32)),
                  _init("half", np.array(0.5, np.float32))]
        nodes += [helper.make_node("Div", ["fc1", "sqrt2"], ["g0"], name="/mlp/gelu/Div"),
                  helper.make_node("Erf", ["g0"], ["g1"], name="/mlp/gelu/Erf"),
                  helper.make_node("Add", ["g1", "one"], ["g2"], name="/mlp/gelu/Add"),
                  helper.make_node("Mul", ["fc1", "g2"], ["g3"], name="/mlp/gelu/Mul"),
                  helper.make_node("Mul", ["g3", "half"], ["act"], name="/mlp/gelu/Mul_1")]
    nodes += [helper.make_node("MatMul", ["act", "fc2.w"], ["fc2"], name="/mlp/fc2/MatMul"),
              helper.make_node("Add", ["h", "fc2"], ["y"], name="/mlp/residual")]
    return _model(nodes, [_vi("x", [1, tokens, dim])], [_vi("y", [1, tokens, dim])], inits, opset=opset)


# ------------------------------------------------------------------------------------------ hand-made QDQ
_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}


def _weight_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1 if node.op_type == "MatMul" else 0


def quantize_weights(model: onnx.ModelProto, *, int4_block: int = 0, unsigned: bool = False) -> onnx.ModelProto:
    """Replace every float weight of Conv/Gemm/MatMul with an integer initializer + DequantizeLinear.

    int8 (or uint8 with zero point 128) symmetric per output channel; with ``int4_block`` the MatMul weights are
    int4, block-quantized along the input dimension (needs opset 21)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        idx = _WEIGHT_INPUT.get(node.op_type)
        name = node.input[idx] if idx is not None and len(node.input) > idx else None
        if name in inits and inits[name].data_type == TensorProto.FLOAT:
            w = numpy_helper.to_array(inits[name])
            axis = _weight_axis(node, w.ndim)
            if int4_block and node.op_type == "MatMul":
                k, n = w.shape
                blocks = w.reshape(k // int4_block, int4_block, n)
                scale = (np.abs(blocks).max(axis=1) / 7).astype(np.float32)
                q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7).reshape(k, n).astype(np.int8)
                q_init = helper.make_tensor(name + ".q", TensorProto.INT4, q.shape, q.reshape(-1).tolist())
                attrs, zp_init = {"axis": 0, "block_size": int4_block}, None
            else:
                reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
                scale = (np.abs(w).max(axis=reduce_axes) / 127).astype(np.float32)
                shape = [-1 if i == axis else 1 for i in range(w.ndim)]
                q = np.clip(np.round(w / scale.reshape(shape)), -127, 127)
                if unsigned:
                    q_init = _init(name + ".q", (q + 128).astype(np.uint8))
                    zp_init = _init(name + ".zp", np.full(scale.shape, 128, np.uint8))
                else:
                    q_init = _init(name + ".q", q.astype(np.int8))
                    zp_init = _init(name + ".zp", np.zeros(scale.shape, np.int8))
                attrs = {"axis": axis}
            model.graph.initializer.extend([q_init, _init(name + ".s", scale)] + ([zp_init] if zp_init else []))
            model.graph.initializer.remove(inits.pop(name))
            dq_inputs = [name + ".q", name + ".s"] + ([name + ".zp"] if zp_init else [])
            new_nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [name + ".dq"],
                                              name=f"{node.name}/weight/DQ", **attrs))
            node.input[idx] = name + ".dq"
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    onnx.checker.check_model(model)
    return model


def add_activation_qdq(model: onnx.ModelProto, tensors: list[str], scale=0.05, dtype=np.uint8):
    """Insert QuantizeLinear → DequantizeLinear on the named activations (the W8A8 profile's fake quant)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    zero = 128 if dtype == np.uint8 else 0
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for out in node.output:
            if out in tensors:
                model.graph.initializer.extend([_init(out + ".as", np.array(scale, np.float32)),
                                                _init(out + ".az", np.array(zero, dtype))])
                for consumer in model.graph.node:
                    consumer.input[:] = [out + ".adq" if i == out else i for i in consumer.input]
                nodes += [helper.make_node("QuantizeLinear", [out, out + ".as", out + ".az"], [out + ".aq"],
                                           name=f"{out}/Q"),
                          helper.make_node("DequantizeLinear", [out + ".aq", out + ".as", out + ".az"],
                                           [out + ".adq"], name=f"{out}/DQ")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------------------------------------- helpers
def _ort(model: onnx.ModelProto, feeds: dict) -> dict:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, feeds)))


def _compile(model, tmp_path, name="model", **option_kwargs):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return coreml.compile_coreml(path, tmp_path / f"{name}.mlpackage", options=CoremlOptions(**option_kwargs))


def _rel_err(got, ref) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def _ort_literal(model: onnx.ModelProto, feeds: dict) -> dict:
    """ONNX Runtime with graph optimizations off: it then evaluates Q/DQ literally (fake quantization), instead
    of fusing them into integer kernels whose rounding differs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, feeds)))


def _package_ops(path) -> list:
    from edgeq.backends.coreml_verify import load_program

    program = load_program(ct.models.MLModel(str(path), skip_model_load=True))
    return list(program.functions["main"].operations)


def _leftovers(folder, keep) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


CNN_INPUT = {"x": RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)}
TOKENS = {"x": RNG.standard_normal((1, 8, 32)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------- options
def test_options_validate_their_values():
    assert CoremlOptions().minimum_deployment_target == "iOS17"
    assert CoremlOptions(minimum_deployment_target="macOS15").target_level == 18
    with pytest.raises(EdgeqError, match="iOS16"):
        CoremlOptions(minimum_deployment_target="ios17")
    with pytest.raises(EdgeqError, match="fp16"):
        CoremlOptions(compute_precision="int8")
    with pytest.raises(EdgeqError, match="cpu_and_ne"):
        CoremlOptions(compute_units="ane")
    with pytest.raises(TypeError):
        CoremlOptions("iOS17")  # keyword-only


# ------------------------------------------------------------------------------------- float models
def test_cnn_lowers_to_the_intended_ops_and_matches_onnxruntime(tmp_path):
    model = make_cnn()
    program = coreml.lower_to_mil(model, options=CoremlOptions(compute_precision="fp32"))
    ops = [op for op in program.functions["main"].operations if op.op_type != "const"]
    assert [op.op_type for op in ops] == [
        "conv", "batch_norm", "relu", "conv", "batch_norm", "relu6", "conv", "batch_norm", "add", "max_pool",
        "avg_pool", "reduce_mean", "reshape", "linear", "softmax"]
    depthwise = ops[3]
    assert depthwise.groups.val == 16 and list(depthwise.pad.val) == [1, 1, 1, 1]  # SAME_UPPER made explicit
    assert ops[10].exclude_padding_from_average.val

    result = _compile(model, tmp_path, compute_precision="fp32")
    assert (tmp_path / "model.mlpackage" / "Manifest.json").is_file()
    assert "batch_norm" not in result.op_counts  # coremltools folded BN into the float convolutions
    assert result.inputs[0].coreml_name == "x" and result.outputs[0].shape == (1, 10)
    got = coreml.reference_predict(result.output_path, CNN_INPUT)["probs"]
    assert _rel_err(got, _ort(model, CNN_INPUT)["probs"]) < 1e-5


def test_cnn_in_float16_stays_close_to_float32(tmp_path):
    model = make_cnn()
    result = _compile(model, tmp_path)
    assert result.options.compute_precision == "fp16" and result.op_counts["cast"] == 2  # fp32 I/O only
    got = coreml.reference_predict(result.output_path, CNN_INPUT)["probs"]
    assert _rel_err(got, _ort(model, CNN_INPUT)["probs"]) < 1e-2


@pytest.mark.parametrize("opset", [17, 21])
def test_transformer_block_matches_onnxruntime(tmp_path, opset):
    model = make_transformer(opset)
    program = coreml.lower_to_mil(model)
    types_ = {op.op_type for op in program.functions["main"].operations}
    assert {"layer_norm", "linear", "matmul", "softmax", "split", "reshape", "transpose"} <= types_
    assert ("gelu" if opset >= 20 else "erf") in types_
    result = _compile(model, tmp_path, compute_precision="fp32")
    got = coreml.reference_predict(result.output_path, TOKENS)["y"]
    assert _rel_err(got, _ort(model, TOKENS)["y"]) < 1e-5


def test_fp32_ops_keep_the_named_onnx_ops_in_float32(tmp_path):
    result = _compile(make_transformer(), tmp_path, fp32_ops=("Softmax",))
    dtypes = {op.op_type: op.outputs[0].dtype for op in _package_ops(result.output_path)}
    assert dtypes["softmax"] == ct.converters.mil.mil.types.fp32
    assert dtypes["layer_norm"] == ct.converters.mil.mil.types.fp16


def test_float32_islands_of_a_float16_model_stay_float32(tmp_path):
    """A float16 ONNX model that casts to float32 around Softmax keeps Softmax in float32 on Core ML."""
    half = TensorProto.FLOAT16
    nodes = [helper.make_node("Mul", ["x", "k"], ["scaled"]), helper.make_node("Cast", ["scaled"], ["wide"], to=F),
             helper.make_node("Softmax", ["wide"], ["probs"], axis=-1),
             helper.make_node("Cast", ["probs"], ["y"], to=half)]
    model = _model(nodes, [_vi("x", [2, 16], half)], [_vi("y", [2, 16], half)], [_init("k", np.array(3, np.float16))])
    result = _compile(model, tmp_path)
    assert (result.inputs[0].coreml_dtype, result.outputs[0].coreml_dtype) == ("fp16", "fp16")
    assert "probs" in result.fp32_ops
    dtypes = {op.op_type: op.outputs[0].dtype for op in _package_ops(result.output_path)}
    assert dtypes["softmax"] == ct.converters.mil.mil.types.fp32
    assert dtypes["mul"] == ct.converters.mil.mil.types.fp16
    feeds = {"x": RNG.standard_normal((2, 16)).astype(np.float16)}
    got = coreml.reference_predict(result.output_path, feeds)["y"]
    assert got.dtype == np.float16 and _rel_err(got, _ort(model, feeds)["y"].astype(np.float64)) < 2e-3


# ------------------------------------------------------------------------------------------ QDQ models
@pytest.mark.parametrize("target,unsigned,constexpr", [
    ("iOS17", False, "constexpr_affine_dequantize"),
    ("iOS17", True, "constexpr_affine_dequantize"),
    ("iOS18", False, "constexpr_blockwise_shift_scale"),
])
def test_int8_per_channel_weights_are_stored_compressed(tmp_path, target, unsigned, constexpr):
    qdq = quantize_weights(make_cnn(), unsigned=unsigned)
    result = _compile(qdq, tmp_path, minimum_deployment_target=target, compute_precision="fp32")
    dtype = "uint8" if unsigned else "int8"
    assert result.op_counts[constexpr] == 4
    assert [(w.dtype, w.granularity) for w in result.compressed_weights] == [(dtype, "per_channel")] * 4

    report = coreml.verify_mlpackage(result.output_path, reference_qdq_model=qdq)
    assert report.ok, report.summary()
    assert report.compressed_by_dtype == {dtype: 4}
    assert all(w.max_rel_diff <= 1e-6 for w in report.weights)  # float32 scales: the same floats as ONNX
    assert report.compressed_weight_bytes == 16 * 27 + 16 * 9 + 16 * 16 + 10 * 16
    assert report.float_const_bytes < report.compressed_weight_bytes * 2  # scales and biases only
    got = coreml.reference_predict(result.output_path, CNN_INPUT)["probs"]
    assert _rel_err(got, _ort_literal(qdq, CNN_INPUT)["probs"]) < 1e-5


def test_float16_package_keeps_int8_weights_with_float16_scales(tmp_path):
    qdq = quantize_weights(make_cnn())
    result = _compile(qdq, tmp_path)
    report = coreml.verify_mlpackage(result.output_path, reference_qdq_model=qdq)
    assert report.ok, report.summary()
    assert {w.tolerance for w in report.weights} == {2.0 ** -10}
    assert all(w.stored_dtype == "int8" for w in report.weights)


def test_int4_block_quantized_matmul_weights_use_blockwise_shift_scale(tmp_path):
    qdq = quantize_weights(make_transformer(21), int4_block=16)
    result = _compile(qdq, tmp_path, minimum_deployment_target="iOS18", compute_precision="fp32")
    assert result.op_counts["constexpr_blockwise_shift_scale"] == 4
    assert {(w.dtype, w.granularity, w.block_size) for w in result.compressed_weights} == {("int4", "per_block", 16)}
    blockwise = [op for op in _package_ops(result.output_path) if op.op_type == "constexpr_blockwise_shift_scale"]
    qkv = next(op for op in blockwise if op.name.startswith("qkv_w_dq"))
    assert qkv.data.shape == (96, 32) and qkv.scale.shape == (96, 2)  # linear layout (out, in): 2 blocks of 16

    report = coreml.verify_mlpackage(result.output_path, reference_qdq_model=qdq)
    assert report.ok, report.summary()
    assert report.compressed_by_dtype == {"int4": 4}
    assert report.compressed_weight_bytes == (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32) // 2
    got = coreml.reference_predict(result.output_path, TOKENS)["y"]
    assert _rel_err(got, _ort_literal(qdq, TOKENS)["y"]) < 1e-5


def test_int4_weights_need_ios18(tmp_path):
    qdq = quantize_weights(make_transformer(21), int4_block=16)
    with pytest.raises(CompileError, match="iOS18") as info:
        coreml.lower_to_mil(qdq, options=CoremlOptions(minimum_deployment_target="iOS17"))
    message = str(info.value)
    assert "4 node(s)" in message  # every int4 weight is named, not just the first
    assert "DequantizeLinear '/attn/qkv/MatMul/weight/DQ'" in message and "/mlp/fc2/MatMul/weight/DQ" in message


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_activation_qdq_pairs_become_quantize_dequantize(tmp_path, dtype):
    qdq = add_activation_qdq(quantize_weights(make_transformer()), ["ln1", "attn", "act"], scale=0.02, dtype=dtype)
    result = _compile(qdq, tmp_path, minimum_deployment_target="iOS17", compute_precision="fp32")
    assert result.activation_quant_pairs == 3
    assert result.op_counts["quantize"] == 3 and result.op_counts["dequantize"] == 3
    quantize = [op for op in _package_ops(result.output_path) if op.op_type == "quantize"]
    assert [op.name for op in quantize] == ["ln1_aq", "attn_aq", "act_aq"]
    # uint8 with zero point 128 is stored as the same mapping in int8, the form Core ML prefers
    assert all(op.output_dtype.val == "int8" and op.zero_point is None for op in quantize)
    assert all(float(op.scale.val) == np.float32(0.02) for op in quantize)

    report = coreml.verify_mlpackage(result.output_path, reference_qdq_model=qdq)
    assert report.ok, report.summary()
    assert (report.activation_pairs_expected, report.activation_pairs_found) == (3, 3)
    got = coreml.reference_predict(result.output_path, TOKENS)["y"]
    assert _rel_err(got, _ort_literal(qdq, TOKENS)["y"]) < 1e-5


def test_activation_qdq_needs_ios17():
    qdq = add_activation_qdq(make_cnn(), ["r1"])
    with pytest.raises(CompileError, match="iOS17") as info:
        coreml.lower_to_mil(qdq, options=CoremlOptions(minimum_deployment_target="iOS16"))
    assert "r1/Q" in str(info.value)


def test_int32_bias_dequantize_is_folded_to_float(tmp_path):
    qdq = quantize_weights(make_cnn())
    bias = next(i for i in qdq.graph.initializer if i.name == "fc.bias")
    values = numpy_helper.to_array(bias)
    bias_scale = np.float32(1e-4)
    qdq.graph.initializer.remove(bias)
    qdq.graph.initializer.extend([_init("fc.bias.q", np.round(values / bias_scale).astype(np.int32)),
                                  _init("fc.bias.s", np.array(bias_scale))])
    qdq.graph.node.insert(0, helper.make_node("DequantizeLinear", ["fc.bias.q", "fc.bias.s"], ["fc.bias"]))
    result = _compile(qdq, tmp_path, compute_precision="fp32")
    assert len(result.compressed_weights) == 4  # the weights, not the bias
    assert coreml.verify_mlpackage(result.output_path, reference_qdq_model=qdq).ok
    got = coreml.reference_predict(result.output_path, CNN_INPUT)["probs"]
    assert _rel_err(got, _ort_literal(qdq, CNN_INPUT)["probs"]) < 1e-5


# ------------------------------------------------------------------------------------------- verification
def test_verify_reports_weights_stored_as_float(tmp_path):
    qdq = quantize_weights(make_transformer())
    folded = onnx.ModelProto.FromString(qdq.SerializeToString())  # DequantizeLinear pre-computed to float
    from onnx.reference import ReferenceEvaluator

    for node in [n for n in folded.graph.node if n.op_type == "DequantizeLinear"]:
        inputs = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer if i.name in node.input}
        value = ReferenceEvaluator(node, opsets={"": 17}).run(None, {n: inputs[n] for n in node.input})[0]
        folded.graph.initializer.append(_init(node.output[0], value))
        folded.graph.node.remove(node)
    result = _compile(folded, tmp_path, compute_precision="fp32")
    report = coreml.verify_mlpackage(result.output_path, reference_qdq_model=qdq)
    assert not report.ok and report.compressed_weight_bytes == 0
    assert len(report.problems) == 4
    assert all("stored as a float constant" in p for p in report.problems), report.problems


def test_verify_reports_integers_that_differ(tmp_path):
    qdq = quantize_weights(make_cnn())
    result = _compile(qdq, tmp_path, compute_precision="fp32")
    tampered = onnx.ModelProto.FromString(qdq.SerializeToString())
    weight = next(i for i in tampered.graph.initializer if i.name == "pw.w.q")
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = values.flat[0] + 1 if values.flat[0] < 127 else 0
    weight.CopyFrom(_init("pw.w.q", values))
    report = coreml.verify_mlpackage(result.output_path, reference_qdq_model=tampered)
    assert [w.onnx_name for w in report.weights if not w.ok] == ["pw.w.dq"]
    assert "stored integers differ" in report.problems[0]


# ----------------------------------------------------------------------------------------- errors, I/O
def test_unsupported_ops_are_listed_in_one_error():
    inits = [_init("k", np.array([2], np.int64))]
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1, name="top2"),
             helper.make_node("Relu", ["values"], ["r"], name="relu"),
             helper.make_node("Hardmax", ["r"], ["h"], name="hardmax_after_topk"),
             helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2], dilations=[2], name="dilated_pool"),
             helper.make_node("Foo", ["x"], ["f"], domain="com.example", name="custom")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [1, 4, 8])],
                              [_vi("h", [1, 4, 2]), _vi("p", [1, 4, 6]), _vi("f", [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(CompileError) as info:
        coreml.lower_to_mil(model)
    message = str(info.value)
    assert "3 node(s)" not in message and "4 node(s)" in message
    for expected in ("TopK 'top2'", "Hardmax 'hardmax_after_topk'", "MaxPool 'dilated_pool': dilated pooling",
                     "Foo 'custom'"):
        assert expected in message
    assert "'relu'" not in message  # supported; only skipped because its input is missing


def test_dynamic_input_shape_asks_for_input_shape(tmp_path):
    model = make_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(UnsupportedModelError, match=r"--input-shape x=1,3,32,32"):
        coreml.lower_to_mil(model)
    with pytest.raises(UnsupportedModelError, match="does not fit"):
        coreml.lower_to_mil(model, input_shapes={"x": (2, 3, 16, 16)})
    with pytest.raises(UnsupportedModelError, match="not graph inputs"):
        coreml.lower_to_mil(model, input_shapes={"image": (2, 3, 32, 32)})

    onnx.save(model, tmp_path / "dyn.onnx")
    result = coreml.compile_coreml(tmp_path / "dyn.onnx", tmp_path / "dyn.mlpackage", input_shapes={"x": [2, 3, 32, 32]},
                                   options=CoremlOptions(compute_precision="fp32"))
    assert result.inputs[0].shape == (2, 3, 32, 32) and result.outputs[0].shape == (2, 10)
    x = RNG.standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = coreml.reference_predict(result.output_path, {"x": x})["probs"]
    assert _rel_err(got, _ort(model, {"x": x})["probs"]) < 1e-5


def test_failed_compile_leaves_no_temporary_folders(tmp_path, monkeypatch):
    broken = make_transformer(21)
    broken = quantize_weights(broken, int4_block=16)  # int4 + iOS17: fails while lowering
    onnx.save(broken, tmp_path / "m.onnx")
    with pytest.raises(CompileError):
        coreml.compile_coreml(tmp_path / "m.onnx", tmp_path / "m.mlpackage",
                              options=CoremlOptions(minimum_deployment_target="iOS17"))
    assert _leftovers(tmp_path, {"m.onnx"}) == []

    def failing_save(self, path):
        os.makedirs(os.path.join(path, "Data"))
        raise OSError(28, "No space left on device")

    onnx.save(make_cnn(), tmp_path / "cnn.onnx")
    monkeypatch.setattr(ct.models.MLModel, "save", failing_save)
    with pytest.raises(OutputError, match="No space left"):
        coreml.compile_coreml(tmp_path / "cnn.onnx", tmp_path / "cnn.mlpackage")
    assert _leftovers(tmp_path, {"m.onnx", "cnn.onnx"}) == []


def test_compile_replaces_an_existing_package(tmp_path):
    onnx.save(make_cnn(), tmp_path / "cnn.onnx")
    stale = tmp_path / "cnn.mlpackage"
    stale.mkdir()
    (stale / "stale.txt").write_text("old")
    coreml.compile_coreml(tmp_path / "cnn.onnx", stale)
    assert not (stale / "stale.txt").exists() and (stale / "Manifest.json").exists()
    assert _leftovers(tmp_path, {"cnn.onnx", "cnn.mlpackage"}) == []
    with pytest.raises(OutputError, match=".mlpackage"):
        coreml.compile_coreml(tmp_path / "cnn.onnx", tmp_path / "cnn.mlmodel")


def test_supported_ops_list_matches_the_translators():
    from edgeq.backends.coreml_context import TRANSLATORS

    assert coreml.SUPPORTED_OPS - coreml.FOLDED_ONLY_OPS == set(TRANSLATORS)


# ------------------------------------------------------------------------------------------- prediction
@pytest.mark.skipif(sys.platform == "darwin", reason="checks the error raised where Core ML cannot run")
def test_predict_explains_that_it_needs_macos(tmp_path):
    assert not coreml.predict_available()
    result = _compile(make_cnn(), tmp_path)
    with pytest.raises(BackendUnavailableError, match="macOS"):
        coreml.predict(result.output_path, CNN_INPUT)
    with pytest.raises(BackendUnavailableError, match="macOS"):
        coreml.make_runner(result.output_path)


@needs_macos
@pytest.mark.parametrize("quantized", [False, True])
def test_core_ml_prediction_matches_onnxruntime(tmp_path, quantized):
    model = quantize_weights(make_cnn()) if quantized else make_cnn()
    result = _compile(model, tmp_path, compute_units="cpu_only")
    got = coreml.predict(result.output_path, CNN_INPUT, compute_units="cpu_only")["probs"]
    assert _rel_err(got, _ort_literal(model, CNN_INPUT)["probs"]) < 2e-2
    run = coreml.make_runner(result.output_path)
    assert run.output_names == ["probs"] and run(CNN_INPUT)[0].shape == (1, 10)


# ----------------------------------------------------------------------------------------- op coverage
def _single(nodes, inputs: dict, outputs: list[tuple], inits=(), opset=17):
    """A small model: ``inputs`` maps names to arrays (their shapes become static input shapes)."""
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    ins = [_vi(name, list(value.shape), elem[value.dtype]) for name, value in inputs.items()]
    outs = [helper.make_tensor_value_info(name, out[0], out[1] if len(out) > 1 else None) for name, *out in outputs]
    return _model(nodes, ins, outs, [_init(k, v) for k, v in inits], opset=opset), inputs


def _n(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, name=f"{op}_{outs[0]}", **attrs)


F = TensorProto.FLOAT
X4 = RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)

OP_CASES = {
    "unary math": lambda: _single(
        [_n("Abs", ["x"], ["a"]), _n("Add", ["a", "one"], ["b"]), _n("Sqrt", ["b"], ["sqrt"]),
         _n("Reciprocal", ["b"], ["recip"]), _n("Log", ["b"], ["log"]), _n("Neg", ["x"], ["neg"]),
         _n("Exp", ["neg"], ["exp"]), _n("Erf", ["x"], ["erf"]), _n("Pow", ["b", "p"], ["pow"]),
         _n("Pow", ["x", "two"], ["square"]), _n("Div", ["x", "b"], ["div"]), _n("Sub", ["x", "b"], ["sub"]),
         _n("Max", ["x", "a", "neg"], ["max"]), _n("Min", ["x", "neg"], ["min"]), _n("Sum", ["x", "a", "b"], ["sum"])],
        {"x": X4}, [(o, F) for o in ("sqrt", "recip", "log", "exp", "erf", "pow", "square", "div", "sub", "max",
                                     "min", "sum")],
        [("one", np.array(1, np.float32)), ("p", np.array(1.5, np.float32)), ("two", np.array(2, np.float32))]),
    "activations": lambda: _single(
        [_n("Sigmoid", ["x"], ["sigmoid"]), _n("Tanh", ["x"], ["tanh"]),
         _n("HardSigmoid", ["x"], ["hsig"], alpha=0.3, beta=0.6), _n("HardSwish", ["x"], ["hswish"]),
         _n("LeakyRelu", ["x"], ["leaky"], alpha=0.1), _n("Elu", ["x"], ["elu"]), _n("Softplus", ["x"], ["softplus"]),
         _n("PRelu", ["x", "slope"], ["prelu"]), _n("Clip", ["x", "lo", "hi"], ["clip"]),
         _n("Clip", ["x", "lo"], ["clip_min"]), _n("Relu", ["x"], ["relu"])],
        {"x": X4}, [(o, F) for o in ("sigmoid", "tanh", "hsig", "hswish", "leaky", "elu", "softplus", "prelu",
                                     "clip", "clip_min", "relu")],
        [("slope", _randn(4, 1, 1, scale=0.2)), ("lo", np.array(-1, np.float32)), ("hi", np.array(2, np.float32))]),
    "gelu tanh (opset 20)": lambda: _single([_n("Gelu", ["x"], ["y"], approximate="tanh")], {"x": X4}, [("y", F)],
                                            opset=20),
    "softmax opset 11 (2-D coercion) and LogSoftmax": lambda: _single(
        [_n("Softmax", ["x"], ["sm"], axis=1), _n("LogSoftmax", ["x"], ["lsm"], axis=-1)], {"x": X4},
        [("sm", F), ("lsm", F)], opset=11),
    "conv dilated, asymmetric pads, 1-D": lambda: _single(
        [_n("Conv", ["x", "w"], ["y"], dilations=[2, 2], pads=[0, 1, 1, 0]),
         _n("Conv", ["s", "w1"], ["y1"], strides=[2], auto_pad="SAME_LOWER")],
        {"x": X4, "s": _randn(1, 4, 9)}, [("y", F), ("y1", F)],
        [("w", _randn(5, 4, 3, 3)), ("w1", _randn(3, 4, 4))]),
    "conv transpose (pads, output_padding, groups)": lambda: _single(
        [_n("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 1, 1], output_padding=[1, 1]),
         _n("ConvTranspose", ["x", "wg"], ["yg"], group=2, strides=[2, 2], auto_pad="SAME_UPPER")],
        {"x": X4}, [("y", F), ("yg", F)], [("w", _randn(4, 3, 3, 3)), ("b", _randn(3)), ("wg", _randn(4, 2, 3, 3))]),
    "pooling (ceil mode, counted padding, global max)": lambda: _single(
        [_n("MaxPool", ["x"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
         _n("AveragePool", ["x"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
         _n("GlobalMaxPool", ["x"], ["gmp"])], {"x": X4}, [("mp", F), ("ap", F), ("gmp", F)]),
    "instance and group normalization": lambda: _single(
        [_n("InstanceNormalization", ["x", "g", "b"], ["inorm"], epsilon=1e-5),
         _n("GroupNormalization", ["x", "g", "b"], ["gnorm"], num_groups=2, epsilon=1e-5)],
        {"x": X4}, [("inorm", F, X4.shape), ("gnorm", F, X4.shape)],
        [("g", 1 + _randn(4, scale=0.1)), ("b", _randn(4, scale=0.1))],
        opset=21),
    "batch norm on a 2-D tensor": lambda: _single(
        [_n("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"])], {"x": _randn(3, 4)}, [("y", F)],
        [("g", _randn(4)), ("b", _randn(4)), ("m", _randn(4)), ("v", 1 + np.abs(_randn(4)))]),
    "layer norm over two axes": lambda: _single(
        [_n("LayerNormalization", ["x", "g"], ["y"], axis=-2)], {"x": X4}, [("y", F)], [("g", _randn(6, 6))]),
    "reductions (axes input, opset 18)": lambda: _single(
        [_n("ReduceSum", ["x", "axes"], ["sum"], keepdims=0), _n("ReduceMean", ["x", "axes"], ["mean"]),
         _n("ReduceMax", ["x", "axes"], ["max"]), _n("ReduceL2", ["x"], ["l2"], keepdims=0)],
        {"x": X4}, [("sum", F), ("mean", F), ("max", F), ("l2", F)], [("axes", np.array([-1, 2], np.int64))],
        opset=18),
    "reductions (axes attribute, opset 13)": lambda: _single(
        [_n("ReduceMean", ["x"], ["mean"], axes=[1]), _n("ReduceMin", ["x"], ["min"], keepdims=0),
         _n("ArgMax", ["x"], ["argmax"], axis=1)],
        {"x": X4}, [("mean", F), ("min", F), ("argmax", TensorProto.INT64)], opset=13),
    "reshape, flatten, squeeze, unsqueeze, transpose, dropout": lambda: _single(
        [_n("Reshape", ["x", "shape"], ["r"]), _n("Flatten", ["x"], ["f"], axis=2),
         _n("Unsqueeze", ["x", "ax"], ["u"]), _n("Squeeze", ["u", "ax"], ["s"]), _n("Transpose", ["r"], ["t"]),
         _n("Dropout", ["t"], ["d"]), _n("Identity", ["d"], ["i"])],
        {"x": X4}, [("f", F), ("s", F), ("i", F)],
        [("shape", np.array([0, -1, 3], np.int64)), ("ax", np.array([-2], np.int64))], opset=13),
    "concat, split, slice": lambda: _single(
        [_n("Concat", ["x", "c"], ["cat"], axis=1), _n("Split", ["cat"], ["s0", "s1", "s2"], axis=1, num_outputs=3),
         _n("Slice", ["x", "st", "en", "axs", "stp"], ["sl"])],
        {"x": X4}, [("s0", F), ("s1", F), ("s2", F), ("sl", F)],
        [("c", _randn(1, 3, 6, 6)), ("st", np.array([-1, 1], np.int64)), ("en", np.array([-10**18, 10**18], np.int64)),
         ("axs", np.array([3, 2], np.int64)), ("stp", np.array([-2, 2], np.int64))], opset=18),
    "gather (constant indices, embedding lookup)": lambda: _single(
        [_n("Gather", ["x", "idx"], ["g"], axis=2), _n("Gather", ["x", "i0"], ["g0"], axis=1),
         _n("Gather", ["table", "ids"], ["emb"], axis=0)],
        {"x": X4, "ids": RNG.integers(0, 10, (2, 5)).astype(np.int64)}, [("g", F), ("g0", F), ("emb", F)],
        [("idx", np.array([[0, -1], [2, 3]], np.int64)), ("i0", np.array(-2, np.int64)), ("table", _randn(10, 8))]),
    "comparisons, where, cast": lambda: _single(
        [_n("Greater", ["x", "zero"], ["gt"]), _n("Mul", ["x", "tenth"], ["small"]),
         _n("Where", ["gt", "x", "small"], ["w"]), _n("Less", ["x", "half"], ["lt"]), _n("Cast", ["lt"], ["ltf"], to=F),
         _n("Cast", ["x"], ["xi"], to=TensorProto.INT32), _n("Equal", ["xi", "zero_i"], ["eq"]),
         _n("Cast", ["eq"], ["eqf"], to=F)],
        {"x": X4 * 2}, [("w", F), ("ltf", F), ("eqf", F)],
        [("zero", np.array(0, np.float32)), ("tenth", np.array(0.1, np.float32)), ("half", np.array(0.5, np.float32)),
         ("zero_i", np.array(0, np.int32))]),
    "resize (nearest x2, linear half_pixel, linear align_corners)": lambda: _single(
        [_n("Resize", ["x", "", "sc"], ["near"], mode="nearest"),
         _n("Resize", ["x", "", "", "sz"], ["lin"], mode="linear"),
         _n("Resize", ["x", "", "", "sz2"], ["ac"], mode="linear", coordinate_transformation_mode="align_corners")],
        {"x": X4}, [("near", F), ("lin", F), ("ac", F)],
        [("sc", np.array([1, 1, 2, 2], np.float32)), ("sz", np.array([1, 4, 9, 12], np.int64)),
         ("sz2", np.array([1, 4, 4, 11], np.int64))], opset=13),
    "pad (constant, reflect, edge)": lambda: _single(
        [_n("Pad", ["x", "p", "v"], ["pc"]), _n("Pad", ["x", "p2"], ["pr"], mode="reflect"),
         _n("Pad", ["x", "p2"], ["pe"], mode="edge")],
        {"x": X4}, [("pc", F), ("pr", F), ("pe", F)],
        [("p", np.array([0, 1, 0, 2, 0, 0, 1, 0], np.int64)), ("v", np.array(0.5, np.float32)),
         ("p2", np.array([0, 0, 2, 1, 0, 0, 1, 2], np.int64))], opset=13),
    "expand, tile": lambda: _single(
        [_n("Expand", ["x", "shape"], ["e"]), _n("Tile", ["x", "reps"], ["t"])],
        {"x": _randn(4, 1, 6)}, [("e", F), ("t", F)],
        [("shape", np.array([2, 1, 3, 1], np.int64)), ("reps", np.array([1, 2, 3], np.int64))]),
    "batched matmul, gemm variants": lambda: _single(
        [_n("MatMul", ["a", "b"], ["mm"]), _n("MatMul", ["a", "w3"], ["mmc"]),
         _n("Gemm", ["m", "g", "c"], ["gemm"], transA=1, alpha=0.5, beta=2.0),
         _n("Gemm", ["m", "g2", "c2"], ["gemm2"], transB=1)],
        {"a": _randn(2, 3, 4, 5), "b": _randn(2, 3, 5, 6), "m": _randn(5, 3)},
        [("mm", F), ("mmc", F), ("gemm", F), ("gemm2", F)],
        [("w3", _randn(3, 5, 2)), ("g", _randn(5, 4)), ("c", _randn(1, 4)), ("g2", _randn(6, 3)),
         ("c2", _randn(5, 6))]),
    "gather from a boolean mask": lambda: _single(
        [_n("Greater", ["x", "zero"], ["m"]), _n("Gather", ["m", "idx"], ["mg"], axis=1),
         _n("Cast", ["mg"], ["y"], to=F)],
        {"x": X4}, [("y", F)], [("zero", np.array(0, np.float32)), ("idx", np.array([3, 0], np.int64))]),
    "shape arithmetic is folded": lambda: _single(
        [_n("Shape", ["x"], ["s"]), _n("Slice", ["s", "b", "e"], ["hw"]), _n("ReduceProd", ["hw"], ["n"], keepdims=1),
         _n("Concat", ["head", "n"], ["shape"], axis=0), _n("Reshape", ["x", "shape"], ["y"]),
         _n("Size", ["x"], ["size"]), _n("Cast", ["size"], ["sizef"], to=F), _n("Div", ["y", "sizef"], ["z"])],
        {"x": X4}, [("z", F)],
        [("b", np.array([2], np.int64)), ("e", np.array([4], np.int64)), ("head", np.array([1, 4], np.int64))]),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_lowering_matches_onnxruntime(tmp_path, case):
    model, feeds = OP_CASES[case]()
    result = _compile(model, tmp_path, compute_precision="fp32")
    expected = _ort(model, feeds)
    got = coreml.reference_predict(result.output_path, feeds)
    for name, ref in expected.items():
        assert got[name].shape == ref.shape and got[name].dtype == ref.dtype, name
        if np.issubdtype(ref.dtype, np.integer):
            np.testing.assert_array_equal(got[name], ref, err_msg=name)
        else:
            assert _rel_err(got[name], ref) < 1e-5, name


def test_embedding_table_stays_compressed(tmp_path):
    table = RNG.integers(-127, 128, (10, 8)).astype(np.int8)
    scale = (RNG.random(10) * 0.01 + 0.001).astype(np.float32)
    model, feeds = _single(
        [_n("DequantizeLinear", ["table.q", "table.s"], ["table"], axis=0), _n("Gather", ["table", "ids"], ["emb"])],
        {"ids": RNG.integers(0, 10, (2, 5)).astype(np.int64)}, [("emb", F)], [("table.q", table), ("table.s", scale)],
        opset=13)
    result = _compile(model, tmp_path, compute_precision="fp32")
    assert result.inputs[0].onnx_dtype == "int64" and result.inputs[0].coreml_dtype == "int32"
    assert coreml.verify_mlpackage(result.output_path, reference_qdq_model=model).compressed_by_dtype == {"int8": 1}
    got = coreml.reference_predict(result.output_path, feeds)["emb"]
    assert _rel_err(got, _ort(model, feeds)["emb"]) < 1e-6
