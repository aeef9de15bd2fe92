"""benchmarks.ort_baseline on a small Conv model built in code."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchmarks import feeds
from benchmarks.ort_baseline import quantize, quantize_in_subprocess, quantized_nodes
from conftest import init, run_ort


def _conv_model(path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [init("w1", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), init("b1", rng.normal(size=4).astype(np.float32)),
         init("w2", rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.3), init("b2", rng.normal(size=4).astype(np.float32))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _calib(tmp_path, rng):
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    feeds.save_stacked(tmp_path / "calib.npz", samples)
    return samples


def test_static_quantizes_every_conv_and_stays_close(tmp_path, monkeypatch):
    _conv_model(tmp_path / "m.onnx")
    samples = _calib(tmp_path, np.random.default_rng(1))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    report = quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", "static", tmp_path / "calib.npz")
    assert report["preprocess"] == "ok"
    assert set(quantized_nodes(tmp_path / "q.onnx")) >= {"conv1", "conv2"}
    ref, out = run_ort(tmp_path / "m.onnx", samples[0])[0], run_ort(tmp_path / "q.onnx", samples[0])[0]
    assert np.abs(ref - out).max() < 0.1 * np.abs(ref).max()  # 8-bit ranges over a handful of samples
    assert os.listdir(workdir) == []  # nothing left in the working directory


def test_exclude_worst_keeps_a_node_in_float(tmp_path):
    _conv_model(tmp_path / "m.onnx")
    _calib(tmp_path, np.random.default_rng(2))
    report = quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", "static_exclude_worst", tmp_path / "calib.npz")
    quantize(tmp_path / "m.onnx", tmp_path / "full.onnx", "static", tmp_path / "calib.npz")
    assert report["candidates"] == 3 and report["calib_sqnr_db_best"] >= report["calib_sqnr_db_full"]
    if report["excluded_node"]:  # the excluded node's own QuantizeLinear/DequantizeLinear pairs are gone

        def qdq_count(path):
            return sum(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)

        assert qdq_count(tmp_path / "q.onnx") < qdq_count(tmp_path / "full.onnx")


def test_subprocess_reports_time_memory_and_failure(tmp_path):
    _conv_model(tmp_path / "m.onnx")
    result = quantize_in_subprocess(tmp_path / "m.onnx", tmp_path / "d.onnx", "dynamic")
    assert result["ok"] and result["mode"] == "dynamic" and result["peak_rss_mb"] > 10
    assert json.loads((tmp_path / "d.onnx.json").read_text())["size_bytes"] > 0
    failed = quantize_in_subprocess(tmp_path / "missing.onnx", tmp_path / "x.onnx", "dynamic")
    assert not failed["ok"] and failed["error"]
