"""to_fp16: float16 compute with float32 islands, casts only at the boundaries, validated in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import init, make_cnn, make_transformer_block, run_ort
from edgeq.api import canonicalize
from edgeq.calibration.calibrate import calibrate
from edgeq.errors import ProfileError
from edgeq.ir import to_graph, to_model
from edgeq.pass_base import PassContext, make_pass
from edgeq.profiles import load_profile

F16 = TensorProto.FLOAT16


def _apply(model: onnx.ModelProto, samples, **opts):
    model, _ = canonicalize(model)
    stats = calibrate(model, samples) if samples is not None else None
    graph = to_graph(model)
    result = make_pass("to_fp16", opts).run(graph, PassContext(profile=load_profile("tensorrt-fp16"), stats=stats))
    out = to_model(graph, model)
    onnx.checker.check_model(out)
    return out, result


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    out = {v.name: v.type.tensor_type.elem_type for v in vis}
    out.update({i.name: i.data_type for i in inferred.graph.initializer})
    return out


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _samples(n=4, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.normal(size=(1, 16, 32)) * scale).astype(np.float32)} for _ in range(n)]


def test_a_transformer_block_computes_in_float16_with_its_layernorm_in_float32():
    model = make_transformer_block()
    out, result = _apply(model, _samples())
    types = _types(out)
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 8 and all(types[n.input[0]] == F16 and types[n.input[1]] == F16 for n in matmuls)
    ln = _node(out, "ln")
    assert types[ln.input[0]] == TensorProto.FLOAT and types[ln.output[0]] == TensorProto.FLOAT
    assert [s.target for s in result.skipped] == ["LayerNormalization ln"]
    assert "keep_ops" in result.skipped[0].reason
    # graph inputs and outputs keep float32; one Cast in (LayerNorm's output is read by three MatMuls: one Cast),
    # one for x into the residual, one out
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert sorted(n.input[0] for n in casts) == ["h", "x", "y/fp16"]
    for feed in _samples(3, seed=1):
        ref, got = run_ort(model, feed)[0], run_ort(out, feed)[0]
        # float16 storage: relative error ~1e-3 per value, a few roundings deep
        np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)
        assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 45


def _overflowing_model() -> onnx.ModelProto:
    """y = (x * 1e5) / 1e5 + x: the intermediate exceeds float16's range on ordinary inputs."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["up"], name="scale_up"),
             helper.make_node("Div", ["up", "big"], ["down"], name="scale_down"),
             helper.make_node("Add", ["down", "x"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])],
                              [init("big", np.array(1e5, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_tensor_beyond_float16_range_on_calibration_data_keeps_its_nodes_in_float32():
    model = _overflowing_model()
    out, result = _apply(model, _samples())
    reasons = {s.target: s.reason for s in result.skipped}
    # the Mul's constant 1e5 is beyond 65504 itself; the Div reads 'up', calibrated near 4e5
    assert "beyond float16" in reasons["Mul scale_up"] and "up reaches" in reasons["Div scale_down"]
    assert "Add add" not in reasons and result.rewrites == 1
    feed = _samples(1, seed=2)[0]
    got = run_ort(out, feed)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, run_ort(model, feed)[0], rtol=2e-3, atol=2e-3)


def test_without_statistics_the_range_rule_cannot_apply_and_a_note_says_so():
    out, result = _apply(make_transformer_block(), None)
    assert "no calibration statistics" in result.notes["ranges"] and result.rewrites > 0


def test_max_abs_option_lowers_the_limit():
    _, loose = _apply(make_transformer_block(), _samples(scale=4.0))
    _, tight = _apply(make_transformer_block(), _samples(scale=4.0), max_abs=1.0)
    assert tight.rewrites < loose.rewrites
    assert any("max_abs 1" in s.reason for s in tight.skipped)
    with pytest.raises(ProfileError, match="max_abs"):
        make_pass("to_fp16", {"max_abs": 1e6})


def test_infinite_mask_constants_convert_but_huge_finite_ones_stay_float32():
    model = make_transformer_block(mask=True)  # the mask constant is finfo(float32).min, which is -inf in float16
    feeds = [dict(s, mask=(np.arange(16) < 9).astype(np.int64)[None]) for s in _samples()]
    out, result = _apply(model, feeds)
    reasons = {s.target: s.reason for s in result.skipped}
    assert "beyond float16" in reasons["Mul mask_scale"]
    got = run_ort(out, feeds[0])[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, run_ort(model, feeds[0])[0], rtol=2e-2, atol=2e-2)
    inf_model = make_transformer_block(mask=True)
    for i in inf_model.graph.initializer:
        if i.name == "neg":
            i.CopyFrom(init("neg", np.array(-np.inf, np.float32)))
    _, inf_result = _apply(inf_model, None)
    assert "Mul mask_scale" not in {s.target for s in inf_result.skipped}


def test_inputs_whose_type_the_schema_fixes_are_left_alone():
    """Resize's scales are tensor(float) whatever X is; Cast's output type comes from its attribute."""
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="nearest"),
             helper.make_node("Cast", ["r"], ["c"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [init("scales", np.array([1, 1, 2, 2], np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rng = np.random.default_rng(0)
    out, result = _apply(model, [{"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)}])
    types = _types(out)
    resize = _node(out, "resize")
    assert types[resize.input[0]] == F16 and types[resize.input[2]] == TensorProto.FLOAT
    assert _node(out, "cast").attribute[0].i == TensorProto.FLOAT and result.rewrites == 2
    feed = {"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(model, feed)[0], rtol=1e-3, atol=1e-3)


def test_int8_layers_keep_dequantize_next_to_their_compute_and_the_rest_goes_float16(tmp_path):
    """A profile extending tensorrt with post_passes: [to_fp16] — TensorRT fuses DQ -> Conv only without a Cast."""
    import edgeq.api

    rng = np.random.default_rng(0)
    cnn = make_cnn()
    onnx.save(cnn, str(tmp_path / "cnn.onnx"))
    (tmp_path / "mixed.yaml").write_text("extends: tensorrt\nname: tensorrt-int8-fp16\n"
                                         "post_passes:\n  - name: to_fp16\n")
    shape = [d.dim_value or 1 for d in cnn.graph.input[0].type.tensor_type.shape.dim]
    np.savez(tmp_path / "c.npz", **{cnn.graph.input[0].name: rng.normal(size=[8] + shape[1:]).astype(np.float32)})
    res = edgeq.api.quantize(tmp_path / "cnn.onnx", target=tmp_path / "mixed.yaml", calib=tmp_path / "c.npz",
                             eval_data=tmp_path / "c.npz", output=tmp_path / "q.onnx", latency_runs=0)
    q = onnx.load(str(tmp_path / "q.onnx"))
    producers = {o: n for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert convs and all(producers[n.input[0]].op_type == "DequantizeLinear" and
                         producers[n.input[1]].op_type == "DequantizeLinear" for n in convs)
    assert res.report["lint"]["errors"] == 0 and res.passed
    fp16 = next(p for p in res.report["passes"] if p["name"] == "to_fp16")
    assert fp16["notes"]["float16_nodes"] == 2, "the float ops between the int8 layers: Relu and the pooling"
    pool = next(n for n in q.graph.node if n.op_type == "GlobalAveragePool")
    assert _types(q)[pool.input[0]] == F16
    reasons = {s["target"]: s["reason"] for s in res.report["skipped"] if s["pass"] == "to_fp16"}
    assert reasons and all(r in ("feeds a QuantizeLinear", "reads a dequantized value") for r in reasons.values())


def test_coreml_keeps_the_islands_in_float32(tmp_path):
    pytest.importorskip("coremltools")
    from edgeq.backends import coreml

    model = make_transformer_block()
    out, _ = _apply(model, _samples())
    onnx.save(out, str(tmp_path / "b16.onnx"))
    pkg = tmp_path / "b16.mlpackage"
    coreml.compile_coreml(tmp_path / "b16.onnx", pkg)
    feed = _samples(1, seed=3)[0]
    got = coreml.reference_predict(pkg, feed)["y"]
    np.testing.assert_allclose(got, run_ort(model, feed)[0], rtol=3e-2, atol=3e-2)
    from edgeq.backends.coreml_verify import iter_ops, load_program

    ct = pytest.importorskip("coremltools")
    program = load_program(ct.models.MLModel(str(pkg), skip_model_load=True))
    dtypes = {}
    for fn in program.functions.values():
        for op in iter_ops(fn):
            dtypes.setdefault(op.op_type, set()).update(str(o.dtype.__name__) for o in op.outputs)
    assert dtypes["layer_norm"] == {"fp32"}, "the LayerNorm island stays float32 in the package"
    assert dtypes["matmul"] == {"fp16"} or dtypes.get("linear") == {"fp16"}


@pytest.mark.parametrize("target", ["tensorrt-fp16", "coreml-fp16"])
def test_float16_targets_quantize_nothing_and_convert_every_layer(tmp_path, target):
    import edgeq.api

    rng = np.random.default_rng(0)
    cnn = make_cnn()
    onnx.save(cnn, str(tmp_path / "cnn.onnx"))
    shape = [d.dim_value or 1 for d in cnn.graph.input[0].type.tensor_type.shape.dim]
    for name in ("c", "e"):
        np.savez(tmp_path / f"{name}.npz", **{cnn.graph.input[0].name: rng.normal(size=[8] + shape[1:])
                                              .astype(np.float32)})
    res = edgeq.api.quantize(tmp_path / "cnn.onnx", target=target, calib=tmp_path / "c.npz",
                             eval_data=tmp_path / "e.npz", output=tmp_path / "h.onnx", latency_runs=0)
    q = res.report["quantization"]
    assert q["quantize_nodes"] == q["dequantize_nodes"] == 0
    assert q["compute_ops_float16"] == q["compute_ops"] == 3
    assert res.passed and res.report["validation"]["outputs"][0]["sqnr_db"] > 40
    assert "timings" in res.report and "input_moments_s" not in res.report["timings"], "no GPTQ moments to measure"
    weights = [{i.data_type: 0 for i in m.graph.initializer} for m in (cnn, onnx.load(str(tmp_path / "h.onnx")))]
    for counts, m in zip(weights, (cnn, onnx.load(str(tmp_path / "h.onnx")))):
        for i in m.graph.initializer:
            counts[i.data_type] += int(np.prod(i.dims))
    assert weights[1].get(TensorProto.FLOAT16, 0) >= weights[0][TensorProto.FLOAT] - 64, "weights stored as float16"


def test_weight_only_int4_becomes_w4a16_with_float16_scales_and_no_cast_before_the_matmul(tmp_path):
    import edgeq.api

    model = make_transformer_block(dim=64)
    onnx.save(model, str(tmp_path / "b.onnx"))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(5).normal(size=(8, 16, 64)).astype(np.float32))
    (tmp_path / "w4a16.yaml").write_text("extends: tensorrt-int4\nname: w4a16\nweights: {block_size: 32}\n"
                                         "post_passes:\n  - name: to_fp16\n")
    kw = dict(calib=tmp_path / "c.npz", eval_data=tmp_path / "c.npz", latency_runs=0)
    w4a32 = edgeq.api.quantize(tmp_path / "b.onnx", target="tensorrt-int4", output=tmp_path / "a.onnx", **kw)
    w4a16 = edgeq.api.quantize(tmp_path / "b.onnx", target=tmp_path / "w4a16.yaml", output=tmp_path / "h.onnx", **kw)
    q = onnx.load(str(tmp_path / "h.onnx"))
    producers = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name: i for i in q.graph.initializer}
    weight_mm = [n for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in producers
                 and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert len(weight_mm) == 6
    for n in weight_mm:
        dq = producers[n.input[1]]
        assert inits[dq.input[0]].data_type == TensorProto.INT4 and inits[dq.input[1]].data_type == F16
        assert producers[n.input[0]].op_type != "DequantizeLinear"
    types = _types(q)
    assert all(types[n.input[0]] == F16 for n in weight_mm), "activations reach the int4 MatMuls in float16"
    ref = w4a32.report["validation"]["outputs"][0]
    got = w4a16.report["validation"]["outputs"][0]
    assert got["sqnr_db"] > ref["sqnr_db"] - 1.0 and w4a16.passed, (ref["sqnr_db"], got["sqnr_db"])


def test_fp16_overrides_mean_float16_and_keep_float_means_float32(tmp_path):
    """tensorrt + an fp16 override on the score scaling Mul: that node (only) runs in float16, without a to_fp16 pass
    in the profile; on tensorrt-fp16, --keep-float Softmax keeps it in float32."""
    import dataclasses

    import edgeq.api
    from edgeq.profiles import Override

    onnx.save(make_transformer_block(), str(tmp_path / "b.onnx"))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(5).normal(size=(8, 16, 32)).astype(np.float32))
    kw = dict(calib=tmp_path / "c.npz", eval_data=tmp_path / "c.npz", latency_runs=0)
    base = load_profile("tensorrt")
    half = dataclasses.replace(base, overrides=(Override(node="scale_scores", precision="fp16"),))
    res = edgeq.api.quantize(tmp_path / "b.onnx", target=half, output=tmp_path / "h.onnx", **kw)
    q = onnx.load(str(tmp_path / "h.onnx"))
    types = _types(q)
    mul = _node(q, "scale_scores")
    assert types[mul.input[0]] == F16 and types[mul.output[0]] == F16
    assert sum(1 for n in q.graph.node if n.op_type == "Cast") == 2, "one Cast in, one out"
    fp16 = next(p for p in res.report["passes"] if p["name"] == "to_fp16")
    assert fp16["notes"]["float16_nodes"] == 1 and res.passed
    fp = load_profile("tensorrt-fp16")
    kept = dataclasses.replace(fp, overrides=(Override(op_type="Softmax", precision="float"),))
    res = edgeq.api.quantize(tmp_path / "b.onnx", target=kept, output=tmp_path / "k.onnx", **kw)
    q = onnx.load(str(tmp_path / "k.onnx"))
    types = _types(q)
    assert types[_node(q, "softmax").output[0]] == TensorProto.FLOAT
    assert types[_node(q, "scores").output[0]] == F16 or types[_node(q, "fc1").output[0]] == F16
    assert any(s["target"] == "Softmax softmax" and "--keep-float" in s["reason"] for s in res.report["skipped"])
