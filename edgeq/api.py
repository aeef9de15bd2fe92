"""The Python API behind every CLI command.

Data flows one way: load -> canonicalise -> calibrate -> passes (from the profile) -> save -> check -> validate ->
report. Each function validates its inputs before doing work and never modifies the input model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from edgeq.calibration.calibrate import calibrate as run_calibration, graph_fingerprint, progress_printer
from edgeq.calibration.data import model_inputs, open_dataset
from edgeq.calibration.stats import CalibrationStats
from edgeq.errors import CalibrationDataError, EdgeqError, ProfileError, UnsupportedModelError
from edgeq.ir import to_graph, to_model
from edgeq.large_model import LARGE_MODEL_BYTES, WeightSpill, release_memory
from edgeq.model_io import (check_output_path, default_opset, ensure_opset, load_model, model_size_bytes, save_model,
                            staged_output)
from edgeq.pass_base import PassContext, PassManager, make_pass
from edgeq.precision import post_passes
from edgeq.profiles import TargetProfile, Thresholds, load_profile
from edgeq.quant_math import required_opset
from edgeq.report import SCHEMA, SampleDigest, sha256_file, tool_versions, write_report

log = logging.getLogger(__name__)

CANONICAL_PASSES = ("infer_shapes", "fold_constants", "remove_identity", "fold_batchnorm", "fold_pad", "infer_shapes")


@dataclass
class QuantizeResult:
    output: Path
    report: dict
    passed: bool | None  # None when no evaluation data was given

    @property
    def skipped(self) -> list[dict]:
        return self.report["skipped"]


def resolve_profile(target: str | Path | TargetProfile, *, min_cosine: float | None = None,
                    min_sqnr: float | None = None) -> TargetProfile:
    profile = target if isinstance(target, TargetProfile) else load_profile(target)
    return dataclasses.replace(profile, thresholds=override_thresholds(profile.thresholds, min_cosine, min_sqnr))


def override_thresholds(thr: Thresholds, min_cosine: float | None, min_sqnr: float | None) -> Thresholds:
    """``thr`` with the given overrides, checked like profile values (a ProfileError, e.g. for nan)."""
    changes = {k: v for k, v in (("min_cosine", min_cosine), ("min_sqnr_db", min_sqnr)) if v is not None}
    try:
        return dataclasses.replace(thr, **changes)
    except ValueError as exc:
        raise ProfileError(f"threshold override: {exc}") from None


def canonicalize(model: onnx.ModelProto, *, dump_dir: Path | None = None) -> tuple[onnx.ModelProto, PassManager]:
    """Shape inference, constant folding, Identity/Dropout removal and BatchNorm folding (all exact)."""
    graph = to_graph(model)
    manager = PassManager(dump_dir=dump_dir)
    manager.run(graph, [make_pass(n) for n in CANONICAL_PASSES], PassContext())
    return to_model(graph, model), manager


def quantize_opset(profile: TargetProfile, model: onnx.ModelProto) -> int:
    need = max(profile.min_opset, required_opset(profile.activations.dtype) if profile.placement.mode != "weights"
               else 0, required_opset(profile.weights.dtype))
    if profile.weights.block_size:
        need = max(need, 21)
    for ov in profile.overrides:
        if ov.precision in ("int16", "uint16"):
            need = max(need, 21)
    return max(need, default_opset(model))


def calibrate(model: str | Path | onnx.ModelProto, calib: Any, *, stats_out: str | Path | None = None,
              preprocess: str | Path | None = None, max_samples: int | None = None, progress: bool = False,
              tensors: list[str] | None = None) -> CalibrationStats:
    """Run calibration alone (``edgeq calibrate``); returns (and optionally saves) the statistics."""
    if stats_out is not None:
        check_output_path(stats_out, *([model] if isinstance(model, (str, Path)) else []))
    m = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    data = open_dataset(calib, model_inputs(m), preprocess=preprocess, limit=max_samples)
    total = data.length
    digest = _DataHash(calib, data)
    stats = run_calibration(m, digest.stream, tensors=tensors, total=total,
                            progress=progress_printer("calibrating") if progress else None)
    stats.data_fingerprint = digest.sha256 or ""
    if stats_out is not None:
        stats.save(stats_out)
    return stats


class _DataHash:
    """The SHA-256 a report gives for data: of the file or folder when there is one, else of the samples
    themselves (a callable, ``module:function`` or a list), hashed as they stream through ``stream``."""

    def __init__(self, spec: Any, data: Any):
        path = Path(spec) if isinstance(spec, (str, Path)) else None
        if path is not None and path.exists():
            self.source, self.file_sha = ("folder" if path.is_dir() else "file"), sha256_file(path)
        else:
            self.source, self.file_sha = ("samples" if isinstance(spec, (list, tuple)) else "callable"), None
        self.stream = data if self.file_sha else SampleDigest(data)

    @property
    def sha256(self) -> str | None:
        return self.file_sha or getattr(self.stream, "hexdigest", None)


def quantize(model: str | Path, *, target: str | Path | TargetProfile, calib: Any, output: str | Path,
             eval_data: Any = None, report: str | Path | None = None, stats: str | Path | None = None,
             preprocess: str | Path | None = None, max_calib_samples: int | None = None,
             min_cosine: float | None = None, min_sqnr: float | None = None, progress: bool = False,
             dump_dir: str | Path | None = None, latency_runs: int = 20, precision_plan: Any = None,
             check: bool = True, seed: int = 0, fallback: Any = False,
             time_limit_s: float | None = None) -> QuantizeResult:
    """Quantize ``model`` for ``target`` using ``calib`` data; validate on ``eval_data`` when given.

    ``fallback`` (True or an :class:`edgeq.precision.FallbackOptions`) keeps the fewest, most sensitive layers in
    float until the profile's thresholds hold on the calibration data, within ``time_limit_s`` (see
    :func:`edgeq.precision.auto_fallback`; the report's ``fallback`` entry has the trade-off curve).
    """
    t0 = time.perf_counter()
    profile = resolve_profile(target, min_cosine=min_cosine, min_sqnr=min_sqnr)
    out = check_output_path(output, model)
    if report is not None:
        check_output_path(report, model)
    if stats is not None and not Path(stats).exists():
        check_output_path(stats, model)
    large = _file_bytes(model) >= LARGE_MODEL_BYTES  # weights stay on disk, read when a pass needs them
    original = load_model(model, load_external_data=not large)
    inputs = model_inputs(original)
    calib_data = open_dataset(calib, inputs, preprocess=preprocess, limit=max_calib_samples)
    eval_ds = open_dataset(eval_data, inputs, preprocess=preprocess, what="evaluation data") \
        if eval_data is not None else None
    calib_hash = _DataHash(calib, calib_data)
    eval_hash = _DataHash(eval_data, eval_ds) if eval_ds is not None else None
    if eval_ds is not None and calib_data.fingerprint and calib_data.fingerprint == eval_ds.fingerprint:
        log.warning("evaluation data is the calibration data: fidelity will look better than it is")
    if profile.static_shapes:
        _require_static(original, profile)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    canonical, canon_manager = canonicalize(original, dump_dir=Path(dump_dir) / "canonical" if dump_dir else None)
    if large and default_opset(canonical) < quantize_opset(profile, canonical):
        raise UnsupportedModelError(f"the {profile.name} profile needs opset {quantize_opset(profile, canonical)}; "
                                    f"models over {LARGE_MODEL_BYTES >> 30} GB are not converted in place: "
                                    f"re-export at that opset")
    canonical = ensure_opset(canonical, quantize_opset(profile, canonical),
                             why=f"the {profile.name} profile ({profile.activations.dtype} activations, "
                                 f"{profile.weights.dtype} weights, per-channel)")
    timings["canonicalize_s"] = time.perf_counter() - start

    manager = PassManager(dump_dir=Path(dump_dir) if dump_dir else None)
    graph_passes = [make_pass(s.name, s.options, source=profile.source) for s in profile.passes]
    calib_stats: CalibrationStats | None = None
    start = time.perf_counter()
    if graph_passes:
        wanted = [p.stats_tensors(canonical, profile) for p in graph_passes if getattr(p, "needs_stats", False)]
        tensors = None if any(w is None for w in wanted) else sorted(set().union(*wanted))
        pre_stats = None
        if wanted and tensors != []:
            pre_stats = run_calibration(canonical, calib_hash.stream, total=calib_data.length, tensors=tensors,
                                        per_channel=_channel_tensors(canonical, graph_passes, profile),
                                        progress=progress_printer("calibrating (pre-pass)") if progress else None)
        graph = to_graph(canonical)
        manager.run(graph, graph_passes, PassContext(profile=profile, stats=pre_stats, precision=precision_plan))
        canonical = to_model(graph, canonical)
    timings["graph_passes_s"] = time.perf_counter() - start

    start = time.perf_counter()
    fingerprint = graph_fingerprint(canonical)
    if stats is not None and Path(stats).exists():
        calib_stats = CalibrationStats.load(stats)
        if calib_stats.model_fingerprint != fingerprint:
            raise CalibrationDataError(f"statistics file {stats} was computed for a different model or profile; "
                                       f"delete it or choose another --stats path to recalibrate")
    else:
        calib_stats = run_calibration(canonical, calib_hash.stream, total=calib_data.length,
                                      progress=progress_printer("calibrating") if progress else None)
        calib_stats.data_fingerprint = calib_hash.sha256 or ""
        if stats is not None:
            calib_stats.save(stats)
    timings["calibrate_s"] = time.perf_counter() - start
    moments = None
    if profile.weights.rounding == "gptq" and profile.placement.mode != "none":
        from edgeq.calibration.moments import collect_moments
        from edgeq.precision import name_all_nodes

        start = time.perf_counter()
        canonical = name_all_nodes(canonical)  # moments are keyed by the node names insert_qdq will see
        moments = collect_moments(canonical, calib_hash.stream, seed=seed, total=calib_data.length,
                                  progress=progress_printer("measuring layer inputs") if progress else None)
        timings["input_moments_s"] = time.perf_counter() - start
    if large:
        release_memory()

    fallback_result = None
    if fallback:
        from edgeq.precision import fallback_for_pipeline

        start = time.perf_counter()
        canonical, fallback_result = fallback_for_pipeline(canonical, profile, calib_stats, calib_data,
                                                           fallback=fallback, time_limit_s=time_limit_s,
                                                           base_plan=precision_plan, template=original,
                                                           moments=moments)
        precision_plan = fallback_result.plan
        timings["fallback_s"] = time.perf_counter() - start

    start = time.perf_counter()
    graph = to_graph(canonical)
    spill = WeightSpill() if large else None  # removed after saving (or when this call fails)
    post = post_passes(profile, source=profile.source)  # fp16 overrides mean float16, not float32
    manager.run(graph, [make_pass("insert_qdq"), *post],
                PassContext(profile=profile, stats=calib_stats, precision=precision_plan, moments=moments,
                            spill=spill))
    moments = None  # the rounding is done; large models' moments are a large share of memory
    qmodel = None
    if not large:
        qmodel = to_model(graph, original)
        del graph
    else:
        release_memory()
    timings["insert_qdq_s"] = time.perf_counter() - start
    lint = None
    val = None
    with staged_output(out) as staged:  # the output appears only after validation, the last step that can fail
        if qmodel is not None:
            save_model(qmodel, staged, inputs=(model,))
        else:  # weights go from the graph straight to the file; the model kept for the report only refers to them
            from edgeq.large_model import save_streaming

            save_streaming(graph, original, staged)
            del graph
            spill.close()
            release_memory()
            qmodel = onnx.load(str(staged), load_external_data=False)  # relative references, read by lint
        if check:
            from edgeq.lint import check_model as lint_model

            lint = lint_model(qmodel, profile, path=str(staged))
        if eval_ds is not None:
            from edgeq.validation import compare

            start = time.perf_counter()
            val = compare(model, staged, eval_hash.stream, thresholds=profile.thresholds, latency_runs=latency_runs,
                          progress=progress_printer("validating") if progress else None, total=eval_ds.length)
            timings["validate_s"] = time.perf_counter() - start
    records = canon_manager.records + manager.records
    rep: dict[str, Any] = {
        "schema": SCHEMA,
        "command": "quantize",
        "passed": None,
        "model": {"path": str(model), "sha256": sha256_file(model), "size_bytes": model_size_bytes(model),
                  "opset": default_opset(original)},
        "output": {"path": str(out), "sha256": sha256_file(out), "size_bytes": model_size_bytes(out),
                   "opset": default_opset(qmodel)},
        "profile": {**profile.to_dict(), "source": profile.source},
        "profile_sha256": _profile_hash(profile),
        "calibration": {"samples": calib_stats.samples, "data_sha256": _sha_or_none(calib_stats.data_fingerprint),
                        "source": calib_hash.source, "max_samples": max_calib_samples,
                        "preprocess_sha256": sha256_file(preprocess) if preprocess else None,
                        "stats_sha256": sha256_file(stats) if stats is not None else None,
                        "observer": profile.activations.observer},
        "passes": [{"name": r.name, "seconds": round(r.seconds, 4), "changed": r.changed, "rewrites": r.rewrites,
                    "notes": r.notes} for r in records],
        "skipped": [{"pass": s.pass_name, "target": s.target, "reason": s.reason} for r in records for s in r.skipped],
        "quantization": quantization_summary(qmodel),
        "lint": lint.as_dict() if lint is not None else None,
        "timings": timings,
        "fallback": fallback_result.as_dict() if fallback_result is not None else None,
        "seed": seed,
        "versions": tool_versions(),
    }
    passed = None
    if val is not None:
        rep["validation"] = val.as_dict()
        rep["eval_data_sha256"] = eval_hash.sha256
        passed = val.passed
        rep["passed"] = passed
    timings["total_s"] = time.perf_counter() - t0
    if report is not None:
        write_report(rep, report)
    return QuantizeResult(output=out, report=rep, passed=passed)


def _file_bytes(model: str | Path) -> int:
    """Size of the model with its external data; 0 when unreadable (load_model then says why)."""
    try:
        return model_size_bytes(model)
    except OSError:
        return 0


def _sha_or_none(fingerprint: str) -> str | None:
    """Statistics files from before edgeq hashed every data source may hold a name instead of a digest."""
    return fingerprint if len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint) else None


def _profile_hash(profile: TargetProfile) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(profile.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def _channel_tensors(model: onnx.ModelProto, passes=(), profile=None) -> dict[str, int]:
    """Activation inputs of MatMul/Gemm (channels on the last axis) and of Conv (axis 1), with their channel axis:
    SmoothQuant and defer_softmax_normalization read their per-channel ranges. A tensor read by both kinds keeps the
    last axis. Then what each pass asks for besides (``GraphPass.channel_tensors``)."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.input and n.input[0] not in inits:
            out[n.input[0]] = -1
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input and n.input[0] not in inits:
            out.setdefault(n.input[0], 1)
    for p in passes:
        if getattr(p, "needs_stats", False):
            for name, axis in p.channel_tensors(model, profile).items():
                out.setdefault(name, axis)
    return out


