"""``edgeq run PIPELINE.yaml``: quantize a multi-model pipeline and validate it end to end.

1. The FP32 pipeline runs on the calibration inputs; every feed of every stage is captured (loop stages: every
   ``calibration.every``-th step), so a downstream model is calibrated on the real outputs of its upstream models —
   a decoder on the encoder's features and on the KV cache that greedy decoding carries.
2. Each stage is quantized with :func:`edgeq.api.quantize` for its own target profile (and overrides), on its
   captured feeds; the FP32 feeds captured on the evaluation inputs validate it in isolation. Where asked, the
   result is compiled with :func:`edgeq.api.compile_model`.
3. The quantized pipeline runs on the evaluation inputs; its outputs are compared with FP32 (cosine/SQNR for float
   values, exact match and position-wise agreement for integer sequences) and handed to the task metric hook.

Everything lands in one folder: ``<stage>.onnx`` per stage, compiled artifacts, ``calibration/<stage>.stats.npz``
and ``report.json`` covering every stage and the end-to-end result. The YAML schema is in ``docs/pipelines.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.calibration.calibrate import progress_printer
from edgeq.calibration.data import open_dataset
from edgeq.errors import EdgeqError, OutputError
from edgeq.metrics import OutputMetrics
from edgeq.model_io import model_size_bytes, same_file
from edgeq.pipeline_exec import PipelineRunner
from edgeq.pipeline_plan import Plan, StagePlan
from edgeq.pipeline_plan import plan as make_plan
from edgeq.pipeline_spec import PipelineError
from edgeq.report import SCHEMA, sha256_file, tool_versions, write_report

log = logging.getLogger(__name__)

PIPELINE_SCHEMA = "edgeq.pipeline-report/1"
COMPILED_SUFFIX = {"qnn": ".ctx.onnx", "coreml": ".mlpackage", "tensorrt": ".engine", "ort": ".ort"}


@dataclass
class PipelineResult:
    output_dir: Path
    report: dict
    passed: bool | None  # None without evaluation data

    @property
    def models(self) -> dict[str, Path]:
        return {s["name"]: Path(s["output"]["path"]) for s in self.report["stages"]}


def run_pipeline(pipeline: str | Path, *, output_dir: str | Path | None = None, target: str | None = None,
                 progress: bool = False, threads: int = 0) -> PipelineResult:
    """Calibrate, quantize (and compile) every stage of ``pipeline``, then validate the whole pipeline.
    ``target`` replaces the pipeline's default target (stages naming their own keep it)."""
    t0 = time.perf_counter()
    plan = make_plan(pipeline, target=target)
    spec = plan.spec
    out = Path(output_dir) if output_dir is not None else Path("out") / spec.name
    _prepare_output(out, plan)
    calib = open_dataset(plan.data_spec(spec.calibration.data), plan.input_specs,
                         limit=spec.calibration.max_samples, what="pipeline calibration data")
    evaluation = spec.evaluation
    eval_ds = open_dataset(plan.data_spec(evaluation.data), plan.input_specs, limit=evaluation.max_samples,
                           what="pipeline evaluation data") if evaluation is not None else None
    timings: dict[str, float] = {}

    start = time.perf_counter()
    fp32 = PipelineRunner(plan, threads=threads)
    calib_feeds, _, calib_seconds = _capture(fp32, plan, calib, "FP32 pipeline on calibration data", progress)
    eval_feeds, reference, fp32_latency = _capture(fp32, plan, eval_ds, "FP32 pipeline on evaluation data",
                                                   progress) if eval_ds is not None else ({}, [], [])
    fp32_timing = fp32.timing()
    del fp32
    timings["capture_s"] = time.perf_counter() - start

    stages = []
    for stage in plan.stages:
        start = time.perf_counter()
        stages.append(_stage_report(stage, out, calib_feeds[stage.name], eval_feeds.get(stage.name), progress))
        timings[f"stage_{stage.name}_s"] = time.perf_counter() - start

    rep: dict[str, Any] = {
        "schema": PIPELINE_SCHEMA, "stage_report_schema": SCHEMA, "command": "run", "passed": None,
        "pipeline": {"name": spec.name, "description": spec.description, "path": str(plan.path),
                     "sha256": sha256_file(plan.path), "target": spec.target},
        "calibration": {"samples": len(calib_seconds), "data": spec.calibration.data,
                        "data_sha256": sha256_file(plan.data_spec(spec.calibration.data))
                        if Path(plan.data_spec(spec.calibration.data)).exists() else None},
        "stages": stages,
    }
    if eval_ds is not None:
        start = time.perf_counter()
        quantized = PipelineRunner(plan, {s["name"]: s["output"]["path"] for s in stages}, threads=threads)
        _, candidate, cand_latency = _capture(quantized, plan, eval_ds, "quantized pipeline on evaluation data",
                                              progress, keep_feeds=False)
        rep["end_to_end"] = _end_to_end(plan, reference, candidate, fp32_latency, cand_latency, fp32_timing,
                                        quantized.timing(), stages)
        timings["end_to_end_s"] = time.perf_counter() - start
        stage_fail = [f"stage {s['name']}: {f}" for s in stages
                      for f in (s.get("validation") or {}).get("failures", [])]
        rep["failures"] = stage_fail + rep["end_to_end"]["failures"]
        rep["passed"] = not rep["failures"]
    timings["total_s"] = time.perf_counter() - t0
    rep["timings"] = {k: round(v, 3) for k, v in timings.items()}
    rep["versions"] = tool_versions()
    write_report(rep, out / "report.json")
    return PipelineResult(output_dir=out, report=rep, passed=rep["passed"])


