"""Error-compensating weight rounding (weights.rounding: gptq): input moments, the rounding itself, end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import init, make_cnn, make_transformer_block, run_ort
from edgeq.calibration.moments import collect_moments, conv_rows
from edgeq.errors import ProfileError
from edgeq.profiles import load_profile
from edgeq.quant_math import quantize_weight
from edgeq.rounding import gptq_round


def _conv_model(x_shape, w, **attrs) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], "c",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init("w", w)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("x_shape, w_shape, attrs", [
    ((2, 4, 9, 7), (6, 4, 3, 3), {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ((1, 6, 8, 8), (6, 1, 5, 5), {"group": 6, "dilations": [2, 1], "pads": [2, 2, 2, 2]}),
    ((1, 4, 10, 10), (8, 2, 3, 3), {"group": 2, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((2, 3, 20), (5, 3, 3), {"pads": [1, 1], "strides": [2]}),  # 1-D (Whisper's encoder stem)
])
def test_conv_rows_reproduce_onnx_runtime_conv(x_shape, w_shape, attrs):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    expected = run_ort(_conv_model(x_shape, w, **attrs), {"x": x})[0]
    rows = conv_rows(x, attrs, w_shape)  # (groups, N*positions, K)
    groups = attrs.get("group", 1)
    per_group = w.reshape(groups, w_shape[0] // groups, -1)
    out = np.matmul(rows, per_group.transpose(0, 2, 1))  # (groups, N*P, O/g)
    n, positions = x_shape[0], rows.shape[1] // x_shape[0]
    out = out.reshape(groups, n, positions, -1).transpose(1, 0, 3, 2).reshape(n, w_shape[0], positions)
    np.testing.assert_allclose(out, expected.reshape(n, w_shape[0], -1), rtol=1e-4, atol=1e-4)


def test_moments_are_the_exact_second_moments_of_the_layer_inputs():
    model = make_transformer_block()
    rng = np.random.default_rng(1)
    data = [{"x": rng.normal(size=(1, 16, 32)).astype(np.float32)} for _ in range(3)]
    moments = collect_moments(model, data)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("f1r", TensorProto.FLOAT, None))
    xs = np.concatenate([run_ort(probe, d)[1].reshape(-1, 64) for d in data])
    fc2 = moments.get("fc2")
    assert fc2 is not None and fc2.rows == 48 and fc2.matrix.shape == (1, 64, 64)
    np.testing.assert_allclose(fc2.matrix[0], xs.T.astype(np.float64) @ xs, rtol=1e-5, atol=1e-4)
    held = xs[16:32].astype(np.float64)  # every second sample (here sample 1) is held out
    assert fc2.holdout_rows == 16
    np.testing.assert_allclose(fc2.holdout[0], held.T @ held, rtol=1e-5, atol=1e-4)
    # the attention MatMuls have no constant weight: not measured
    assert moments.get("scores") is None and moments.get("attn_v") is None
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"} <= set(moments.layers)


def test_shared_and_oversized_weights_are_skipped_with_a_reason():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    big = rng.normal(size=(16, 4)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
         helper.make_node("MatMul", ["a", "w"], ["b"], name="second"),
         helper.make_node("Concat", ["b", "b"], ["c"], name="cat", axis=-1),
         helper.make_node("MatMul", ["c", "big"], ["y"], name="wide")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init("w", w), init("big", big)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    moments = collect_moments(model, [{"x": rng.normal(size=(2, 8)).astype(np.float32)}], max_reduction=8)
    assert moments.layers == {}
    assert moments.skipped == {"first": "weight shared by several nodes", "second": "weight shared by several nodes",
                               "wide": "reduction length 16 > 8"}


def _moments(x: np.ndarray):
    """Moments of the rows of ``x`` as collect_moments keeps them, the second half held out."""
    from edgeq.calibration.moments import LayerMoments

    x = np.asarray(x, np.float64)
    held = x[len(x) // 2:]
    return LayerMoments("mm", "MatMul", (x.T @ x)[None], rows=len(x), holdout=(held.T @ held)[None],
                        holdout_rows=len(held))


def _correlated(rng, n, k):
    """Rows with strongly correlated features (like neighbouring pixels), where rounding jointly pays off."""
    base = rng.normal(size=(n, k)).cumsum(axis=1) / np.sqrt(np.arange(1, k + 1))
    return (base + 0.1 * rng.normal(size=(n, k))).astype(np.float32)


@pytest.mark.parametrize("dtype, block", [("int8", 0), ("int4", 16), ("uint8", 0)])
def test_gptq_round_lowers_the_output_error_on_held_out_inputs(dtype, block):
    rng = np.random.default_rng(3)
    k, n_out = 64, 48
    w = rng.normal(size=(k, n_out)).astype(np.float32)  # MatMul weight [K, N]
    calib, held_out = _correlated(rng, 4096, k), _correlated(rng, 4096, k)
    moments = _moments(calib)
    axis = 0 if block else 1
    nearest = quantize_weight(w, dtype, symmetric=dtype != "uint8", axis=axis, block_size=block)
    rounded, ratio = gptq_round(w, nearest, op="MatMul", attrs={}, moments=moments)
    # same scales and zero points, only the integers change, and they stay in range
    np.testing.assert_array_equal(rounded.scale, nearest.scale)
    np.testing.assert_array_equal(rounded.zero_point, nearest.zero_point)
    assert rounded.q.dtype == nearest.q.dtype and not np.array_equal(rounded.q, nearest.q)
    lo, hi = {"int8": (-128, 127), "int4": (-8, 7), "uint8": (0, 255)}[dtype]
    assert rounded.q.min() >= lo and rounded.q.max() <= hi

    def err(qw):
        return float(np.sum((held_out @ (qw.dequantize() - w)) ** 2))

    assert 0 < ratio < 0.6
    assert err(rounded) < 0.6 * err(nearest)


def test_dead_inputs_keep_their_weights():
    """An input never active in calibration (a dead ReLU channel) must not have its weights zeroed."""
    rng = np.random.default_rng(4)
    k = 16
    w = rng.normal(size=(k, 8)).astype(np.float32)
    x = _correlated(rng, 512, k)
    x[:, 3] = 0.0
    moments = _moments(x)
    nearest = quantize_weight(w, "int8", axis=1)
    rounded, _ = gptq_round(w, nearest, op="MatMul", attrs={}, moments=moments)
    np.testing.assert_array_equal(rounded.q[3], nearest.q[3])


def test_profile_rejects_an_unknown_rounding(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nextends: tensorrt\nweights:\n  rounding: stochastic\n")
    with pytest.raises(ProfileError, match="rounding"):
        load_profile(p)


def _smooth_images(rng, n):
    x = rng.normal(size=(n, 3, 8, 8)).cumsum(axis=2).cumsum(axis=3) / 4.0
    return x.astype(np.float32)


def test_quantize_with_gptq_rounding_same_graph_better_output(tmp_path):
    from edgeq.api import quantize

    rng = np.random.default_rng(5)
    model = tmp_path / "cnn.onnx"
    onnx.save(make_cnn(), str(model))
    calib, ev = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=_smooth_images(rng, 32))
    held_out = _smooth_images(rng, 32)
    np.savez(ev, x=held_out)
    # weight-only placement, so that the comparison sees the weight rounding alone
    base, profile = tmp_path / "w8.yaml", tmp_path / "gptq.yaml"
    base.write_text("name: w8\nextends: tensorrt\nplacement:\n  mode: weights\nweights:\n  rounding: nearest\n")
    profile.write_text(f"name: w8-gptq\nextends: {base}\nweights:\n  rounding: gptq\n")
    plain = quantize(model, target=base, calib=calib, output=tmp_path / "plain.onnx")
    gptq = quantize(model, target=profile, calib=calib, output=tmp_path / "gptq.onnx")
    assert "input_moments_s" in gptq.report["timings"] and "input_moments_s" not in plain.report["timings"]
    notes = next(p["notes"] for p in gptq.report["passes"] if p["name"] == "insert_qdq")
    assert notes["gptq_rounded_weights"] == 3 and notes["gptq_median_error_ratio"] < 1.0

    a, b = onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "gptq.onnx")
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    scales = lambda m: {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer  # noqa: E731
                        if i.name.endswith("/scale")}
    sa, sb = scales(a), scales(b)
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)

    ref = np.concatenate([run_ort(model, {"x": x[None]})[0] for x in held_out])

    def sqnr(path):
        out = np.concatenate([run_ort(path, {"x": x[None]})[0] for x in held_out])
        return 10 * np.log10(np.sum(ref ** 2) / np.sum((out - ref) ** 2))

    assert sqnr(tmp_path / "gptq.onnx") > sqnr(tmp_path / "plain.onnx") + 3.0


def test_block_scale_search_weights_the_error_by_input_energy():
    from edgeq.rounding import search_block_scales

    rng = np.random.default_rng(6)
    k, n_out, block = 64, 32, 16
    w = rng.standard_t(3, size=(k, n_out)).astype(np.float32)  # heavy tails: full-range scales waste levels
    x = rng.normal(size=(2048, k)) * rng.uniform(0.1, 3.0, k)  # some inputs carry far more energy
    moments = _moments(x)
    nearest = quantize_weight(w, "int4", axis=0, block_size=block)
    searched = search_block_scales(w, nearest, op="MatMul", attrs={}, moments=moments)
    assert searched.scale.shape == nearest.scale.shape and np.all(searched.scale <= nearest.scale + 1e-12)
    assert np.any(searched.scale < nearest.scale) and searched.q.min() >= -8 and searched.q.max() <= 7

    def err(qw):
        return float(np.sum((x @ (qw.dequantize() - w)) ** 2))

    assert err(searched) < 0.9 * err(nearest)
    # per-channel (not blockwise) and asymmetric weights are left alone
    per_channel = quantize_weight(w, "int8", axis=1)
    assert search_block_scales(w, per_channel, op="MatMul", attrs={}, moments=moments) is per_channel


def test_too_few_calibration_rows_keep_nearest_rounding():
    from edgeq.calibration.moments import LayerMoments

    rng = np.random.default_rng(7)
    k = 64
    w = rng.normal(size=(k, 16)).astype(np.float32)
    x = _correlated(rng, k // 2, k)  # 32 rows for 64 inputs: H is singular
    moments = _moments(x)
    nearest = quantize_weight(w, "int8", axis=1)
    rounded, ratio = gptq_round(w, nearest, op="MatMul", attrs={}, moments=moments)
    assert rounded is nearest and ratio == 1.0


def test_a_rounding_that_does_not_generalise_to_held_out_samples_is_rejected():
    """Fitted where pairs of inputs always agree, the compensation moves error into the twin input; on held-out
    samples where the twins disagree that doubles the error, so nearest rounding is kept."""
    from edgeq.calibration.moments import LayerMoments

    rng = np.random.default_rng(8)
    k = 32
    w = rng.normal(size=(k, 16)).astype(np.float32)
    base = rng.normal(size=(2048, k // 2))
    fit = np.repeat(base, 2, axis=1)  # x[2i] == x[2i + 1]
    held = np.repeat(base, 2, axis=1) * np.tile([1.0, -1.0], k // 2)  # x[2i] == -x[2i + 1]
    both = np.concatenate([fit, held])
    moments = LayerMoments("mm", "MatMul", (both.T @ both)[None], rows=len(both), holdout=(held.T @ held)[None],
                           holdout_rows=len(held))
    nearest = quantize_weight(w, "int8", axis=1)
    rounded, ratio = gptq_round(w, nearest, op="MatMul", attrs={}, moments=moments)
    assert rounded is nearest and ratio == 1.0
    # the same fit checked on samples like it is kept
    same = LayerMoments("mm", "MatMul", 2 * (fit.T @ fit)[None], rows=2 * len(fit), holdout=(fit.T @ fit)[None],
                        holdout_rows=len(fit))
    assert gptq_round(w, nearest, op="MatMul", attrs={}, moments=same)[1] < 0.8
