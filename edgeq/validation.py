"""Validation: run the reference (FP32) and the candidate model on evaluation data and compare every output.

The ONNX Runtime CPU run of a QDQ model is an exact simulation of the integer arithmetic the target performs
(``session.qdq_matmulnbits_accuracy_level=1`` keeps ORT from fusing DQ+MatMul into an approximate kernel); the
``qnn`` backend runs the candidate on the QNN HTP emulator instead. Thresholds come from the profile and can be
overridden. Latency (median, p90) and file sizes of both models are measured too.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from edgeq.calibration.calibrate import make_session
from edgeq.errors import CalibrationDataError, EdgeqError
from edgeq.large_model import LARGE_MODEL_BYTES
from edgeq.metrics import OutputMetrics
from edgeq.model_io import load_model, model_size_bytes
from edgeq.profiles import Thresholds

log = logging.getLogger(__name__)


@dataclass
class ValidationResult:
    passed: bool
    outputs: list[dict]
    failures: list[str]
    thresholds: dict
    samples: int
    backend: str
    latency_ms: dict = field(default_factory=dict)
    size_bytes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "backend": self.backend, "samples": self.samples,
                "thresholds": self.thresholds, "failures": self.failures, "outputs": self.outputs,
                "latency_ms": self.latency_ms, "size_bytes": self.size_bytes}


def _ort_runner(path: Path, threads: int) -> Callable[[dict], list[np.ndarray]]:
    load_model(path, check=False, load_external_data=False)  # a clear error for a bad file, weights untouched
    session = make_session(Path(path), threads=threads, optimize="all")
    names = [o.name for o in session.get_outputs()]

    def run(feed: dict) -> list[np.ndarray]:
        return session.run(names, feed)

    run.output_names = names  # type: ignore[attr-defined]
    run.session = session  # type: ignore[attr-defined]
    return run


def candidate_runner(path: Path, backend: str, *, threads: int = 0, soc: str | None = None):
    if backend == "ort":
        return _ort_runner(path, threads)
    if backend == "qnn":
        from edgeq.backends import qnn

        return qnn.make_runner(path, options=qnn.QnnOptions.for_soc(soc))
    if backend == "coreml":
        from edgeq.backends import coreml

        if not coreml.predict_available():
            raise EdgeqError("Core ML prediction needs macOS; on this platform validate with --backend ort "
                             "(the QDQ model) and check the package with 'edgeq compile -t coreml'")
        return coreml.make_runner(path)
    if backend == "tensorrt":
        from edgeq.backends import tensorrt

        return tensorrt.make_runner(path)
    raise EdgeqError(f"unknown backend {backend!r}; choose ort, qnn, coreml or tensorrt")


def compare(reference: str | Path, candidate: str | Path, data: Iterable[dict], *, thresholds: Thresholds,
            backend: str = "ort", latency_runs: int = 20, threads: int = 0, soc: str | None = None,
            progress: Callable[[int, int | None], None] | None = None, total: int | None = None,
            ) -> ValidationResult:
    if model_size_bytes(reference) >= LARGE_MODEL_BYTES:
        return _compare_large(reference, candidate, data, thresholds=thresholds, backend=backend,
                              latency_runs=latency_runs, threads=threads, soc=soc, progress=progress, total=total)
    ref_run = _ort_runner(Path(reference), threads)
    cand_run = candidate_runner(Path(candidate), backend, threads=threads, soc=soc)
    ref_names = ref_run.output_names
    cand_names = getattr(cand_run, "output_names", ref_names)
    _check_outputs(ref_names, cand_names)
    metrics = {n: OutputMetrics(n) for n in ref_names}
    first_feed = None
    count = 0
    for feed in data:
        if first_feed is None:
            first_feed = feed
        try:
            ref_out = ref_run(feed)
        except Exception as exc:
            raise CalibrationDataError(f"reference model failed on evaluation sample {count}: "
                                       f"{str(exc).splitlines()[0][:300]}") from None
        cand_out = _run_candidate(cand_run, cand_names, feed, count)
        for name, value in zip(ref_names, ref_out):
            _update(metrics[name], value, cand_out[name])
        count += 1
        if progress:
            progress(count, total)
    result = _result(metrics, count, thresholds, backend)
    if getattr(cand_run, "emulated", False):  # an emulator's speed says nothing about the device: not timed
        latency_runs = 0
    if latency_runs and first_feed is not None:
        result.latency_ms = {"reference": measure_latency(ref_run, first_feed, latency_runs),
                             "candidate": measure_latency(cand_run, first_feed, latency_runs)}
        r, c = result.latency_ms["reference"]["median"], result.latency_ms["candidate"]["median"]
        result.latency_ms["speedup"] = r / c if c > 0 else None
    result.size_bytes = {"reference": model_size_bytes(reference), "candidate": model_size_bytes(candidate)}
    return result


def _compare_large(reference, candidate, data, *, thresholds, backend, latency_runs, threads, soc, progress,
                   total) -> ValidationResult:
    """A reference over the large-model size runs in segments (:mod:`edgeq.calibration.segments`) on the stored
    samples, so that its weights are never in memory at once, and so does an ONNX Runtime candidate over that size
    (a float16 one: ONNX Runtime CPU would widen its weights back to float32). A segmented model's latency is not
    measured; a candidate run whole is timed."""
    from edgeq.calibration.segments import SampleStore, run_segmented

    ref_model = load_model(reference, check=False, load_external_data=False)
    inits = {i.name for i in ref_model.graph.initializer}
    ref_names = [o.name for o in ref_model.graph.output]
    segmented = backend == "ort" and model_size_bytes(candidate) >= LARGE_MODEL_BYTES
    if segmented:
        cand_model = load_model(candidate, check=False, load_external_data=False)
        cand_run, cand_names = None, [o.name for o in cand_model.graph.output]
    else:
        cand_run = candidate_runner(Path(candidate), backend, threads=threads, soc=soc)
        cand_names = getattr(cand_run, "output_names", ref_names)
    _check_outputs(ref_names, cand_names)
    metrics = {n: OutputMetrics(n) for n in ref_names}
    store = SampleStore()
    feed_names: list[str] = []
    first_feed = None
    count = 0
    try:
        for feed in data:
            if first_feed is None:
                first_feed, feed_names = feed, [n for n in feed if n not in inits]
            for name in feed_names:
                store.put(count, f"input:{name}", feed[name])
            if cand_run is not None:
                cand_out = _run_candidate(cand_run, cand_names, feed, count)
                for name in ref_names:
                    store.put(count, f"candidate:{name}", cand_out[name])
                del cand_out
            count += 1
            if progress:
                progress(count, total)
        if count == 0:
            raise CalibrationDataError("evaluation data contains no samples")

        def stored_feeds():
            return ({n: store.get(i, f"input:{n}") for n in feed_names} for i in range(count))

        def keep(i: int, values: dict[str, np.ndarray]) -> None:
            for name, value in values.items():
                store.put(i, f"candidate:{name}", value)

        if segmented:
            try:
                run_segmented(cand_model, stored_feeds(), ref_names, keep, what="evaluation")
            except CalibrationDataError as exc:
                raise EdgeqError(f"candidate model: {exc}") from None
        latency: dict = {}
        note = "over the large-model size, run in segments to bound memory: latency not measured"
        if latency_runs and cand_run is not None and not getattr(cand_run, "emulated", False):
            latency = {"reference": None, "candidate": measure_latency(cand_run, first_feed, latency_runs),
                       "speedup": None, "note": f"the reference is {note}"}
        elif latency_runs and segmented:
            latency = {"note": f"reference and candidate are {note}"}
        del cand_run

        def visit(i: int, values: dict[str, np.ndarray]) -> None:
            for name, value in values.items():
                _update(metrics[name], value, store.get(i, f"candidate:{name}"))

        run_segmented(ref_model, stored_feeds(), ref_names, visit, what="evaluation")
    finally:
        store.close()
    result = _result(metrics, count, thresholds, backend)
    result.latency_ms = latency
    result.size_bytes = {"reference": model_size_bytes(reference), "candidate": model_size_bytes(candidate)}
    return result


def _check_outputs(ref_names: list[str], cand_names: list[str]) -> None:
    missing = [n for n in ref_names if n not in cand_names]
    if missing:
        raise EdgeqError(f"the candidate model lacks output(s) {', '.join(missing)} of the reference")


def _run_candidate(cand_run, cand_names: list[str], feed: dict, count: int) -> dict[str, np.ndarray]:
    try:
        return dict(zip(cand_names, cand_run(feed)))
    except EdgeqError:
        raise
    except Exception as exc:
        raise EdgeqError(f"candidate model failed on evaluation sample {count}: "
                         f"{str(exc).splitlines()[0][:300]}") from None


def _update(metric: OutputMetrics, reference: np.ndarray, candidate: np.ndarray) -> None:
    try:
        metric.update(reference, candidate)
    except ValueError as exc:
        raise EdgeqError(str(exc)) from None


def _result(metrics: dict[str, OutputMetrics], count: int, thresholds: Thresholds, backend: str) -> ValidationResult:
    if count == 0:
        raise CalibrationDataError("evaluation data contains no samples")
    outputs = [m.as_dict() for m in metrics.values()]
    failures = check_thresholds(outputs, thresholds)
    return ValidationResult(passed=not failures, outputs=outputs, failures=failures,
                            thresholds=_thr_dict(thresholds), samples=count, backend=backend)


def _thr_dict(t: Thresholds) -> dict:
    return {"min_cosine": t.min_cosine, "min_sqnr_db": t.min_sqnr_db, "max_abs_error": t.max_abs_error,
            "min_top1_agreement": t.min_top1_agreement}


def check_thresholds(outputs: list[dict], t: Thresholds) -> list[str]:
    failures = []
    for o in outputs:
        if o["nonfinite_values"]:
            failures.append(f"{o['name']}: {o['nonfinite_values']} non-finite values in the candidate output")
        if not o["cosine_mean"] >= t.min_cosine:
            failures.append(f"{o['name']}: cosine {o['cosine_mean']:.4f} < {t.min_cosine}")
        if not o["sqnr_db"] >= t.min_sqnr_db:
            failures.append(f"{o['name']}: SQNR {o['sqnr_db']:.1f} dB < {t.min_sqnr_db} dB")
        if t.max_abs_error is not None and not o["max_abs_error"] <= t.max_abs_error:
            failures.append(f"{o['name']}: max abs error {o['max_abs_error']:.4g} > {t.max_abs_error}")
        if t.min_top1_agreement is not None and "top1_agreement" in o and \
                not o["top1_agreement"] >= t.min_top1_agreement:
            failures.append(f"{o['name']}: top-1 agreement {o['top1_agreement']:.3f} < {t.min_top1_agreement}")
    return failures


def measure_latency(run: Callable[[dict], list], feed: dict, runs: int) -> dict:
    for _ in range(min(3, runs)):
        run(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feed)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {"median": statistics.median(times), "p90": times[min(len(times) - 1, int(0.9 * len(times)))],
            "runs": runs}


def iter_outputs(run, data: Iterable[dict]) -> Iterator[list[np.ndarray]]:
    for feed in data:
        yield run(feed)