def _prepare_output(out: Path, plan: Plan) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder; give -o a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration").mkdir(exist_ok=True)
    for stage in plan.stages:
        if same_file(out / f"{stage.name}.onnx", stage.model):
            raise OutputError(f"{out / (stage.name + '.onnx')} is stage {stage.name}'s input model; choose another "
                              f"-o folder (edgeq never overwrites its input)")


def _capture(runner: PipelineRunner, plan: Plan, data, label: str, progress: bool, *, keep_feeds: bool = True):
    """Run ``runner`` on every sample; returns the captured feeds per stage, the pipeline outputs per sample and
    the wall time per sample."""
    feeds: dict[str, list[dict]] = defaultdict(list)

    def capture(stage: StagePlan, step: int, feed: dict) -> None:
        if step % stage.spec.calibration.every == 0:
            feeds[stage.name].append(dict(feed))

    show = progress_printer(label) if progress else None
    outputs, seconds = [], []
    for i, sample in enumerate(data):
        start = time.perf_counter()
        values = runner(sample, capture if keep_feeds else None)
        seconds.append(time.perf_counter() - start)
        outputs.append({name: values[name] for name in plan.spec.outputs})
        if show:
            show(i + 1, data.length)
    return dict(feeds), outputs, seconds


def _stage_report(stage: StagePlan, out: Path, calib_feeds: list[dict], eval_feeds: list[dict] | None,
                  progress: bool) -> dict:
    from edgeq import api

    target = out / f"{stage.name}.onnx"
    limit = stage.spec.calibration.max_samples
    entry: dict[str, Any] = {"name": stage.name, "model": {"path": str(stage.model), "sha256": sha256_file(stage.model),
                                                         "size_bytes": model_size_bytes(stage.model)},
                             "quantized": stage.spec.quantize, "loop": stage.spec.loop is not None,
                             "calibration": {"feeds": min(len(calib_feeds), limit or len(calib_feeds)),
                                             "captured_feeds": len(calib_feeds), "every": stage.spec.calibration.every,
                                             "inputs": stage.sources}}
    if stage.spec.quantize:
        stats = out / "calibration" / f"{stage.name}.stats.npz"
        stats.unlink(missing_ok=True)  # always calibrate on this run's feeds
        log.info("stage %s: quantizing for %s on %d captured feeds", stage.name, stage.profile.name, len(calib_feeds))
        result = api.quantize(stage.model, target=stage.profile, calib=calib_feeds, output=target,
                              eval_data=eval_feeds or None, stats=stats, max_calib_samples=limit,
                              latency_runs=stage.spec.latency_runs, progress=progress,
                              fallback=_fallback(stage.spec.fallback_options))
        rep = result.report
        entry.update(target=stage.profile.name, profile_source=stage.profile.source, output=rep["output"],
                     stats=str(stats), report=rep, validation=rep.get("validation"))
        entry["calibration"]["data_sha256"] = rep["calibration"]["data_sha256"]
    else:
        shutil.copyfile(stage.model, target)
        entry.update(target=None, output={"path": str(target), "sha256": sha256_file(target),
                                          "size_bytes": model_size_bytes(target)}, validation=None)
    options = stage.spec.compile_options
    if options is not None:
        backend = options.backend or stage.profile.compile.backend
        compiled = out / f"{stage.name}{COMPILED_SUFFIX.get(backend, '.bin')}"
        compiled_info = api.compile_model(target, target=stage.profile, output=compiled, soc=options.soc,
                                          backend=options.backend,
                                          input_shapes={k: list(v) for k, v in options.input_shapes.items()} or None)
        entry["compiled"] = {"path": str(compiled), "backend": backend,
                             **{k: v for k, v in compiled_info.items() if k not in ("lint",)}}
    return entry


