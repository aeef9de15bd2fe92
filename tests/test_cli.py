"""The CLI as a user runs it: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import ROOT


def edgeq(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeq", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def test_targets_lists_builtins():
    r = edgeq("targets")
    assert r.returncode == 0
    for name in ("tensorrt", "qnn", "qnn-a16w8", "coreml", "ort-cpu"):
        assert name in r.stdout
    show = edgeq("targets", "show", "qnn-a16w8")
    assert show.returncode == 0 and "uint16" in show.stdout


def test_demo_prints_accuracy_and_passes(tmp_path):
    r = edgeq("demo", "-o", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "accuracy  fp32" in r.stdout and "PASSED" in r.stdout
    rep = json.loads(next(tmp_path.glob("*.report.json")).read_text())
    assert rep["passed"] is True and rep["demo"]["int8_accuracy"] > 0.95
    assert rep["quantization"]["compute_ops_quantized"] == rep["quantization"]["compute_ops"]


@pytest.mark.parametrize("target", ["tensorrt", "qnn", "ort-cpu", "coreml"])
def test_quantize_then_validate_then_check(tmp_path, digits, target):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    r = edgeq("quantize", digits["model"], "-t", target, "--calib", digits["calib"], "--eval", digits["eval"],
              "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    for key in ("passed", "validation", "profile", "skipped", "versions", "model", "output", "quantization"):
        assert key in report
    assert report["validation"]["outputs"][0]["top1_agreement"] >= 0.97
    onnx.checker.check_model(onnx.load(str(out)))
    v = edgeq("validate", digits["model"], out, "--data", digits["eval"], "-t", target)
    assert v.returncode == 0, v.stdout + v.stderr
    strict = edgeq("validate", digits["model"], out, "--data", digits["eval"], "--min-sqnr", "200")
    assert strict.returncode == 1 and "FAILED" in strict.stdout
    ins = edgeq("inspect", out)
    assert ins.returncode == 0 and "quantized" in ins.stdout


def test_check_reports_illegal_model_for_tensorrt(tmp_path, digits):
    out = tmp_path / "q.onnx"
    assert edgeq("quantize", digits["model"], "-t", "ort-cpu", "--calib", digits["calib"], "-o", out).returncode == 0
    ok = edgeq("check", out, "-t", "ort-cpu")
    assert ok.returncode == 0
    bad = edgeq("check", out, "-t", "tensorrt")
    assert bad.returncode == 1 and "trt-zero-point" in bad.stdout or "trt-qdq-dtype" in bad.stdout


def test_output_equal_to_input_is_refused(tmp_path, digits):
    model = tmp_path / "m.onnx"
    model.write_bytes(digits["model"].read_bytes())
    before = model.read_bytes()
    r = edgeq("quantize", model, "-t", "qnn", "--calib", digits["calib"], "-o", model)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert model.read_bytes() == before


def test_bad_input_is_one_line_error(tmp_path, digits):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model")
    r = edgeq("quantize", junk, "-t", "qnn", "--calib", digits["calib"], "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a valid ONNX" in r.stderr
    assert not list(tmp_path.glob("o.onnx*"))
    r = edgeq("quantize", digits["model"], "-t", "nonsense", "--calib", digits["calib"], "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "unknown target" in r.stderr
    r = edgeq("-v", "quantize", junk, "-t", "qnn", "--calib", digits["calib"], "-o", tmp_path / "o.onnx")
    assert "Traceback" in r.stderr, "--verbose shows the traceback"


def test_stats_are_saved_and_reused(tmp_path, digits):
    stats = tmp_path / "stats.npz"
    args = [digits["model"], "-t", "tensorrt", "--calib", digits["calib"], "--stats", stats]
    assert edgeq("quantize", *args, "-o", tmp_path / "a.onnx").returncode == 0
    assert stats.exists()
    assert edgeq("quantize", *args, "-o", tmp_path / "b.onnx").returncode == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    c = edgeq("calibrate", digits["model"], "--calib", digits["calib"], "-o", tmp_path / "s2.npz")
    assert c.returncode == 0 and (tmp_path / "s2.npz").exists()


@pytest.mark.qnn
def test_qnn_emulator_matches_ort_simulation_on_digits(tmp_path, digits):
    pytest.importorskip("onnxruntime_qnn", reason="needs the qnn extra (onnxruntime-qnn's HTP emulator)")
    import numpy as np

    q, ctx, data = tmp_path / "q.onnx", tmp_path / "q.ctx.onnx", tmp_path / "eval.npz"
    np.savez(data, image=np.load(digits["eval"])["image"][:40])
    assert edgeq("quantize", digits["model"], "-t", "qnn", "--calib", digits["calib"], "-o", q).returncode == 0
    c = edgeq("compile", q, "-t", "qnn", "-o", ctx, "--input-shape", "image=1,1,8,8")
    assert c.returncode == 0, c.stderr
    assert "nodes not on QNN: none" in c.stdout
    for backend_model, args in ((q, ["--backend", "ort"]), (ctx, ["--backend", "qnn"])):
        r = edgeq("validate", digits["model"], backend_model, "--data", data, "--report", tmp_path / "v.json", *args)
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads((tmp_path / "v.json").read_text())
        out = rep["validation"]["outputs"][0]
        assert out["cosine_mean"] > 0.999 and out["top1_agreement"] >= 0.97, (args, out)


def test_check_with_input_shape_checks_the_model_as_compile_fixes_it(tmp_path, digits):
    q = tmp_path / "q.onnx"
    assert edgeq("quantize", digits["model"], "-t", "qnn", "--calib", digits["calib"], "-o", q).returncode == 0
    dynamic = edgeq("check", q, "-t", "qnn")
    assert dynamic.returncode == 1 and "qnn-dynamic-shape" in dynamic.stdout
    fixed = edgeq("check", q, "-t", "qnn", "--input-shape", "image=1,1,8,8")
    assert fixed.returncode == 0, fixed.output
    bad = edgeq("check", q, "-t", "qnn", "--input-shape", "image=1,x")
    assert bad.returncode == 2 and "expected name=1,3,224,224" in bad.stderr
