"""Q/DQ insertion: placement per target profile, skip reasons, and numerics bounded by the scales."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from conftest import make_cnn, make_transformer_block, run_ort
from edgeq.api import canonicalize
from edgeq.calibration.calibrate import calibrate
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile


def _quantize(model, target, samples):
    canon, _ = canonicalize(model)
    stats = calibrate(canon, samples)
    graph = to_graph(canon)
    result = make_pass("insert_qdq").run(graph, PassContext(profile=load_profile(target), stats=stats))
    return canon, to_model(graph, model), result


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _const(model, name):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def _cnn_samples(n=8):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def test_tensorrt_placement_on_cnn():
    canon, q, _ = _quantize(make_cnn(), "tensorrt", _cnn_samples())
    prod = _producers(q)
    for node in q.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert prod[node.input[0]].op_type == "DequantizeLinear", node.name
            wdq = prod[node.input[1]]
            assert wdq.op_type == "DequantizeLinear"
            axis = {a.name: a.i for a in wdq.attribute}["axis"]
            assert axis == (0 if node.op_type == "Conv" else 1)
            assert _const(q, wdq.input[0]).dtype == np.int8
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = _const(q, node.input[2])
            assert zp.dtype == np.int8 and not zp.any(), "TensorRT needs symmetric int8"
    # residual Add: the shortcut (Relu output) is quantized, the Conv output feeding the Add is not
    add = next(n for n in q.graph.node if n.op_type == "Add")
    kinds = [prod[i].op_type for i in add.input]
    assert sorted(kinds) == ["Conv", "DequantizeLinear"]
    # outputs of Conv/Gemm are never quantized for TensorRT
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear":
            assert prod[node.input[0]].op_type not in ("Conv", "Gemm") if node.input[0] in prod else True


def test_qnn_placement_quantizes_whole_graph_and_bias():
    canon, q, _ = _quantize(make_cnn(), "qnn", _cnn_samples())
    prod = _producers(q)
    assert [o.name for o in q.graph.output] == ["logits"]
    assert prod["logits"].op_type == "DequantizeLinear", "graph outputs are quantized, name kept"
    for node in q.graph.node:
        if node.op_type in ("QuantizeLinear",):
            assert _const(q, node.input[2]).dtype == np.uint8
        if node.op_type in ("Conv", "Gemm", "Relu", "Add", "GlobalAveragePool", "Flatten"):
            for i in node.input:
                assert prod[i].op_type == "DequantizeLinear", f"{node.name} input {i} not quantized"
        if node.op_type == "Conv":
            bias_dq = prod[node.input[2]]
            assert _const(q, bias_dq.input[0]).dtype == np.int32
            s_b = _const(q, bias_dq.input[1])
            s_x = _const(q, prod[node.input[0]].input[1])
            s_w = _const(q, prod[node.input[1]].input[1])
            np.testing.assert_allclose(s_b, s_x * s_w, rtol=1e-6)
        if node.op_type == "Gemm":
            assert _const(q, prod[node.input[1]].input[1]).size == 1, "QNN: per-tensor weights on Gemm"


def test_qnn_shares_scale_through_flatten():
    _, q, _ = _quantize(make_cnn(), "qnn", _cnn_samples())
    prod = _producers(q)
    flat = next(n for n in q.graph.node if n.op_type == "Flatten")
    s_in = _const(q, prod[flat.input[0]].input[1])
    quant_out = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == flat.output[0])
    assert _const(q, quant_out.input[1]) == s_in


def test_quantized_error_is_bounded_by_scales():
    model = make_cnn()
    samples = _cnn_samples(16)
    for target in ("tensorrt", "qnn", "ort-cpu"):
        canon, q, _ = _quantize(model, target, samples)
        x = samples[3]
        ref = run_ort(canon, x)[0]
        out = run_ort(q, x)[0]
        # each of ~6 quantized stages adds at most half a step of its scale, amplified by later layers:
        # require the error to stay within a few output steps of an 8-bit grid over the output range.
        step = (ref.max() - ref.min()) / 255
        assert np.abs(out - ref).max() < 12 * step, target
        cos = float(ref.ravel() @ out.ravel() / np.linalg.norm(ref) / np.linalg.norm(out))
        assert cos > 0.99, target


def test_mask_arithmetic_is_kept_float_with_reason():
    model = make_transformer_block(mask=True)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 16, 32)).astype(np.float32), "mask": np.ones((1, 16), np.int64)}
               for _ in range(4)]
    _, q, result = _quantize(model, "qnn", samples)
    reasons = {s.target: s.reason for s in result.skipped}
    assert "madd" in reasons and "attention-mask" in reasons["madd"]
    quantized_inputs = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "madd" not in quantized_inputs and "madd3" not in quantized_inputs
    # masked positions still masked after quantization
    mask = np.ones((1, 16), np.int64)
    mask[0, 10:] = 0
    feed = {"x": samples[0]["x"], "mask": mask}
    canon, _ = canonicalize(model)
    ref, out = run_ort(canon, feed)[0], run_ort(q, feed)[0]
    assert np.isfinite(out).all()
    cos = float(ref.ravel() @ out.ravel() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > 0.98


def test_tensorrt_transformer_block_quantizes_matmuls():
    model = make_transformer_block()
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 16, 32)).astype(np.float32)} for _ in range(4)]
    _, q, _ = _quantize(model, "tensorrt", samples)
    prod = _producers(q)
    mms = [n for n in q.graph.node if n.op_type == "MatMul"]
    assert len(mms) == 8
    for n in mms:
        assert all(prod[i].op_type == "DequantizeLinear" for i in n.input), n.name


def test_already_quantized_model_is_refused():
    import pytest

    from edgeq.errors import UnsupportedModelError

    _, q, _ = _quantize(make_cnn(), "tensorrt", _cnn_samples(2))
    stats = calibrate(q, _cnn_samples(2))
    with pytest.raises(UnsupportedModelError, match="already contains"):
        make_pass("insert_qdq").run(to_graph(q), PassContext(profile=load_profile("tensorrt"), stats=stats))


def test_weight_only_mode_keeps_activations_float():
    _, q, _ = _quantize(make_cnn(), "coreml", _cnn_samples(2))
    assert not any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 3
    onnx.checker.check_model(q)


def _gelu_mlp():
    from onnx import TensorProto, helper

    from conftest import init

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Div", ["h", "sqrt2"], ["hd"], name="gelu_div"),
             helper.make_node("Erf", ["hd"], ["he"], name="gelu_erf"),
             helper.make_node("Add", ["he", "one"], ["ha"], name="gelu_add"),
             helper.make_node("Mul", ["h", "ha"], ["hm"], name="gelu_mul"),
             helper.make_node("Mul", ["hm", "half"], ["g"], name="gelu_half"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")]
    inits = [init("w1", rng.normal(0, .3, (16, 32)).astype(np.float32)),
             init("w2", rng.normal(0, .2, (32, 16)).astype(np.float32)),
             init("sqrt2", np.array(np.sqrt(2), np.float32)), init("one", np.array(1, np.float32)),
             init("half", np.array(0.5, np.float32))]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_qnn_leaves_erf_gelu_interior_unquantized():
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(size=(1, 4, 16)).astype(np.float32)} for _ in range(4)]
    canon, q, result = _quantize(_gelu_mlp(), "qnn", samples)
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert {"hd", "he", "ha", "hm"}.isdisjoint(quantized)
    assert {"h", "g", "x"} <= quantized, "the GELU's input and output are quantized"
    prod = _producers(q)
    div = next(n for n in q.graph.node if n.op_type == "Div")
    assert prod[div.input[0]].op_type == "DequantizeLinear", "the pattern reads the dequantized input"
    assert any("Erf-form GELU" in s.reason for s in result.skipped)
    ref, out = run_ort(canon, samples[0])[0], run_ort(q, samples[0])[0]
    assert float(ref.ravel() @ out.ravel() / np.linalg.norm(ref) / np.linalg.norm(out)) > 0.99


def _block_at_opset(profile_name: str):
    """The transformer block quantized for a profile that needs a newer opset (int4 / fp8)."""
    from edgeq.api import quantize_opset
    from edgeq.model_io import ensure_opset

    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 16, 32)).astype(np.float32)} for _ in range(2)]
    profile = load_profile(profile_name)
    canon, _ = canonicalize(make_transformer_block())
    canon = ensure_opset(canon, quantize_opset(profile, canon), why=profile_name)
    graph = to_graph(canon)
    make_pass("insert_qdq").run(graph, PassContext(profile=profile, stats=calibrate(canon, samples)))
    return profile, canon, to_model(graph, canon), samples


def test_int4_weight_only_blockwise():
    _, canon, q, samples = _block_at_opset("tensorrt-int4")
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 6 and not any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    for dq in dqs:
        w = next(i for i in q.graph.initializer if i.name == dq.input[0])
        assert w.data_type == onnx.TensorProto.INT4
        attrs = {a.name: a.i for a in dq.attribute}
        assert attrs["block_size"] == 128 and attrs["axis"] == 0
    ref, out = run_ort(canon, samples[0])[0], run_ort(q, samples[0])[0]
    # int4 (8 levels each side): error per weight <= scale/2; the block's cosine stays high
    assert float(ref.ravel() @ out.ravel() / np.linalg.norm(ref) / np.linalg.norm(out)) > 0.98


def test_fp8_qdq_is_legal_for_tensorrt():
    from edgeq.lint import check_model

    profile, canon, q, samples = _block_at_opset("tensorrt-fp8")
    zps = [i for i in q.graph.initializer if i.name.endswith("/zero_point")]
    assert zps and all(z.data_type == onnx.TensorProto.FLOAT8E4M3FN for z in zps)
    assert check_model(q, profile).passed
    # ORT's extended optimisations fuse float8 Q/DQ approximately; basic level is the exact simulation
    from edgeq.calibration.calibrate import make_session

    ref = make_session(canon).run(None, samples[0])[0]
    out = make_session(q).run(None, samples[0])[0]
    assert float(ref.ravel() @ out.ravel() / np.linalg.norm(ref) / np.linalg.norm(out)) > 0.99


def _conv_relu6(*, shared: bool, dead_channel: bool = False) -> onnx.ModelProto:
    """Conv -> Clip(0, 6) [-> and, when shared, the Conv output also feeds an Add]."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.2, 4).astype(np.float32)
    if dead_channel:  # what BatchNorm folding leaves for a channel with gamma ~ 0: tiny weights, real bias
        w[2] *= 1e-9
        b[2] = 1.5
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6")]
    out = "y"
    if shared:
        nodes.append(helper.make_node("Add", ["y", "c"], ["z"], name="join"))
        out = "z"
    inits = [numpy_helper.from_array(v, n) for n, v in
             (("w", w), ("b", b), ("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32)))]
    graph = helper.make_graph(nodes, "conv_relu6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _act_qparams(q, tensor):
    quant = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in (tensor, f"{tensor}/float"))
    return float(_const(q, quant.input[1])), int(_const(q, quant.input[2]))


def test_qnn_conv_output_takes_its_fused_activation_range():
    # QNN fuses Conv + ReLU6 and quantizes once, with the Clip's output parameters; the QDQ model must do the same
    # or the ORT simulation rounds to the Conv's wider range first (EfficientNet-Lite: emulator-vs-ORT cos 0.96).
    samples = [{"x": np.random.default_rng(i).normal(0, 3, (1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    canon, q, _ = _quantize(_conv_relu6(shared=False), "qnn", samples)
    assert _act_qparams(q, "c") == _act_qparams(q, "y")
    assert _act_qparams(q, "y")[1] == 0, "ReLU6 output range starts at 0"
    scale = _act_qparams(q, "y")[0]
    for s in samples:  # the Q/DQ before the Clip clamps exactly as the Clip does: one rounding in all
        ref, got = run_ort(canon, s)[0], run_ort(q, s)[0]
        assert np.abs(ref - got).max() <= 1.5 * scale + 0.05 * np.abs(ref).max()


def test_qnn_shared_producer_keeps_its_own_range():
    samples = [{"x": np.random.default_rng(i).normal(0, 3, (1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    _, q, _ = _quantize(_conv_relu6(shared=True), "qnn", samples)
    s_c, z_c = _act_qparams(q, "c")
    assert z_c > 0, "the Conv output also feeds an Add, so its negative values must survive"
    assert (s_c, z_c) != _act_qparams(q, "y")


def test_qnn_int32_bias_does_not_saturate_on_a_dead_channel():
    samples = [{"x": np.random.default_rng(i).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    canon, q, result = _quantize(_conv_relu6(shared=False, dead_channel=True), "qnn", samples)
    prod = _producers(q)
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    bias_q = _const(q, prod[conv.input[2]].input[0])
    assert np.abs(bias_q.astype(np.int64)).max() <= 2**30
    assert result.notes["bias_widened_channels"] == 1
    # the channel's output is its bias (1.5), not the clipped 2**31 * s_x * s_w
    got = run_ort(q, samples[0])[0][0, 2]
    np.testing.assert_allclose(got, 1.5, atol=2 * _act_qparams(q, "y")[0])


def test_ort_cpu_quantizes_conv_outputs_for_integer_kernels():
    """ort-cpu: DQ -> Conv -> Q groups (ORT fuses them into QLinearConv); transformer MatMul outputs stay float."""
    _, q, _ = _quantize(make_cnn(), "ort-cpu", _cnn_samples())
    prod = _producers(q)
    consumers = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    for conv in [n for n in q.graph.node if n.op_type == "Conv"]:
        out = conv.output[0]
        assert consumers[out] == ["QuantizeLinear"], "the Conv output feeds only its QuantizeLinear"
        assert _const(q, prod[conv.input[2]].input[0]).dtype == np.int32
    conv1 = next(n for n in q.graph.node if n.name == "conv1")
    quant = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv1.output[0])
    assert int(_const(q, quant.input[2])) == 0, "Conv -> Relu: the output takes the Relu's [0, max] range"
    _, qt, _ = _quantize(make_transformer_block(), "ort-cpu",
                         [{"x": np.random.default_rng(i).normal(size=(1, 16, 32)).astype(np.float32)}
                          for i in range(2)])
    quantized = {n.input[0] for n in qt.graph.node if n.op_type == "QuantizeLinear"}
    assert "y" not in quantized
    residual2 = next(n for n in qt.graph.node if n.name == "residual2")
    assert "res" in residual2.input, "the residual Add reads the float stream, not its quantized copy"
    assert {"h", "ctx", "f1r"} <= quantized


def _linear_bottleneck() -> onnx.ModelProto:
    """Two MobileNetV2/EfficientNet-style residual blocks: c1 = conv1(x); a = c1 + conv3(relu(conv2(c1)));
    b = a + conv5(relu(conv4(a))); y = conv6(b). The first Add's output feeds a Conv and the next Add."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    c = 8
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
             for name, shape in (("w1", (c, 3, 3, 3)), ("w2", (c, c, 1, 1)), ("w3", (c, c, 1, 1)),
                                 ("w4", (c, c, 1, 1)), ("w5", (c, c, 1, 1)), ("w6", (4, c, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
             helper.make_node("Add", ["c3", "c1"], ["a"], name="residual"),
             helper.make_node("Conv", ["a", "w4"], ["c4"], name="conv4"),
             helper.make_node("Relu", ["c4"], ["r4"], name="relu4"),
             helper.make_node("Conv", ["r4", "w5"], ["c5"], name="conv5"),
             helper.make_node("Add", ["c5", "a"], ["b"], name="residual2"),
             helper.make_node("Conv", ["b", "w6"], ["y"], name="conv6")]
    graph = helper.make_graph(nodes, "bottleneck",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_ort_cpu_quantizes_a_cnn_residual_add_for_qlinearadd(tmp_path):
    """ort-cpu: an Add joining two quantized Conv outputs reads their DQs and feeds only its own Q, so ONNX Runtime
    runs QLinearAdd; with float consumers left on its output it would run as a float Add between DQ and Q."""
    import onnxruntime as ort

    model = _linear_bottleneck()
    _, q, _ = _quantize(model, "ort-cpu", _cnn_samples())
    prod = _producers(q)
    for name in ("residual", "residual2"):
        add = next(n for n in q.graph.node if n.name == name)
        assert [prod[i].op_type for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]
        assert [n.op_type for n in q.graph.node if add.output[0] in n.input] == ["QuantizeLinear"]

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(q.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearAdd") == 2 and "Add" not in fused

    held_out = [{"x": np.random.default_rng(100 + i).normal(size=(1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    for feed in held_out:
        ref, got = run_ort(model, feed)[0], run_ort(q, feed)[0]
        assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 25.0


def _stem_and_body(layers: int = 10, batch: int | str = 1) -> onnx.ModelProto:
    """x [N, 3, 16, 16] -> stem Conv 3->32 (under 1% of the multiply-accumulates) -> `layers` Conv 32->32 + Relu."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (32, 3, 3, 3)).astype(np.float32), "w_stem")]
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["h0"], name="stem", pads=[1, 1, 1, 1])]
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.06, (32, 32, 3, 3)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [f"h{i}", f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"h{i + 1}"], name=f"relu{i}")]
    graph = helper.make_graph(nodes, "stem_body",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, [batch, 32, 16, 16])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _stem_samples(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-2, 2, (1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def test_a_small_stem_reading_the_network_input_stays_float():
    for batch in (1, "N"):  # symbolic dims: the shares come from the shapes calibration saw
        model = _stem_and_body(batch=batch)
        _, q, result = _quantize(model, "ort-cpu", _stem_samples())
        stem = next(n for n in q.graph.node if n.name == "stem")
        assert stem.input[0] == "x" and stem.input[1] == "w_stem", "the stem reads the float input and weight"
        reason = next(s.reason for s in result.skipped if s.target == "Conv stem")
        assert "network input x" in reason and "0.9%" in reason and "float_input_layers" in reason
        prod = _producers(q)
        assert all(prod[n.input[0]].op_type == "DequantizeLinear" for n in q.graph.node
                   if n.op_type == "Conv" and n.name != "stem")
        for feed in _stem_samples(4, seed=1):
            ref, got = run_ort(model, feed)[0], run_ort(q, feed)[0]
            assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 20.0

    # a model of a few layers: its first layer is a fifth of it and stays quantized like the rest
    _, q_small, result_small = _quantize(_stem_and_body(layers=4), "ort-cpu", _stem_samples())
    assert not [s for s in result_small.skipped if "network input" in s.reason]
    stem = next(n for n in q_small.graph.node if n.name == "stem")
    assert _producers(q_small)[stem.input[0]].op_type == "DequantizeLinear"


def _conv_chain(layers: int = 6) -> onnx.ModelProto:
    """x [1, 16, 12, 12] -> Conv 16->16 x layers, each reading the previous Conv's output directly (no activation
    between them, like a bottleneck's project Conv feeding the next block), then Relu."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    inits, nodes = [], []
    prev = "x"
    for i in range(layers):
        w = rng.normal(0, 0.25, (16, 16, 1, 1)).astype(np.float32)
        w[:, :, 0, 0] *= np.exp(rng.normal(0, 1.0, (16, 1))).astype(np.float32)  # rows of very different ranges
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"))
        prev = f"c{i}"
    nodes.append(helper.make_node("Relu", [prev], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_layer_kept_float_on_ort_cpu_reads_the_float_value_so_onnxruntime_does_not_requantize_it():
    import onnxruntime as ort

    from edgeq.precision import PrecisionPlan

    model = _conv_chain()
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 16, 12, 12)).astype(np.float32)} for _ in range(8)]
    canon, _ = canonicalize(model)
    stats = calibrate(canon, samples)
    graph = to_graph(canon)
    plan = PrecisionPlan(float_nodes={"conv3"})
    make_pass("insert_qdq").run(graph, PassContext(profile=load_profile("ort-cpu"), stats=stats, precision=plan))
    q = to_model(graph, model)
    prod = _producers(q)
    conv3 = next(n for n in q.graph.node if n.name == "conv3")
    assert prod[conv3.input[0]].op_type == "Conv" and conv3.input[1] == "w3", "float layer reads float data and weight"
    assert prod[next(n for n in q.graph.node if n.name == "conv4").input[0]].op_type == "DequantizeLinear"

    def run(level):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = level
        return ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, samples[0])[0]

    # With DQ -> Conv(float weight) -> Q, ONNX Runtime's WeightBiasQuantization quantized conv3's weight per tensor:
    # the optimised session then differed from the Q/DQ model's own numerics by ~4x its quantization error.
    exact, fused = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    ref = run_ort(model, samples[0])[0]
    err_exact = float(np.abs(exact - ref).mean())
    assert float(np.abs(fused - exact).mean()) < 0.25 * err_exact
