"""smoothquant: activation outliers moved into weights; exact in float, better W8A8 fidelity, reasons for skips."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.calibration.calibrate import calibrate
from edgeq.ir import to_graph, to_model
from edgeq.metrics import sqnr_db
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import Override, PassSpec, load_profile

T, K, H = 16, 32, 64


def _block(seed=0, extra_nodes=(), relu_fc2=True):
    """LayerNorm (gamma with 3 outlier channels) -> Q/K/V MatMul+bias, and an MLP fc1 -> Relu -> fc2."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(K)
    gamma[[3, 11, 20]] = 40.0
    inits = {"gamma": gamma, "beta": rng.normal(size=K) * 0.1}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1)]
    outs = []
    for name in ("q", "k", "v", "fc1"):
        n = H if name == "fc1" else K
        inits[f"w_{name}"], inits[f"b_{name}"] = rng.normal(size=(K, n)) / np.sqrt(K), rng.normal(size=n) * 0.1
        nodes += [helper.make_node("MatMul", ["ln", f"w_{name}"], [f"{name}_mm"]),
                  helper.make_node("Add", [f"{name}_mm", f"b_{name}"], [name])]
        outs.append(name)
    inits["w_fc2"] = rng.normal(size=(H, K)) / np.sqrt(H)
    nodes += [helper.make_node("Relu" if relu_fc2 else "Identity", ["fc1"], ["act"]),
              helper.make_node("MatMul", ["act", "w_fc2"], ["fc2"]),
              helper.make_node("Concat", ["q", "k", "v", "fc2"], ["y"], axis=-1), *extra_nodes]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, 3 * K + K])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _data(n=8, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, T, K)).astype(np.float32)} for _ in range(n)]


def _stats(m):
    tensors = [n.input[0] for n in m.graph.node if n.op_type == "MatMul"]
    return calibrate(m, _data(), per_channel=tensors)


def _run(m, feeds):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def _smooth(m, profile=None, **opts):
    g = to_graph(m)
    res = make_pass("smoothquant", opts).run(g, PassContext(profile=profile, stats=_stats(m)))
    g.cleanup().toposort()
    return to_model(g, m), res