def _fallback(options):
    if options is None:
        return False
    from edgeq.precision import FallbackOptions

    return FallbackOptions(**dataclasses.asdict(options))


def _end_to_end(plan: Plan, reference: list[dict], candidate: list[dict], fp32_s: list[float], cand_s: list[float],
                fp32_timing: dict, cand_timing: dict, stages: list[dict]) -> dict:
    evaluation = plan.spec.evaluation
    outputs, metrics = compare_values(reference, candidate, plan.spec.outputs)
    if plan.metric is not None:
        try:
            task = plan.metric(reference, candidate)
        except EdgeqError:
            raise
        except Exception as exc:
            raise PipelineError(f"evaluation.metric {evaluation.metric} failed: {type(exc).__name__}: {exc}") \
                from exc
        if not isinstance(task, dict):
            raise PipelineError(f"evaluation.metric {evaluation.metric} must return a dict of metric -> number, got "
                                f"{type(task).__name__}")
        metrics.update(task)
    failures = []
    for name, bound in evaluation.thresholds.items():
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            failures.append(f"metric {name!r} was not computed (metrics: {', '.join(sorted(metrics))})")
        elif bound.min is not None and not value >= bound.min:
            failures.append(f"{name} {value:.4g} < {bound.min}")
        elif bound.max is not None and not value <= bound.max:
            failures.append(f"{name} {value:.4g} > {bound.max}")
    fp32_size = sum(s["model"]["size_bytes"] for s in stages)
    cand_size = sum(s["output"]["size_bytes"] for s in stages)
    return {
        "samples": len(reference), "outputs": outputs, "metrics": metrics,
        "thresholds": {k: {"min": b.min, "max": b.max} for k, b in evaluation.thresholds.items()},
        "failures": failures, "passed": not failures,
        "latency_ms": {"fp32": _latency(fp32_s), "quantized": _latency(cand_s),
                       "speedup": _ratio(_latency(fp32_s), _latency(cand_s)),
                       "stages": {"fp32": fp32_timing, "quantized": cand_timing}} if evaluation.latency else None,
        "size_bytes": {"fp32": fp32_size, "quantized": cand_size,
                       "ratio": cand_size / fp32_size if fp32_size else None},
    }


