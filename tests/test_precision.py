"""Mixed precision plans (conversion boundaries), sensitivity ranking and the automatic fallback."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq import api
from edgeq.calibration.calibrate import calibrate
from edgeq.precision import (FallbackOptions, PrecisionPlan, auto_fallback, name_all_nodes, plan_from_overrides,
                             quantize_with_plan)
from edgeq.profiles import Override, load_profile

D, LAYERS = 16, 10


def _chain(seed=0):
    """10 MatMul+Relu layers; the first reads an input whose channel 0 is ~1000x the others."""
    rng = np.random.default_rng(seed)
    nodes, inits, last = [], [], "x"
    for i in range(LAYERS):
        w = rng.normal(size=(D, D)) / np.sqrt(D)
        if i == 0:
            w[0] *= 1e-3  # the outlier channel barely matters to the output...
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        last = f"m{i}"
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Relu", [last], [f"r{i}"], name=f"relu{i}"))
            last = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                          [helper.make_tensor_value_info(last, TensorProto.FLOAT, [4, D])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _feeds(n, seed=1, outlier=True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(4, D)).astype(np.float32)
        x[:, 0] *= 1000.0 if outlier else 1.0  # ...but it sets the per-tensor scale of layer 0's input, crushing the other channels
        out.append({"x": x})
    return out


def _qdq_inputs(model, node_name):
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return [producers[t].op_type if t in producers else None for t in node.input]


# -- plans and boundaries ---------------------------------------------------------------------------------------
def test_float_node_keeps_its_inputs_float_and_others_quantized():
    m = _chain()
    stats = calibrate(m, _feeds(8))
    q = quantize_with_plan(m, load_profile("tensorrt"), stats, PrecisionPlan(float_nodes=frozenset({"mm3"})))
    assert _qdq_inputs(q, "mm3") == ["Relu", None]  # float activation and float (initializer) weight
    for name in ("mm2", "mm4"):
        assert _qdq_inputs(q, name) == ["DequantizeLinear", "DequantizeLinear"]


def test_whole_graph_boundaries_float_and_wide_nodes():
    """QNN (every tensor quantized): a float island's result is quantized again for its quantized consumer, and a
    wide node's output is 16-bit while its 8-bit neighbours stay 8-bit."""
    from edgeq.model_io import ensure_opset

    m = ensure_opset(_chain(), 21, why="16-bit activations")
    stats = calibrate(m, _feeds(8, outlier=False))
    plan = PrecisionPlan(float_nodes=frozenset({"mm3"}), wide_nodes=frozenset({"mm6"}))
    q = quantize_with_plan(m, load_profile("qnn"), stats, plan)
    producers = {o: n for n in q.graph.node for o in n.output}
    consumers = {}
    for n in q.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    # mm3 computes in float on float weights; its output m3 is quantized before the (quantized) Relu reads it
    assert _qdq_inputs(q, "mm3")[1] is None
    assert [c.op_type for c in consumers["m3"]] == ["QuantizeLinear"]
    relu3 = next(n for n in q.graph.node if n.name == "relu3")
    assert producers[relu3.input[0]].op_type == "DequantizeLinear"
    # the wide node's output is uint16, the neighbouring layers' outputs uint8
    qtype = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    inits = {i.name: i for i in q.graph.initializer}
    def zp_type(t):
        return inits[qtype[t].input[2]].data_type
    assert zp_type("m6") == TensorProto.UINT16
    assert zp_type("m5") == TensorProto.UINT8 and zp_type("m7") == TensorProto.UINT8
    # numerics: the wide output's own Q/DQ error is ~256x (48 dB) smaller than with 8 bits
    from edgeq.debug import compare_tensors
    # (relu6 kept float in the 8-bit baseline: otherwise m6 takes the Relu's range, as QNN fuses MatMul + Relu)
    q8 = quantize_with_plan(m, load_profile("qnn"), stats, PrecisionPlan(float_nodes=frozenset({"mm3", "relu6"})))
    pair = {"m6/dequantized": "m6"}
    e16 = compare_tensors(q, q, _feeds(2, seed=5, outlier=False), pair)["m6/dequantized"]
    e8 = compare_tensors(q8, q8, _feeds(2, seed=5, outlier=False), pair)["m6/dequantized"]
    assert e8.sqnr_db > 30 and e16.sqnr_db > e8.sqnr_db + 40


def test_plan_from_overrides_resolves_tensor_to_producer():
    prof = dataclasses.replace(load_profile("qnn"), overrides=(Override(tensor="m2", precision="float"),
                                                              Override(op_type="Relu", precision="int16")))
    plan = plan_from_overrides(prof, _chain())
    assert plan.float_nodes == {"mm2"}
    assert plan.wide_nodes == {f"relu{i}" for i in range(LAYERS - 1)}
    assert plan.with_float(["mm5"]).float_nodes == {"mm2", "mm5"}