def _require_static(model: onnx.ModelProto, profile: TargetProfile) -> None:
    dynamic = []
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            dynamic.append(vi.name)
    if dynamic:
        log.info("profile %s wants static shapes; inputs %s are dynamic (calibration shapes are used; "
                 "fix them with 'edgeq compile --input-shape' for the device)", profile.name, ", ".join(dynamic))


def quantization_summary(model: onnx.ModelProto) -> dict:
    """Counts of quantized compute ops and Q/DQ nodes, by dtype and granularity."""
    from edgeq.inspect import quantized_tensors

    q = quantized_tensors(model)
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")
               or (n.op_type == "MatMulNBits" and n.domain == "com.microsoft")]
    producers = {o: n for n in model.graph.node for o in n.output}

    def fed_by_dq(name: str) -> bool:
        p = producers.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    int8_compute = [n for n in compute if len(n.input) > 1 and fed_by_dq(n.input[0]) and fed_by_dq(n.input[1])]
    weight_only = [n for n in compute if n.op_type == "MatMulNBits" or  # packed int4 weights
                   (len(n.input) > 1 and fed_by_dq(n.input[1]) and not fed_by_dq(n.input[0]))]
    half = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    half |= {v.name for v in list(model.graph.value_info) + list(model.graph.output)
             if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    half |= {n.output[0] for n in model.graph.node if n.op_type == "Cast" and any(
        a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)}
    return {"compute_ops": len(compute), "compute_ops_quantized": len(int8_compute),
            "compute_ops_weight_only": len(weight_only),
            "compute_ops_float16": sum(1 for n in compute if n.input and n.input[0] in half),
            "quantized_compute_fraction": len(int8_compute) / len(compute) if compute else None,
            "float_compute_ops": [f"{n.op_type} {n.name}" for n in compute if n not in int8_compute
                                  and n not in weight_only],
            "quantize_nodes": sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear"),
            "dequantize_nodes": sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear"),
            "tensors": q}


def validate(reference: str | Path, candidate: str | Path, *, data: Any, target: str | Path | None = None,
             report: str | Path | None = None, backend: str = "ort", min_cosine: float | None = None,
             min_sqnr: float | None = None, preprocess: str | Path | None = None, latency_runs: int = 20,
             soc: str | None = None, progress: bool = False):
    """Compare ``candidate`` with ``reference`` on ``data``; ``result.passed`` says whether thresholds hold."""
    from edgeq.validation import compare

    profile = resolve_profile(target or "tensorrt", min_cosine=min_cosine, min_sqnr=min_sqnr) if target else None
    thresholds = override_thresholds(profile.thresholds if profile else Thresholds(), min_cosine, min_sqnr)
    if report is not None:
        check_output_path(report, reference, candidate)
    ref = load_model(reference)
    load_model(candidate, check=False)
    ds = open_dataset(data, model_inputs(ref), preprocess=preprocess, what="evaluation data")
    if backend == "qnn" and soc is None:  # the x86 HTP emulator needs a target; use the profile's default
        soc = (profile if profile and profile.compile.backend == "qnn" else load_profile("qnn")).compile.soc
    data_hash = _DataHash(data, ds)
    result = compare(reference, candidate, data_hash.stream, thresholds=thresholds, backend=backend, latency_runs=latency_runs,
                     soc=soc, progress=progress_printer("validating") if progress else None, total=ds.length)
    rep = {"schema": SCHEMA, "command": "validate", "passed": result.passed,
           "reference": {"path": str(reference), "sha256": sha256_file(reference)},
           "candidate": {"path": str(candidate), "sha256": sha256_file(candidate)},
           "profile": profile.to_dict() if profile else None,
           "profile_sha256": _profile_hash(profile) if profile else None, "validation": result.as_dict(),
           "data_sha256": data_hash.sha256, "versions": tool_versions()}
    if report is not None:
        write_report(rep, report)
    result.report = rep  # type: ignore[attr-defined]
    return result


def inspect_model(model: str | Path) -> dict:
    from edgeq.inspect import describe

    return describe(model)


def check(model: str | Path, *, target: str | Path | TargetProfile, input_shapes: dict | None = None):
    """Legality for ``target``; ``input_shapes`` fixes dynamic inputs first, as ``compile_model`` does."""
    from edgeq.lint import check_model as lint_model

    profile = resolve_profile(target)
    qmodel = load_model(model, check=False)
    if input_shapes:
        from edgeq.compile import fix_input_shapes

        qmodel = fix_input_shapes(qmodel, input_shapes)
    return lint_model(qmodel, profile, path=str(model))


def compile_model(model: str | Path, *, target: str | Path | TargetProfile, output: str | Path, **options):
    from edgeq.compile import compile_for_target

    profile = resolve_profile(target)
    return compile_for_target(Path(model), profile, Path(output), **options)


def demo(*, output_dir: str | Path | None = None, target: str = "tensorrt", progress: bool = False) -> dict:
    """The whole job on the bundled digits example: quantize, validate, compare accuracy and size."""
    from edgeq.example import run_demo

    return run_demo(output_dir=output_dir, target=target, progress=progress)


__all__ = ["quantize", "validate", "inspect_model", "check", "compile_model", "calibrate", "demo",
           "QuantizeResult", "UnsupportedModelError", "EdgeqError"]