def _latency(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = sorted(1000 * s for s in seconds)
    return {"median_per_sample": statistics.median(ms), "mean_per_sample": statistics.fmean(ms),
            "max_per_sample": ms[-1], "samples": len(ms)}


def _ratio(ref: dict, cand: dict) -> float | None:
    if not ref or not cand or not cand["median_per_sample"]:
        return None
    return ref["median_per_sample"] / cand["median_per_sample"]


def compare_values(reference: list[dict], candidate: list[dict], names) -> tuple[list[dict], dict[str, float]]:
    """Per pipeline output: float tensors get cosine/SQNR/errors (edgeq.metrics); integer tensors (token ids)
    get exact-match rate and position-wise agreement over the longer sequence."""
    rows, flat = [], {}
    for name in names:
        pairs = [(np.asarray(r[name]), np.asarray(c[name])) for r, c in zip(reference, candidate)]
        if pairs and pairs[0][0].dtype.kind in "fc" and all(r.shape == c.shape for r, c in pairs):
            m = OutputMetrics(name)
            for r, c in pairs:
                m.update(r, c)
            row = m.as_dict()
            flat.update({f"{name}.cosine": row["cosine_mean"], f"{name}.sqnr_db": row["sqnr_db"],
                         f"{name}.max_abs_error": row["max_abs_error"]})
        else:
            exact = [r.shape == c.shape and np.array_equal(r, c) for r, c in pairs]
            same = sum(int(np.sum(r.ravel()[:min(r.size, c.size)] == c.ravel()[:min(r.size, c.size)]))
                       for r, c in pairs)
            longer = sum(max(r.size, c.size) for r, c in pairs)
            row = {"name": name, "samples": len(pairs), "exact_match": float(np.mean(exact)) if exact else None,
                   "agreement": same / longer if longer else 1.0}
            flat.update({f"{name}.exact_match": row["exact_match"], f"{name}.agreement": row["agreement"]})
        rows.append(row)
    return rows, flat


def format_summary(rep: dict) -> str:
    """The lines ``edgeq run`` prints."""
    lines = [f"pipeline {rep['pipeline']['name']}: {len(rep['stages'])} stages"]
    for s in rep["stages"]:
        cal = s["calibration"]
        size = f"{s['model']['size_bytes'] / 1e6:.2f} MB -> {s['output']['size_bytes'] / 1e6:.2f} MB"
        how = f"{s['target']}" if s["quantized"] else "float (copied)"
        line = f"  {s['name']:<16} {how:<10} {size}, calibrated on {cal['feeds']} feeds"
        v = s.get("validation")
        if v:
            worst = min(v["outputs"], key=lambda o: o["cosine_mean"])
            line += f"; vs FP32 (FP32 inputs): cosine {worst['cosine_mean']:.4f}, SQNR {worst['sqnr_db']:.1f} dB" \
                if isinstance(worst["sqnr_db"], float) else ""
        fallback = (s.get("report") or {}).get("fallback")
        if fallback:
            line += f"; fallback kept {len(fallback['float_nodes']) + len(fallback['wide_nodes'])} layers off int8"
        if "compiled" in s:
            line += f"; compiled -> {s['compiled']['path']}"
        lines.append(line)
    e2e = rep.get("end_to_end")
    if e2e:
        lines.append(f"end to end on {e2e['samples']} evaluation samples:")
        for k, v in e2e["metrics"].items():
            lines.append(f"  {k:<28} {v:.4f}" if isinstance(v, float) else f"  {k:<28} {v}")
        lat = e2e.get("latency_ms")
        if lat and lat["fp32"]:
            lines.append(f"  latency per sample (ORT CPU, median): fp32 {lat['fp32']['median_per_sample']:.1f} ms, "
                         f"quantized {lat['quantized']['median_per_sample']:.1f} ms")
        size = e2e["size_bytes"]
        lines.append(f"  size: fp32 {size['fp32'] / 1e6:.2f} MB, quantized {size['quantized'] / 1e6:.2f} MB")
    if rep["passed"] is not None:
        lines.append("PASSED" if rep["passed"] else "FAILED: " + "; ".join(rep["failures"]))
    lines.append(f"wrote {Path(rep['stages'][0]['output']['path']).parent / 'report.json'}")
    return "\n".join(lines)
