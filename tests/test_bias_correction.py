"""Bias correction (weights.bias_correction with weights.rounding: gptq): the mean output error of a quantized
weight on the calibration inputs is taken out of the layer's bias."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import init, run_ort
from edgeq import api
from edgeq.calibration.moments import LayerMoments, collect_moments
from edgeq.profiles import load_profile
from edgeq.quant_math import quantize_weight
from edgeq.rounding import bias_shift


def _mlp() -> onnx.ModelProto:
    """x -> MatMul -> Add(b1) -> Relu -> MatMul -> Add(b2) -> y; inputs far from zero mean."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
         helper.make_node("Relu", ["hb"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
         helper.make_node("Add", ["b2", "o"], ["y"], name="fc2_bias")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16])],
        [init("w1", rng.normal(0, 0.2, (64, 32)).astype(np.float32)),
         init("b1", rng.normal(3.0, 0.1, 32).astype(np.float32)),
         init("w2", rng.normal(0, 0.2, (32, 16)).astype(np.float32)),
         init("b2", rng.normal(0, 0.1, (1, 16)).astype(np.float32))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _conv() -> onnx.ModelProto:
    """A Conv without a bias input on inputs with a large mean."""
    rng = np.random.default_rng(1)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
        [init("w", rng.normal(0, 0.2, (6, 8, 3, 3)).astype(np.float32))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _feeds(shape, n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(1.5, 2.5, size=shape).astype(np.float32)} for _ in range(n)]


def _quantize(tmp_path, model, target, calib, *, correct: bool, name: str):
    src, out = tmp_path / f"{name}_src.onnx", tmp_path / f"{name}.onnx"
    onnx.save(model, str(src))
    profile = load_profile(target)
    # graph passes (SmoothQuant rescales weights) off: the weights compared below are the model's own
    profile = dataclasses.replace(profile, passes=(),
                                  weights=dataclasses.replace(profile.weights, bias_correction=correct))
    result = api.quantize(src, target=profile, calib=calib, output=out, check=False)
    return onnx.load(str(out)), result.report


def _mean_abs_error(q, model, feeds):
    """Mean over channels of |mean error| of the output (channels on axis 1, all other axes averaged)."""
    errs = [run_ort(q, f)[0].astype(np.float64) - run_ort(model, f)[0] for f in feeds]
    err = np.stack(errs)  # (feeds, N, C, ...)
    axes = tuple(i for i in range(err.ndim) if i != 2)
    return float(np.abs(err.mean(axis=axes)).mean())


def test_bias_shift_is_the_mean_error_and_only_kept_when_it_helps():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.2, (24, 10)).astype(np.float32)  # MatMul weight [K, N]
    x = (1.5 + 0.1 * rng.normal(size=(400, 24))).astype(np.float64)
    held = x[200:]
    moments = LayerMoments("mm", "MatMul", (x.T @ x)[None], rows=400, holdout=(held.T @ held)[None],
                           holdout_rows=200, total=x.sum(0)[None], holdout_total=held.sum(0)[None])
    qw = quantize_weight(w, "int8", axis=1)
    shift = bias_shift(w, qw, op="MatMul", attrs={}, moments=moments)
    w_q = (qw.q.astype(np.float64) - qw.zero_point) * qw.scale.astype(np.float64)
    expected = x.mean(0) @ (w_q - w)
    np.testing.assert_allclose(shift, expected, rtol=1e-6, atol=1e-9)
    # after the correction the mean output error is zero on the calibration rows
    err = x @ (w_q - w) - shift
    assert np.abs(err.mean(0)).max() < 1e-9 and np.abs((x @ (w_q - w)).mean(0)).max() > 1e-3
    # zero-mean inputs: nothing to correct
    z = x - x.mean(0)
    zh = z[200:]
    zero = LayerMoments("mm", "MatMul", (z.T @ z)[None], rows=400, holdout=(zh.T @ zh)[None], holdout_rows=200,
                        total=np.zeros((1, 24)), holdout_total=np.zeros((1, 24)))
    assert bias_shift(w, qw, op="MatMul", attrs={}, moments=zero) is None
    # moments without the first moment (older callers): no correction
    assert bias_shift(w, qw, op="MatMul", attrs={}, moments=dataclasses.replace(moments, total=None)) is None