# -- automatic fallback -----------------------------------------------------------------------------------------
def test_fallback_finds_the_sensitive_layer_and_records_the_curve():
    m = _chain()
    stats = calibrate(m, _feeds(8))
    res = auto_fallback(m, load_profile("tensorrt"), stats, _feeds(8, seed=2),
                        options=FallbackOptions(time_limit_s=60))
    assert not res.curve[0]["met"] and res.curve[0]["sqnr_db"] < 12
    assert res.met and res.plan.float_nodes == {"mm0"}
    assert res.ranking[0]["node"] == "mm0" and res.ranking[0]["gain"] > 10
    assert [p["float_layers"] for p in res.curve] == [0, 1] and res.curve[-1]["met"]
    assert res.best.cosine >= 0.98 and res.best.sqnr_db >= 12
    assert _qdq_inputs(res.model, "mm0")[0] != "DequantizeLinear"
    json.dumps(res.as_dict())


def test_fallback_respects_float_limit_and_time_limit():
    m = _chain()
    stats = calibrate(m, _feeds(8))
    res = auto_fallback(m, load_profile("tensorrt"), stats, _feeds(4, seed=2),
                        options=FallbackOptions(max_float_fraction=0.0))
    assert not res.met and res.plan.float_nodes == frozenset() and "no layer may be kept" in res.stopped
    res = auto_fallback(m, load_profile("tensorrt"), stats, _feeds(4, seed=2),
                        options=FallbackOptions(time_limit_s=1e-3))
    assert res.model is not None and res.stopped  # always returns the best model found


def test_fallback_task_metric_callable(tmp_path, monkeypatch):
    (tmp_path / "mymetric.py").write_text(
        "import numpy as np\n"
        "def neg_max_err(ref, cand):\n"
        "    return -max(float(np.abs(r[k] - c[k]).max()) for r, c in zip(ref, cand) for k in r)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = _chain()
    stats = calibrate(m, _feeds(8))
    res = auto_fallback(m, load_profile("tensorrt"), stats, _feeds(4, seed=2),
                        options=FallbackOptions(metric="mymetric:neg_max_err", min_metric=-0.01))
    assert res.baseline.metric < -0.01 and res.met and res.best.metric >= -0.01
    assert res.plan.float_nodes == {"mm0"}


def test_api_and_cli_fallback_use_calibration_data_only(tmp_path, monkeypatch):
    path = tmp_path / "chain.onnx"
    onnx.save(_chain(), str(path))
    calib, ev = tmp_path / "calib", tmp_path / "eval"
    for folder, feeds in ((calib, _feeds(8)), (ev, _feeds(4, seed=9))):
        folder.mkdir()
        for i, f in enumerate(feeds):
            np.savez(folder / f"{i:03d}.npz", **f)

    import edgeq.precision as precision
    seen = []
    real = precision.auto_fallback

    def spy(canonical, profile, stats, feeds, **kw):
        seen.extend(feeds)
        return real(canonical, profile, stats, feeds, **kw)

    monkeypatch.setattr(precision, "auto_fallback", spy)
    r = api.quantize(path, target="tensorrt", calib=str(calib), output=tmp_path / "q.onnx", eval_data=str(ev),
                     fallback=True, time_limit_s=60, latency_runs=0)
    calib_x = [f["x"] for f in _feeds(8)]
    assert seen and all(any(np.array_equal(f["x"], c) for c in calib_x) for f in seen)
    fb = r.report["fallback"]
    assert fb["float_nodes"] == ["mm0"] and fb["met"] and "calibration" in fb["data"]
    assert r.passed and r.report["quantization"]["compute_ops_quantized"] == LAYERS - 1
    json.dumps(r.report)

    from edgeq.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(path), "-t", "tensorrt", "--calib", str(calib), "-o", str(tmp_path / "q2.onnx"),
              "--auto-fallback", "--fallback-time-limit", "30", "--report", str(tmp_path / "r.json")])
    assert exc.value.code == 0
    assert json.loads((tmp_path / "r.json").read_text())["fallback"]["float_nodes"] == ["mm0"]


def test_fallback_options_are_checked():
    from edgeq.errors import EdgeqError

    with pytest.raises(EdgeqError, match="min_metric"):
        FallbackOptions(metric="m:f")
    with pytest.raises(EdgeqError):
        FallbackOptions(time_limit_s=0)


def test_name_all_nodes_is_stable():
    m = _chain()
    for n in m.graph.node:
        n.name = ""
    a, b = name_all_nodes(m), name_all_nodes(m)
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]
    assert len({n.name for n in a.graph.node}) == len(a.graph.node)