def test_layernorm_group_smoothed_jointly_and_exact():
    m = _block()
    out, res = _smooth(m)
    assert res.rewrites == 2  # the LayerNorm group (q, k, v, fc1) and fc2 (after Relu, via an inserted Mul)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Mul") == 1 and ops.count("MatMul") == 5
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert mul.input[0] == "act"
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    gamma = inits[ln.input[1]]
    assert gamma[3] < 40.0 / 2  # the outlier channel was divided by its smoothing factor
    # q, k, v and fc1 read one shared scaled LayerNorm output: one s for the group, applied to every weight's rows
    orig = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    ratios = [inits[n.input[1]][3] / orig[w][3] for n in out.graph.node if n.op_type == "MatMul"
              for w in [f"w_{n.output[0][:-3]}"] if w in {f"w_{k}" for k in ("q", "k", "v", "fc1")}]
    assert len(ratios) == 4 and np.allclose([r[0] for r in ratios], ratios[0][0]) and ratios[0][0] > 2
    feeds = _data(4, seed=7)
    ref = _run(m, feeds)
    np.testing.assert_allclose(_run(out, feeds), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_search_alpha_is_exact_and_records_choice():
    m = _block()
    out, res = _smooth(m, search_alpha=True)
    assert set(res.notes["alpha"]) == {"ln", "act"}
    assert res.notes["alpha"]["ln"] is not None  # outliers of 40x: smoothing must win on the proxy
    feeds = _data(2, seed=3)
    ref = _run(m, feeds)
    np.testing.assert_allclose(_run(out, feeds), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _quantized_sqnr(tmp_path, model, calib, feeds, profile, label):
    """Quantize ``model`` with ``profile`` on the ``calib`` feeds; the quantized model and its SQNR on ``feeds``."""
    from edgeq import api

    path = tmp_path / f"{label}_fp32.onnx"
    onnx.save(model, str(path))
    data = tmp_path / f"{label}_calib.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in calib]))
    out = tmp_path / f"{label}.onnx"
    report = api.quantize(path, target=profile, calib=str(data), output=out, check=False).report
    q = onnx.load(str(out))
    return q, report, sqnr_db(_run(model, feeds), _run(q, feeds))


def test_improves_int8_fidelity_end_to_end(tmp_path):
    base = load_profile("tensorrt")
    sqnr = {}
    for label, passes in (("plain", ()), ("smooth", (PassSpec(name="smoothquant"),))):
        _, report, sqnr[label] = _quantized_sqnr(tmp_path, _block(), _data(16), _data(8, seed=11),
                                                 dataclasses.replace(base, passes=passes), label)
        assert report["quantization"]["compute_ops_quantized"] == 5
    assert sqnr["smooth"] > sqnr["plain"] + 3.0, sqnr


def test_skips_nonconstant_weight_and_nonlinear_sharing():
    extra = [helper.make_node("Transpose", ["ln"], ["lnT"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["ln", "lnT"], ["gram"])]  # activation x activation: weight not constant
    m = _block(extra_nodes=extra)
    m.graph.output.append(helper.make_tensor_value_info("gram", TensorProto.FLOAT, None))
    out, res = _smooth(m, shared_inputs=False)
    reasons = " | ".join(s.reason for s in res.skipped)
    assert "Transpose" in reasons  # ln is shared with a non-linear consumer
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    assert ln.input[1] == "gamma"  # untouched
    feeds = _data(2)
    s0 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(s0.run(None, feeds[0]), s1.run(None, feeds[0])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)


def test_weights_only_profile_skips_everything():
    m = _block()
    out, res = _smooth(m, profile=load_profile("coreml"))
    assert res.rewrites == 0 and len(res.skipped) == 2
    assert all("does not quantize these activations" in s.reason for s in res.skipped)


def test_no_mul_inserted_when_disabled():
    out, res = _smooth(_block(), insert_mul=False)
    assert res.rewrites == 1 and "Mul" not in [n.op_type for n in out.graph.node]
    assert any("cannot absorb" in s.reason for s in res.skipped)


def test_bad_alpha_is_a_profile_error():
    from edgeq.errors import ProfileError

    with pytest.raises(ProfileError, match="alpha"):
        make_pass("smoothquant", {"alpha": 1.5})


def test_shared_input_smooths_only_the_linear_branch():
    """Post-LN style: ln is also read by a residual Add; q/k/v/fc1 read ln * (1/s) through one inserted Mul."""
    extra = [helper.make_node("Add", ["ln", "x"], ["resid"])]
    m = _block(extra_nodes=extra)
    m.graph.output.append(helper.make_tensor_value_info("resid", TensorProto.FLOAT, None))
    out, res = _smooth(m)
    assert res.rewrites == 2
    muls = [n for n in out.graph.node if n.op_type == "Mul"]
    ln_mul = next(n for n in muls if n.input[0] == "ln")
    assert sorted(n.op_type for n in out.graph.node if ln_mul.output[0] in n.input) == ["MatMul"] * 4
    assert next(n for n in out.graph.node if n.op_type == "Add" and "x" in n.input).input[0] == "ln"
    feeds = _data(2, seed=5)
    s0 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(s0.run(None, feeds[0]), s1.run(None, feeds[0])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_min_outlier_ratio_skips_groups_without_outliers():
    out, res = _smooth(_block(), min_outlier_ratio=8.0)
    # the LayerNorm output has 40x outlier channels; the Relu output feeding fc2 has none
    assert res.rewrites == 1 and res.notes["alpha"].keys() == {"ln"}
    assert any("no outlier channels" in s.reason for s in res.skipped)
    assert "Mul" not in [n.op_type for n in out.graph.node]


def test_search_measures_each_candidate_on_the_sampled_calibration_rows():
    from edgeq.passes.smoothquant import _layer_error

    m = _block()
    stats = _stats(m)
    rows = stats.tensors["ln"].rows
    assert rows is not None and rows.shape == (8 * T, K), "every row is kept while fewer than the sample size"
    g = to_graph(m)
    users = [n for n in g.nodes if n.op == "MatMul" and n.inputs[0].name == "ln"]
    profile = load_profile("tensorrt")
    seen = []

    def scales(channel_max, alpha):  # alpha 0.5 with unit weights: the 40x channels are scaled down
        seen.append(channel_max)
        return np.sqrt(channel_max)

    error = _layer_error(rows, users, profile, scales)
    assert error(0.5) < 0.5 * error(None), "outlier channels: smoothing halves the measured W8A8 error"
    # the scales come from every second row; the error is measured on the others
    np.testing.assert_array_equal(seen[0], np.abs(rows[0::2]).max(axis=0))
    assert _layer_error(rows, users, load_profile("tensorrt-fp8"), scales) is None  # not an integer format
    _, res = _smooth(m, profile=profile, search_alpha=True)
    assert res.notes["alpha"]["ln"] is not None


def test_search_picks_the_alpha_with_the_least_measured_error():
    from edgeq.passes.fold_channel_scale import input_channel_absmax, weight_of
    from edgeq.passes.smoothquant import ALPHA_GRID, SmoothQuantPass, _layer_error

    m = _block(seed=4)
    stats = _stats(m)
    profile = load_profile("ort-cpu")
    g = to_graph(m)
    users = [n for n in g.nodes if n.op == "MatMul" and n.inputs[0].name == "ln"]
    act = stats.tensors["ln"].channel_absmax.astype(np.float64)
    w_max = np.max([input_channel_absmax(u, weight_of(u)) for u in users], axis=0)
    sq = SmoothQuantPass(SmoothQuantPass.Options(search_alpha=True))
    error = _layer_error(stats.tensors["ln"].rows, users, profile, lambda a, al: sq._scales(a, w_max, al))
    errors = {None: error(None), **{a: error(a) for a in ALPHA_GRID}}
    _, res = _smooth(m, profile=profile, search_alpha=True)
    assert res.notes["alpha"]["ln"] == min(errors, key=errors.get)


def test_min_error_reduction_leaves_groups_whose_measured_gain_is_small():
    m = _block()
    _, res = _smooth(m, profile=load_profile("tensorrt"), search_alpha=True)
    gain = res.notes["error_reduction"]["ln"]
    assert gain > 2 and res.notes["alpha"]["ln"] is not None
    out, strict = _smooth(m, profile=load_profile("tensorrt"), search_alpha=True, min_error_reduction=gain * 1.01)
    assert strict.notes["alpha"]["ln"] is None
    assert any("falls only" in s.reason and "min_error_reduction" in s.reason for s in strict.skipped)
    feeds = _data(2, seed=3)
    np.testing.assert_allclose(_run(out, feeds), _run(m, feeds), rtol=1e-5, atol=1e-5)
    from edgeq.errors import ProfileError

    with pytest.raises(ProfileError, match="min_error_reduction"):
        make_pass("smoothquant", {"min_error_reduction": 0.5})


# -- Conv consumers: channels on axis 1 ----------------------------------------------------------------------------
C0, C1, C2, L = 4, 16, 8, 64


def _conv_stem(relu=False):
    """x [1, 4, 64] -> Conv1d(4->16, k3) -> GELU-like x*sigmoid(1.702x) (or Relu) -> Conv1d(16->8, k3).
    Three of conv1's output channels are 40x larger than the others and read by conv2 with 40x smaller weights (a
    trained net's large channels carry no more signal than the rest; Whisper's stem has one at 7x the median)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(C1, C0, 3)) / np.sqrt(3 * C0)
    w1[[2, 7, 13]] *= 40.0
    inits = {"w1": w1, "b1": rng.normal(size=C1) * 0.1, "w2": rng.normal(size=(C2, C1, 3)) / np.sqrt(3 * C1),
             "b2": rng.normal(size=C2) * 0.1, "k": np.array(1.702)}
    inits["w2"][:, [2, 7, 13]] /= 40.0  # conv2 reads the large channels with small weights: every channel matters
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1])]
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["act"], name="relu"))
    else:
        nodes += [helper.make_node("Mul", ["h", "k"], ["hk"]), helper.make_node("Sigmoid", ["hk"], ["sg"]),
                  helper.make_node("Mul", ["h", "sg"], ["act"], name="gelu")]
    nodes.append(helper.make_node("Conv", ["act", "w2", "b2"], ["y"], name="conv2", pads=[1, 1]))
    g = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C0, L])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C2, L])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _conv_data(n=8, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, C0, L)).astype(np.float32)} for _ in range(n)]


def _conv_smooth(m, profile, **opts):
    g = to_graph(m)
    stats = calibrate(m, _conv_data(), per_channel={"x": 1, "act": 1})
    res = make_pass("smoothquant", opts).run(g, PassContext(profile=profile, stats=stats))
    g.cleanup().toposort()
    return to_model(g, m), res


def test_observer_keeps_per_channel_ranges_along_the_conv_channel_axis():
    stats = calibrate(_conv_stem(), _conv_data(), per_channel={"act": 1, "x": -1})
    act, x = stats.get("act"), stats.get("x")
    assert act.channel_axis == 1 and act.channel_absmax.shape == (C1,)
    assert set(np.argsort(-act.channel_absmax)[:3]) == {2, 7, 13}
    assert act.rows.shape[1] == C1
    assert x.channel_absmax.shape == (L,)  # last axis, as for MatMul inputs


def test_conv_input_after_gelu_is_smoothed_through_an_inserted_mul_exactly():
    m = _conv_stem()
    out, res = _conv_smooth(m, load_profile("ort-cpu"), search_alpha=True, ops=("Conv",))
    assert res.rewrites == 1 and res.notes["alpha"]["act"] is not None
    assert res.notes["error_reduction"]["act"] > 1.5
    reason = next(s.reason for s in res.skipped if "conv1" in s.target)
    assert "graph input" in reason  # the stem reading the network input is left to the profile
    mul = next(n for n in out.graph.node if n.op_type == "Mul" and n.input[0] == "act")
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    inv = inits[mul.input[1]]
    assert inv.shape == (C1, 1), "channels on axis 1 of the [N, C, L] activation"
    assert inv[[2, 7, 13], 0].max() < np.delete(inv[:, 0], [2, 7, 13]).min()  # outlier channels divided most
    conv2 = next(n for n in out.graph.node if n.name == "conv2")
    assert conv2.input[0] == mul.output[0]
    w2 = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w2"))
    np.testing.assert_allclose(inits[conv2.input[1]] * inv.reshape(1, C1, 1), w2, rtol=1e-5)
    feeds = _conv_data(3, seed=7)
    ref = _run(m, feeds)
    np.testing.assert_allclose(_run(out, feeds), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_conv_smoothing_improves_ort_cpu_fidelity(tmp_path):
    base = load_profile("ort-cpu")
    spec = PassSpec(name="smoothquant", options={"search_alpha": True, "ops": ("Conv",)})
    sqnr = {}
    for label, passes in (("plain", ()), ("smooth", (spec,))):
        # conv1 in float, as Whisper's stem conv reading the network input is: its output is not requantized
        prof = dataclasses.replace(base, passes=passes, overrides=(Override(node="conv1", precision="float"),))
        q, _, sqnr[label] = _quantized_sqnr(tmp_path, _conv_stem(), _conv_data(16), _conv_data(8, seed=11), prof,
                                            label)
        conv2 = next(n for n in q.graph.node if n.name == "conv2")
        assert {n.op_type for n in q.graph.node if n.output[0] in conv2.input[:2]} == {"DequantizeLinear"}
    assert sqnr["smooth"] > sqnr["plain"] + 3.0, sqnr


def test_conv_input_whose_producer_output_is_quantized_is_left_alone():
    """ort-cpu quantizes every Conv output (QLinearConv): Conv -> Relu -> Mul -> Conv would round the activation
    twice, so the group is skipped with that reason."""
    out, res = _conv_smooth(_conv_stem(relu=True), load_profile("ort-cpu"), ops=("Conv",))
    assert res.rewrites == 0
    reason = next(s.reason for s in res.skipped if "conv2" in s.target)
    assert "round twice" in reason and "Conv conv1" in reason
    assert not any(n.op_type == "Mul" for n in out.graph.node)


def test_conv_after_conv_folds_into_the_producer_output_channels():
    m = _conv_stem(relu=True)
    m.graph.node.remove(next(n for n in m.graph.node if n.op_type == "Relu"))
    next(n for n in m.graph.node if n.name == "conv1").output[0] = "act"
    out, res = _conv_smooth(m, load_profile("ort-cpu"), ops=("Conv",))
    assert res.rewrites == 1 and not any(n.op_type == "Mul" for n in out.graph.node)
    feeds = _conv_data(3, seed=4)
    ref = _run(m, feeds)
    np.testing.assert_allclose(_run(out, feeds), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_ops_option_is_checked():
    from edgeq.errors import ProfileError

    with pytest.raises(ProfileError, match="ops must be among"):
        make_pass("smoothquant", {"ops": ("Conv", "Softmax")})


def test_only_the_inputs_it_can_smooth_are_calibrated_before_the_pass():
    """Under ort-cpu a Conv reading the network input or a quantized Conv output (through Relu) is skipped anyway,
    so its input is not calibrated before the pass; the GELU-fed Conv's input is."""
    p = make_pass("smoothquant", {"ops": ("Conv",)})
    prof = load_profile("ort-cpu")
    assert p.stats_tensors(_conv_stem(), prof) == ["act"]
    assert p.stats_tensors(_conv_stem(relu=True), prof) == []
    assert p.stats_tensors(_conv_stem(relu=True)) == ["act", "x"]  # no profile: every candidate


def test_search_rejects_scales_that_held_out_rows_overflow():
    """Channels that are tiny on half the calibration rows and 30x larger on the other half: scales fitted on the
    first half would clip the second, so the held-out measure finds no gain there, where fitting and measuring on
    the same rows reports one."""
    from edgeq.passes.fold_channel_scale import input_channel_absmax, weight_of
    from edgeq.passes.smoothquant import SmoothQuantPass, _layer_error

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(256, K))
    rows[:, [3, 11]] *= 40.0  # steady outliers: smoothing them is right
    rows[0::2, 5:9] *= 0.02  # unsteady channels: small on the fitted rows, normal on the held-out ones
    m = _block()
    g = to_graph(m)
    users = [n for n in g.nodes if n.op == "MatMul" and n.inputs[0].name == "ln"]
    w_max = np.max([input_channel_absmax(u, weight_of(u)) for u in users], axis=0)
    sq = SmoothQuantPass(SmoothQuantPass.Options(search_alpha=True))
    held = _layer_error(rows, users, load_profile("ort-cpu"), lambda a, al: sq._scales(a, w_max, al))
    same = _layer_error(rows[0::2].repeat(2, axis=0), users, load_profile("ort-cpu"),
                        lambda a, al: sq._scales(a, w_max, al))
    assert same(0.8) < same(None), "measured on the rows it was fitted on, smoothing looks like a gain"
    assert held(0.8) > held(None), "on held-out rows the unsteady channels overflow their fitted scales"
