"""edgeq debug: per-tensor comparison of a quantized model with FP32, the error jump, JSON and plot outputs."""

from __future__ import annotations

import builtins
import json

import numpy as np
import onnx
import pytest

from edgeq.calibration.calibrate import calibrate
from edgeq.debug import debug
from edgeq.errors import BackendUnavailableError
from edgeq.precision import PrecisionPlan, quantize_with_plan
from edgeq.profiles import load_profile
from tests.test_precision import _chain, _feeds


def _write(tmp_path, target="tensorrt"):
    m = _chain()
    stats = calibrate(m, _feeds(8))
    q = quantize_with_plan(m, load_profile(target), stats, PrecisionPlan())
    ref, cand, data = tmp_path / "ref.onnx", tmp_path / f"q_{target}.onnx", tmp_path / "data"
    onnx.save(m, str(ref))
    onnx.save(q, str(cand))
    data.mkdir(exist_ok=True)
    for i, f in enumerate(_feeds(3, seed=4)):
        np.savez(data / f"{i}.npz", **f)
    return ref, cand, data


def test_finds_the_outlier_input_and_writes_json_and_plot(tmp_path):
    ref, cand, data = _write(tmp_path)
    res = debug(ref, cand, data=str(data), max_samples=2, json_out=tmp_path / "d.json", plot=tmp_path / "d.png")
    kinds = {r.kind for r in res.rows}
    assert kinds == {"quantized", "layer"} and res.samples == 2
    assert len([r for r in res.rows if r.kind == "layer"]) == 10
    # mm0's input is quantized per tensor with a scale set by channel 0 (1000x the others): the quantized input
    # still looks fine by SQNR (channel 0 dominates it), but mm0 barely uses channel 0, so its output collapses
    jump = res.first_jump
    assert jump.kind == "layer" and jump.node == "mm0" and jump.inputs == ["x/dequantized"]
    row = {r.tensor: r for r in res.rows}
    assert row["m0"].sqnr_db < 5 < 20 < row["x/dequantized"].sqnr_db and row["m0"].drop_db > 15
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["first_jump"]["node"] == "mm0" and len(d["rows"]) == len(res.rows)
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    table = res.table(top=5)
    assert "(mm0)" in table.splitlines()[1] and "error jumps at MatMul m0 (mm0)" in table


def test_matches_renamed_graph_outputs_of_whole_graph_targets(tmp_path):
    ref, cand, data = _write(tmp_path, target="qnn")
    out_name = onnx.load(str(ref)).graph.output[0].name
    res = debug(ref, cand, data=str(data), max_samples=1)
    assert any(r.reference_tensor == out_name and r.kind == "quantized" for r in res.rows)


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    ref, cand, data = _write(tmp_path)
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(BackendUnavailableError, match=r"edgeq\[plot\]"):
        debug(ref, cand, data=str(data), plot=tmp_path / "p.png")


def test_cli_debug(tmp_path, capsys):
    from edgeq.cli import main

    ref, cand, data = _write(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["debug", str(ref), str(cand), "--data", str(data), "--max-samples", "1", "--top", "3",
              "--json", str(tmp_path / "x.json")])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "error jumps at" in out and len(out.strip().splitlines()) == 5
    assert json.loads((tmp_path / "x.json").read_text())["samples"] == 1


def test_a_range_fused_with_the_following_relu_is_compared_after_the_relu(tmp_path):
    """ort-cpu quantizes a Conv output with the Relu's range (uint8, zero point 0): the Q/DQ output already clamps,
    so it is compared with the FP32 Relu output, not with the (negative-valued) Conv output."""
    from conftest import make_cnn

    from edgeq.api import quantize

    rng = np.random.default_rng(0)
    ref, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    onnx.save(make_cnn(with_bn=False), str(ref))
    np.savez(calib, x=rng.normal(size=(8, 3, 8, 8)).astype(np.float32))
    quantize(ref, target="ort-cpu", calib=calib, output=tmp_path / "q.onnx")
    res = debug(ref, tmp_path / "q.onnx", data=str(calib), max_samples=4)
    row = next(r for r in res.rows if r.tensor == "c1/dequantized")
    assert row.reference_tensor == "r1" and row.sqnr_db > 25.0
    # its input is compared after the same clamp: the Relu drops signal on both sides, which is no added error
    assert row.inputs == ["c1#clamped"] and abs(row.drop_db) < 1.0


def test_clip_bounds_from_attributes_and_inputs():
    from onnx import helper

    from edgeq.debug import _clamp_bounds

    c = onnx.numpy_helper.from_array(np.array(6.0, np.float32), "six")
    graph = helper.make_graph([], "g", [], [], [c])
    model = helper.make_model(graph)
    assert _clamp_bounds(helper.make_node("Relu", ["x"], ["y"]), model) == (0.0, np.inf)
    assert _clamp_bounds(helper.make_node("Clip", ["x", "", "six"], ["y"]), model) == (-np.inf, 6.0)
    assert _clamp_bounds(helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0), model) == (0.0, 6.0)
    assert _clamp_bounds(helper.make_node("Clip", ["x", "dynamic"], ["y"]), model) is None