def test_whole_graph_target_widens_instead_of_floating():
    """On QNN the fallback keeps the chosen layers on the NPU with 16-bit activations (opset raised to 21)."""
    m = _chain()
    stats = calibrate(m, _feeds(8))
    res = auto_fallback(m, load_profile("qnn"), stats, _feeds(6, seed=2), options=FallbackOptions(time_limit_s=60))
    assert res.precision == "wide" and res.plan.float_nodes == frozenset()
    assert "mm0" in res.plan.wide_nodes and res.met
    assert res.candidates > LAYERS  # Relu outputs are candidates too on a whole-graph target
    assert next(o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert _qdq_inputs(res.model, "mm0")[0] == "DequantizeLinear"  # still quantized, now 16-bit
    d = res.as_dict()
    assert d["precision"] == "wide" and "mm0" in d["wide_nodes"]


def test_group_move_when_error_is_spread_over_alike_layers():
    """Every MatMul reads an input with one 30x channel: no single layer fixes the output, the group does."""
    rng = np.random.default_rng(3)
    nodes, inits, last = [], [], "x"
    boost = np.ones(D, np.float32)
    boost[0] = 30.0
    inits.append(numpy_helper.from_array(boost, "boost"))
    for i in range(6):
        w = (rng.normal(size=(D, D)) / np.sqrt(D)).astype(np.float32)
        w[0] /= 30.0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Mul", [last, "boost"], [f"b{i}"], name=f"boost{i}"),
                  helper.make_node("MatMul", [f"b{i}", f"w{i}"], [f"m{i}"], name=f"mm{i}")]
        last = f"m{i}"
    g = helper.make_graph(nodes, "spread", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                          [helper.make_tensor_value_info(last, TensorProto.FLOAT, [4, D])], inits)
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = _feeds(6, seed=4, outlier=False)
    stats = calibrate(m, feeds)
    res = auto_fallback(m, load_profile("tensorrt"), stats, feeds,
                        options=FallbackOptions(max_float_fraction=1.0, min_sqnr_db=40.0, time_limit_s=60))
    groups = [r for r in res.ranking if len(r["nodes"]) > 1]
    # mm0..mm4 feed a Mul (alike); mm5 feeds the graph output
    assert groups and groups[0]["nodes"] == [f"mm{i}" for i in range(5)] and groups[0]["node"] == "5 x MatMul -> Mul"
    assert res.ranking[0] is groups[0]  # the group gains more than any single layer
    assert res.curve[1]["added"] == groups[0]["node"] and res.curve[1]["kept"]
    assert res.curve[1]["sqnr_db"] > res.curve[0]["sqnr_db"] + 2
    assert {f"mm{i}" for i in range(5)} <= res.plan.float_nodes


def test_cli_fallback_task_metric(tmp_path, monkeypatch):
    from edgeq.cli import main

    (tmp_path / "negerr.py").write_text(
        "import numpy as np\n"
        "def score(ref, cand):\n"
        "    return -max(float(np.abs(r[k] - c[k]).max()) for r, c in zip(ref, cand) for k in r)\n")
    monkeypatch.chdir(tmp_path)
    onnx.save(_chain(), "chain.onnx")
    Path = type(tmp_path)
    Path("calib").mkdir()
    for i, f in enumerate(_feeds(8)):
        np.savez(f"calib/{i}.npz", **f)
    args = ["quantize", "chain.onnx", "-t", "tensorrt", "--calib", "calib", "-o", "q.onnx", "--report", "r.json"]
    with pytest.raises(SystemExit) as exc:
        main(args + ["--fallback-metric", "negerr.py:score"])
    assert exc.value.code == 2  # a metric without its threshold (or without --auto-fallback) is a usage error
    with pytest.raises(SystemExit) as exc:
        main(args + ["--auto-fallback", "--fallback-metric", "negerr.py:score", "--fallback-min-metric", "-0.01"])
    assert exc.value.code == 0
    fb = json.loads(Path("r.json").read_text())["fallback"]
    assert fb["met"] and fb["float_nodes"] == ["mm0"] and fb["best"]["metric"] >= -0.01


def test_a_tensor_override_keeps_its_producer_in_float_when_quantizing(tmp_path):
    """Overrides by tensor name apply to the tensor's producer in insert_qdq too (they were only resolved by
    plan_from_overrides, and quantize ignored them)."""
    from conftest import make_cnn

    from edgeq import api
    from edgeq.profiles import Override

    rng = np.random.default_rng(0)
    src = tmp_path / "cnn.onnx"
    onnx.save(make_cnn(with_bn=False), str(src))
    feeds = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    prof = dataclasses.replace(load_profile("tensorrt"), overrides=(Override(tensor="c2", precision="float"),))
    api.quantize(src, target=prof, calib=feeds, output=tmp_path / "q.onnx", check=False)
    q = onnx.load(str(tmp_path / "q.onnx"))
    producers = {o: n for n in q.graph.node for o in n.output}
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    conv1 = next(n for n in q.graph.node if n.name == "conv1")
    assert all(producers.get(t) is None or producers[t].op_type != "DequantizeLinear" for t in conv2.input)
    assert producers[conv1.input[1]].op_type == "DequantizeLinear"
