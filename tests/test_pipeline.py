"""Multi-model pipelines (``edgeq run``): strict YAML, wiring by name, downstream calibration on real upstream
outputs, the decoding loop, and the report. Models are a tiny encoder and a decoder-with-past built in code."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, run_ort
from onnx import TensorProto, helper, numpy_helper

S, D, V, STOP = 6, 8, 12, 11


def _init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, name, inputs, outputs, inits) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_encoder(seed: int = 0) -> onnx.ModelProto:
    """feats [1, S, D] -> MatMul -> Tanh -> audio [1, S, D]."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["feats", "we"], ["h"], name="enc_mm"),
             helper.make_node("Tanh", ["h"], ["audio"], name="enc_tanh")]
    return _model(nodes, "encoder", [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, S, D])],
                  [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, S, D])],
                  [_init("we", rng.normal(0, 0.5, (D, D)).astype(np.float32))])


def make_decoder_with_past(seed: int = 1) -> onnx.ModelProto:
    """tokens [1, T] int64, audio_features [1, S, D], past [1, P, D] -> logits [1, T, V], present [1, P+T, D].

    The new tokens' embeddings plus the mean audio feature are appended to the cache; the logits read the new
    position and the mean over the whole cache, so the output depends on the carried history."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gather", ["emb", "tokens"], ["x0"], name="embed"),
             helper.make_node("ReduceMean", ["audio_features"], ["ctx"], name="ctx_mean", axes=[1], keepdims=1),
             helper.make_node("Add", ["x0", "ctx"], ["x"], name="add_ctx"),
             helper.make_node("Concat", ["past", "x"], ["present"], name="cat", axis=1),
             helper.make_node("ReduceMean", ["present"], ["summary"], name="hist_mean", axes=[1], keepdims=1),
             helper.make_node("Add", ["x", "summary"], ["hidden"], name="add_hist"),
             helper.make_node("MatMul", ["hidden", "wo"], ["logits"], name="head")]
    return _model(nodes, "decoder_with_past",
                  [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "T"]),
                   helper.make_tensor_value_info("audio_features", TensorProto.FLOAT, [1, S, D]),
                   helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, "P", D])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", V]),
                   helper.make_tensor_value_info("present", TensorProto.FLOAT, [1, "PT", D])],
                  [_init("emb", rng.normal(0, 1, (V, D)).astype(np.float32)),
                   _init("wo", rng.normal(0, 1, (D, V)).astype(np.float32))])


PIPELINE = """\
name: tiny-asr
target: ort-cpu
inputs: [feats]
constants:
  prompt: {value: [[1, 2]], dtype: int64}
  empty_past: {shape: [1, 0, 8]}
stages:
  - name: encoder
    model: enc.onnx
  - name: decoder
    model: dec.onnx
    inputs: {tokens: prompt, audio_features: audio, "p*": empty_past}
    outputs: {}
    loop:
      max_steps: 5
      carry: {present: past}
      token: {logits: logits, feed: tokens, collect: text_tokens, stop: 11, suppress: [0], suppress_first: [3]}
outputs: [audio, text_tokens]
calibration: {data: calib.npz}
evaluation:
  data: eval.npz
  metric: metric.py:score
  thresholds:
    text_tokens.agreement: {min: 0.0}
    audio.cosine: {min: 0.9}
"""

METRIC = """\
import numpy as np