def test_moments_hold_the_exact_input_sums():
    model = _mlp()
    data = _feeds((16, 64), 3, seed=3)
    moments = collect_moments(model, data).get("fc1")
    xs = np.concatenate([d["x"] for d in data]).astype(np.float64)
    np.testing.assert_allclose(moments.total[0], xs.sum(0), rtol=1e-9)
    np.testing.assert_allclose(moments.holdout_total[0], data[1]["x"].astype(np.float64).sum(0), rtol=1e-9)


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_matmul_bias_add_absorbs_the_mean_error(tmp_path, target):
    model = _mlp()
    # 64 calibration rows for 64 inputs: too few for GPTQ's compensation (it needs more fitting rows than inputs),
    # so the weights are rounded to nearest and their mean error is the bias correction's alone to remove
    calib, held_out = _feeds((16, 64), 4, seed=4), _feeds((16, 64), 32, seed=5)
    plain, _ = _quantize(tmp_path, model, target, calib, correct=False, name="plain")
    fixed, report = _quantize(tmp_path, model, target, calib, correct=True, name="fixed")
    notes = next(p["notes"] for p in report["passes"] if p["name"] == "insert_qdq")
    assert notes["bias_corrected_layers"] == 2  # through the Adds, whichever input the bias is
    fc2_bias = next(n for n in fixed.graph.node if n.name == "fc2_bias")
    assert fc2_bias.input[0] == "b2/bias_corrected"
    add = next(n for n in fixed.graph.node if n.name == "fc1_bias")
    inits = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    assert add.input[1] == "b1/bias_corrected" and "b1" not in inits
    # the shift is the quantized weight's mean error on the calibration inputs
    dq = next(n for n in fixed.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w1/quantized")
    w_q = inits[dq.input[0]].astype(np.float64) * inits[dq.input[1]]
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    mean_x = np.concatenate([f["x"] for f in calib]).astype(np.float64).mean(0)
    b1 = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    np.testing.assert_allclose(inits["b1/bias_corrected"], b1 - mean_x @ (w_q - w), rtol=0, atol=1e-5)
    assert inits["b2/bias_corrected"].shape == (1, 16)
    # on held-out inputs the output's mean error is much smaller
    assert _mean_abs_error(fixed, model, held_out) < 0.5 * _mean_abs_error(plain, model, held_out)


@pytest.mark.parametrize("target, bias_dtype", [("ort-cpu", np.int32), ("tensorrt", np.float32)])
def test_conv_without_bias_gets_one(tmp_path, target, bias_dtype):
    model = _conv()
    calib, held_out = _feeds((1, 8, 8, 8), 2, seed=6), _feeds((1, 8, 8, 8), 32, seed=7)  # 128 rows, K = 72
    plain, _ = _quantize(tmp_path, model, target, calib, correct=False, name="plain")
    fixed, _ = _quantize(tmp_path, model, target, calib, correct=True, name="fixed")
    assert len(next(n for n in plain.graph.node if n.op_type == "Conv").input) == 2
    conv = next(n for n in fixed.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3
    inits = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    producer = {o: n for n in fixed.graph.node for o in n.output}
    if bias_dtype == np.int32:  # ort-cpu: an int32 bias behind DequantizeLinear, so QLinearConv still fuses
        dq = producer[conv.input[2]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int32
    else:
        assert conv.input[2] in inits and inits[conv.input[2]].dtype == np.float32
    assert _mean_abs_error(fixed, model, held_out) < 0.5 * _mean_abs_error(plain, model, held_out)


def test_a_matmul_without_a_bias_is_left_alone(tmp_path):
    model = _mlp()
    g = model.graph
    fc2_bias = next(n for n in g.node if n.name == "fc2_bias")
    g.node.remove(fc2_bias)
    g.output[0].name = "o"
    g.initializer.remove(next(t for t in g.initializer if t.name == "b2"))
    fixed, report = _quantize(tmp_path, model, "ort-cpu", _feeds((16, 64), 8, seed=4), correct=True, name="fixed")
    notes = next(p["notes"] for p in report["passes"] if p["name"] == "insert_qdq")
    assert notes["bias_corrected_layers"] == 1
    assert [n.op_type for n in fixed.graph.node if n.output[0] == "o"] == ["MatMul"]


@pytest.mark.parametrize("alpha, beta, with_c", [(1.0, 1.0, True), (0.5, 2.0, True), (0.5, 2.0, False)])
def test_gemm_alpha_and_beta_scale_the_correction(tmp_path, alpha, beta, with_c):
    rng = np.random.default_rng(8)
    w = rng.normal(0, 0.2, (64, 24)).astype(np.float32)
    inits = [init("w", w)] + ([init("c", rng.normal(0, 0.1, 24).astype(np.float32))] if with_c else [])
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"] if with_c else ["x", "w"], ["y"], name="fc", alpha=alpha,
                          beta=beta)],
        "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 24])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    calib, held_out = _feeds((16, 64), 4, seed=9), _feeds((16, 64), 32, seed=10)
    plain, _ = _quantize(tmp_path, model, "tensorrt", calib, correct=False, name="plain")
    fixed, _ = _quantize(tmp_path, model, "tensorrt", calib, correct=True, name="fixed")
    assert len(next(n for n in fixed.graph.node if n.op_type == "Gemm").input) == 3
    assert _mean_abs_error(fixed, model, held_out) < 0.5 * _mean_abs_error(plain, model, held_out)