def score(reference, candidate):
    assert set(reference[0]) == {"audio", "text_tokens"}
    return {"lengths_equal": float(np.mean([r["text_tokens"].shape == c["text_tokens"].shape
                                             for r, c in zip(reference, candidate)]))}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    onnx.save(make_encoder(), tmp_path / "enc.onnx")
    onnx.save(make_decoder_with_past(), tmp_path / "dec.onnx")
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "calib.npz", feats=rng.normal(0, 1, (6, S, D)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", feats=rng.normal(0, 1, (4, S, D)).astype(np.float32))
    (tmp_path / "metric.py").write_text(METRIC)
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def reference_decode(tmp: Path, feats: np.ndarray, max_steps: int = 5) -> tuple[list[int], list[dict]]:
    """Greedy decoding written out by hand: the tokens and every decoder feed."""
    audio = run_ort(tmp / "enc.onnx", {"feats": feats})[0]
    tokens, past, out, feeds = np.array([[1, 2]], np.int64), np.zeros((1, 0, D), np.float32), [], []
    for step in range(max_steps):
        feed = {"tokens": tokens, "audio_features": audio, "past": past}
        feeds.append(feed)
        logits, past = run_ort(tmp / "dec.onnx", feed)
        row = logits[0, -1].copy()
        row[0] = -np.inf
        if step == 0:
            row[3] = -np.inf
        token = int(row.argmax())
        if token == STOP:
            break
        out.append(token)
        tokens = np.array([[token]], np.int64)
    return out, feeds


# -- the YAML schema ---------------------------------------------------------------------------------------------


def test_plan_wires_inputs_by_name_and_expands_globs(tiny):
    from edgeq.pipeline_plan import plan

    p = plan(tiny / "pipeline.yaml")
    enc, dec = p.stages
    assert enc.inputs == {"feats": "feats"}  # wired by name
    assert dec.inputs == {"tokens": "prompt", "audio_features": "audio", "past": "empty_past"}
    assert dec.carry == {"present": "past"}
    assert dec.outputs == {}
    assert "stage encoder 'audio'" in dec.sources["audio_features"]
    assert "carried" in dec.sources["past"] and "chosen token" in dec.sources["tokens"]
    assert [s.name for s in p.input_specs] == ["feats"] and p.input_specs[0].shape == (1, S, D)
    assert p.constants["empty_past"].shape == (1, 0, D)
    assert enc.profile.name == "ort-cpu"


@pytest.mark.parametrize("edit, message", [
    (("target: ort-cpu", "target: ort-cpu\nstagez: []"), "unknown key 'stagez' in pipeline; valid keys: calibration"),
    (("max_steps: 5", "max_steps: 5\n      max_step: 4"),
     "unknown key 'max_step' in stages[1].loop; valid keys: carry"),
    (("stop: 11", "stop: 11, stopp: 3"), "unknown key 'stopp' in stages[1].loop.token"),
    (("model: enc.onnx", "model: enc.onnx\n    profile: {activations: {obsrver: mse}}"),
     "unknown key 'obsrver' in stages[0].profile.activations; valid keys:"),
    (("max_steps: 5", "max_steps: 0"), "max_steps must be >= 1"),
    (("max_steps: 5", "max_steps: five"), "stages[1].loop.max_steps must be an integer"),
    (("calibration: {data: calib.npz}", "calibration: {}"), "missing key 'data' in calibration"),
    (("  - name: encoder\n", "  - nam: encoder\n"), "missing key 'name' in stages[0]"),
    (("name: decoder", "name: encoder"), "stage name 'encoder' is used twice"),
    (("model: dec.onnx", "model: missing.onnx"), "stages[1] (decoder): model file not found"),
    (("audio_features: audio", "audio_features: audoi"), "input 'audio_features' reads value 'audoi', which does not "
                                                          "exist before this stage"),
    (('"p*": empty_past', "pst: empty_past"), "inputs: 'pst' matches no model input; inputs: tokens, audio_features"),
    (('"p*": empty_past}', "}"), "model input 'past' is not wired"),
    (("carry: {present: past}", "carry: {present: paste}"), "loop.carry maps 'present' to 'paste', which is not a "
                                                            "model input"),
    (("logits: logits,", "logits: logit,"), "loop.token.logits: 'logit' matches no model output"),
    (("outputs: [audio, text_tokens]", "outputs: [audio, tokens_text]"), "pipeline output 'tokens_text' is "
                                                                         "produced by no stage"),
    (("collect: text_tokens", "collect: audio"), "value 'audio' already exists (stage encoder)"),
    (("metric: metric.py:score", "metric: metric.py:nope"), "has no callable 'nope'"),
    (("target: ort-cpu", "target: ort-cpux"), "unknown target 'ort-cpux'"),
    (("empty_past: {shape: [1, 0, 8]}", "empty_past: {shape: [1, 0, 8], value: 1}"),
     "constants.empty_past: give exactly one of 'value' or 'shape'"),
    (("name: tiny-asr", "name: [tiny]"), "name must be a string"),
])
def test_bad_yaml_is_one_line_error_naming_key_and_file(tiny, edit, message):
    from edgeq.pipeline_plan import plan
    from edgeq.pipeline_spec import PipelineError

    old, new = edit
    assert old in PIPELINE
    path = _write(tiny, PIPELINE.replace(old, new, 1))
    with pytest.raises(PipelineError) as err:
        plan(path)
    text = str(err.value)
    assert message in text, text
    assert text.startswith(str(path)) and "\n" not in text


def test_target_override_keeps_stage_targets(tiny):
    from edgeq.pipeline_plan import plan

    text = PIPELINE.replace("    model: dec.onnx\n", "    model: dec.onnx\n    target: qnn\n")
    p = plan(_write(tiny, text), target="tensorrt")
    assert [s.profile.name for s in p.stages] == ["tensorrt", "qnn"]


def test_out_of_range_token_id_is_an_error(tiny):
    from edgeq.pipeline_exec import PipelineRunner
    from edgeq.pipeline_plan import plan
    from edgeq.pipeline_spec import PipelineError

    runner = PipelineRunner(plan(_write(tiny, PIPELINE.replace("suppress: [0]", "suppress: [0, 12]"))))
    with pytest.raises(PipelineError, match="id 12 is outside the 12 scores of 'logits'"):
        runner({"feats": np.zeros((1, S, D), np.float32)})


def test_invalid_yaml_and_non_mapping(tmp_path):
    from edgeq.pipeline_spec import PipelineError, read_pipeline_yaml

    with pytest.raises(PipelineError, match="invalid YAML"):
        read_pipeline_yaml(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(PipelineError, match="must be a YAML mapping"):
        read_pipeline_yaml(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(PipelineError, match="missing key 'stages' in pipeline"):
        read_pipeline_yaml(_write(tmp_path, "name: x\ninputs: []\noutputs: []\ncalibration: {data: a}\n"))
    with pytest.raises(PipelineError, match="pipeline file not found"):
        read_pipeline_yaml(tmp_path / "nope.yaml")


# -- running ----------------------------------------------------------------------------------------------------


def test_loop_matches_hand_written_greedy_decoding(tiny):
    from edgeq.pipeline_exec import PipelineRunner
    from edgeq.pipeline_plan import plan

    runner = PipelineRunner(plan(tiny / "pipeline.yaml"))
    feats_all = np.load(tiny / "eval.npz")["feats"]
    lengths = set()
    for i in range(len(feats_all)):
        feats = feats_all[i:i + 1]
        seen = []
        values = runner({"feats": feats}, lambda stage, step, feed, seen=seen: seen.append((stage.name, step, feed)))
        expected, feeds = reference_decode(tiny, feats)
        assert values["text_tokens"].tolist() == [expected]
        assert values["text_tokens"].dtype == np.int64
        dec_feeds = [f for name, _, f in seen if name == "decoder"]
        assert len(dec_feeds) == len(feeds)
        for got, want in zip(dec_feeds, feeds):  # the KV cache grows by the carried present
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
        lengths.add(len(expected))
    assert runner.calls["decoder"] >= len(feats_all)


def test_update_hook_and_loop_results(tmp_path):
    """A denoising-style loop: an update hook rewrites an input after every step; ``outputs`` may publish the
    final value of a model input."""
    from edgeq.pipeline_exec import PipelineRunner
    from edgeq.pipeline_plan import plan

    nodes = [helper.make_node("Mul", ["x", "k"], ["y"], name="scale")]
    model = _model(nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [_init("k", np.float32(0.5))])
    onnx.save(model, tmp_path / "step.onnx")
    (tmp_path / "hooks.py").write_text("def step(i, feeds, outputs):\n    return {'x': feeds['x'] - outputs['y']}\n")
    path = _write(tmp_path, """\
        name: denoise
        inputs: [x]
        stages:
          - name: step
            model: step.onnx
            quantize: false
            outputs: {x: final, y: last_y}
            loop: {max_steps: 3, update: hooks.py:step}
        outputs: [final, last_y]
        calibration: {data: unused.npz}
        """)
    values = PipelineRunner(plan(path))({"x": np.full((1, 4), 8.0, np.float32)})
    np.testing.assert_allclose(values["final"], np.full((1, 4), 1.0))  # 8 -> 4 -> 2 -> 1
    np.testing.assert_allclose(values["last_y"], np.full((1, 4), 1.0))  # y at the last step (x = 2)


def test_run_calibrates_decoder_on_real_encoder_outputs(tiny):
    from edgeq.calibration.stats import CalibrationStats
    from edgeq.pipeline import run_pipeline

    result = run_pipeline(tiny / "pipeline.yaml", output_dir=tiny / "out")
    rep = result.report
    calib = np.load(tiny / "calib.npz")["feats"]
    audio = [run_ort(tiny / "enc.onnx", {"feats": calib[i:i + 1]})[0] for i in range(len(calib))]
    feeds = [f for i in range(len(calib)) for f in reference_decode(tiny, calib[i:i + 1])[1]]

    dec_stats = CalibrationStats.load(tiny / "out" / "calibration" / "decoder.stats.npz")
    obs = dec_stats.get("audio_features")
    assert obs.min == pytest.approx(min(a.min() for a in audio), abs=1e-6)
    assert obs.max == pytest.approx(max(a.max() for a in audio), abs=1e-6)
    assert dec_stats.samples == len(feeds)  # one calibration feed per decoding step
    past = dec_stats.get("past")  # the KV cache as greedy decoding carried it
    assert past.max == pytest.approx(max(f["past"].max() for f in feeds if f["past"].size), abs=1e-6)
    enc_stats = CalibrationStats.load(tiny / "out" / "calibration" / "encoder.stats.npz")
    assert enc_stats.samples == len(calib)
    assert enc_stats.get("feats").max == pytest.approx(calib.max(), abs=1e-6)

    dec = rep["stages"][1]
    assert dec["calibration"]["feeds"] == len(feeds)
    assert "stage encoder 'audio'" in dec["calibration"]["inputs"]["audio_features"]
    assert dec["report"]["calibration"]["samples"] == len(feeds)


def test_report_structure_and_outputs(tiny):
    from edgeq.pipeline import format_summary, run_pipeline

    result = run_pipeline(tiny / "pipeline.yaml", output_dir=tiny / "out")
    out = tiny / "out"
    assert (out / "encoder.onnx").is_file() and (out / "decoder.onnx").is_file()
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == "edgeq.pipeline-report/1" and rep["command"] == "run"
    assert [s["name"] for s in rep["stages"]] == ["encoder", "decoder"]
    for s in rep["stages"]:
        assert s["quantized"] and s["target"] == "ort-cpu"
        assert s["report"]["quantization"]["quantize_nodes"] > 0
        assert s["validation"]["samples"] > 0  # validated alone, on FP32 feeds captured from the eval data
        assert s["output"]["sha256"] and s["model"]["sha256"]
    e2e = rep["end_to_end"]
    assert e2e["samples"] == 4
    assert {o["name"] for o in e2e["outputs"]} == {"audio", "text_tokens"}
    assert e2e["metrics"]["lengths_equal"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # the task metric hook ran
    assert 0.0 <= e2e["metrics"]["text_tokens.agreement"] <= 1.0
    assert e2e["metrics"]["audio.cosine"] > 0.99
    assert e2e["latency_ms"]["fp32"]["samples"] == 4
    assert e2e["latency_ms"]["stages"]["quantized"]["decoder"]["calls"] >= 4
    assert e2e["size_bytes"]["fp32"] > 0
    assert rep["passed"] is result.passed
    assert isinstance(rep["passed"], bool)
    text = format_summary(rep)
    assert "encoder" in text and "text_tokens.agreement" in text


def test_failing_threshold_and_cli_exit_code(tiny, edgeq_cli):
    path = _write(tiny, PIPELINE.replace("audio.cosine: {min: 0.9}", "audio.cosine: {min: 1.1}")
                  .replace("text_tokens.agreement: {min: 0.0}", "no_such_metric: {max: 1}"))
    r = edgeq_cli("run", str(path), "-o", str(tiny / "cli_out"))
    assert r.returncode == 1, r.stderr
    assert "FAILED" in r.stdout and "audio.cosine" in r.stdout and "'no_such_metric' was not computed" in r.stdout
    assert (tiny / "cli_out" / "report.json").is_file()


def test_cli_bad_pipeline_is_one_line_error(tiny, edgeq_cli):
    path = _write(tiny, PIPELINE.replace("max_steps: 5", "max_steps: 5\n      maxsteps: 5"))
    r = edgeq_cli("run", str(path))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "unknown key 'maxsteps'" in r.stderr and "Traceback" not in r.stderr


def test_stage_fallback_reaches_quantize(tiny):
    from edgeq.pipeline import run_pipeline

    text = PIPELINE.replace("    model: enc.onnx\n", "    model: enc.onnx\n    fallback: {min_sqnr_db: 90, "
                            "max_float_fraction: 1.0, time_limit_s: 30, max_samples: 2}\n")
    rep = run_pipeline(_write(tiny, text), output_dir=tiny / "fb").report
    fallback = rep["stages"][0]["report"]["fallback"]
    assert fallback["budget"]["min_sqnr_db"] == 90 and fallback["float_nodes"] == ["enc_mm"]
    assert rep["stages"][1]["report"]["fallback"] is None


def test_float_stage_is_copied_and_compiled(tiny):
    from edgeq.pipeline import run_pipeline

    text = PIPELINE.replace("    model: enc.onnx\n", "    model: enc.onnx\n    quantize: false\n    compile: true\n")
    path = _write(tiny, text.replace("evaluation:", "evaluation_off:").split("evaluation_off:")[0])
    rep = run_pipeline(path, output_dir=tiny / "o").report
    enc = rep["stages"][0]
    assert enc["quantized"] is False and enc["validation"] is None
    assert Path(enc["compiled"]["path"]).suffix == ".ort" and Path(enc["compiled"]["path"]).is_file()
    assert rep["passed"] is None and "end_to_end" not in rep


# -- the recipes (real models) ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_whisper_recipe(tmp_path):
    cache = ROOT / "benchmarks" / ".cache" / "whisper"
    if not (cache / "decoder_with_past.onnx").is_file():
        pytest.skip("run `python examples/whisper/export.py` (benchmarks.prepare --only whisper) first")
    from edgeq.pipeline import run_pipeline

    rep = run_pipeline(ROOT / "examples" / "whisper" / "pipeline.yaml", output_dir=tmp_path).report
    metrics = rep["end_to_end"]["metrics"]
    assert metrics["fp32_matches_cached_transcripts"] == 1.0  # the loop decodes exactly as benchmarks/ does
    encoder, decoder = rep["stages"]
    assert "stage encoder 'audio_features'" in decoder["calibration"]["inputs"]["audio_features"]
    assert decoder["calibration"]["feeds"] > 8 * 5  # every greedy step of the 8 calibration utterances
    # the 1500-frame cross-attention probabilities would round to zero: divided by their row maximum, they are INT8
    deferred = next(p for p in decoder["report"]["passes"] if p["name"] == "defer_softmax_normalization")
    assert sum("cross_attn/Softmax" in name for name in deferred["notes"]["flushed"]) == 4
    assert not any("cross_attn/Softmax" in s["target"] for s in decoder["report"]["skipped"]
                   if s["pass"] == "insert_qdq")
    assert encoder["validation"]["outputs"][0]["cosine_mean"] > 0.998
    assert decoder["validation"]["outputs"][0]["cosine_mean"] > 0.99  # measured 0.9956 (logits, FP32 inputs)
    # Measured between 0.074 and 0.149 over the last changes on these 12 held-out utterances (0.095 with the stem
    # smoothed and the flushed attention mass added back, 2026-12-08; the 5 % target is not
    # met; docs/pipelines.md says why): greedy decoding flips a few unsure tokens under any perturbation, so this
    # bound catches a broken pipeline (~1.0), and the fidelity bounds above catch a worse one.
    assert metrics["wer_vs_fp32"] <= 0.20


@pytest.mark.slow
def test_sdxl_recipe_runs(tmp_path):
    pytest.importorskip("diffusers")
    import subprocess
    import sys

    from edgeq.pipeline import run_pipeline

    subprocess.run([sys.executable, str(ROOT / "examples" / "sdxl" / "export.py")], check=True, cwd=ROOT,
                   capture_output=True)
    rep = run_pipeline(ROOT / "examples" / "sdxl" / "pipeline.yaml", output_dir=tmp_path).report
    assert [s["name"] for s in rep["stages"]] == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    unet = rep["stages"][2]
    assert unet["calibration"]["feeds"] == 16 * 4  # every denoising step of every calibration prompt
    assert unet["validation"]["outputs"][0]["cosine_mean"] > 0.98
    assert rep["end_to_end"]["metrics"]["image_psnr_db"] > 30
    assert rep["passed"]
