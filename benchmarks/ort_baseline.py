"""The onnxruntime.quantization baseline (the number edgeq has to beat), one quantization per process.

    python -m benchmarks.ort_baseline --model X.onnx --calib CALIB --out Y.onnx [--mode MODE] [--report R.json]

Modes (``/work/shared/models/README.md`` defines the baseline):

* ``static`` (default): ``quant_pre_process`` then ``quantize_static`` with QDQ, per-channel weights, QUInt8
  activations, QInt8 weights and MinMax calibration over CALIB (a stacked ``.npz`` or a directory of ``.npz``;
  feeds go in one at a time, so shapes may differ).
* ``dynamic``: ``quant_pre_process`` then ``quantize_dynamic`` with per-channel QInt8 weights (no CALIB).
* ``static_exclude_worst``: as ``static``, then for every node that was quantized, quantize again with that one
  node left in float and keep the variant whose first output is closest to FP32 (SQNR) on the *calibration*
  feeds. Costs one quantization per quantized node, so it refuses graphs with more than ``--max-candidates``.

When ``quant_pre_process`` fails, the un-preprocessed model is quantized instead and the report says so. All
work happens in a temporary directory (ORT leaves files in the working directory when pre-processing fails).
The report (JSON, default ``<out>.json``) records the mode, pre-processing outcome and quantize time.

:func:`quantize_in_subprocess` runs this CLI as a child and returns its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import feeds

log = logging.getLogger(__name__)

MODES = ("static", "dynamic", "static_exclude_worst", "static_external_data")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class FeedReader:
    """A ``CalibrationDataReader`` over either feed layout (duck-typed: ORT only calls ``get_next``)."""

    def __init__(self, path: Path):
        self.path = path
        self._iter = feeds.iter_feeds(path)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = feeds.iter_feeds(self.path)


@contextmanager
def _scratch_dir():
    """Run inside a fresh temporary directory that also serves as ``tempfile``'s default location."""
    previous_cwd, previous_tmp = os.getcwd(), tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="edgeq-ort-baseline-") as scratch:
        os.chdir(scratch)
        tempfile.tempdir = scratch
        try:
            yield Path(scratch)
        finally:
            tempfile.tempdir = previous_tmp
            os.chdir(previous_cwd)


def preprocess(model: Path, scratch: Path) -> tuple[Path, str]:
    """``quant_pre_process`` into ``scratch``; on failure the original model and the reason."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = scratch / "preprocessed.onnx"
    try:
        quant_pre_process(str(model), str(out))
        return out, "ok"
    except Exception as exc:  # ORT raises assorted types here (shape inference, ONNX checker)
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log.warning("quant_pre_process failed (%s); quantizing the un-preprocessed model", message)
        return model, f"failed, quantized the un-preprocessed model ({message})"


def quantize_static_default(model: Path, calib: Path, out: Path, nodes_to_exclude: list[str] | None = None,
                            external_data: bool = False) -> None:
    """The default static QDQ; ``external_data`` adds the option models over 2 GB need (not a default)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(model), str(out), FeedReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=nodes_to_exclude or [],
                    use_external_data_format=external_data)


def quantize_dynamic_default(model: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(out), per_channel=True, weight_type=QuantType.QInt8)


def quantized_nodes(path: Path) -> list[str]:
    """Names of the non-Q/DQ nodes that read a DequantizeLinear output, i.e. the nodes ORT quantized."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node
            if n.op_type not in _QDQ_OPS and n.name and any(i in dequantized for i in n.input)]


def _first_output_sqnr(reference: list[np.ndarray], path: Path, samples: list[dict]) -> float:
    from .runtime import make_session

    session = make_session(path)
    name = session.get_outputs()[0].name
    ref = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    out = np.concatenate([session.run([name], s)[0].ravel() for s in samples]).astype(np.float64)
    noise = float(np.sum((ref - out) ** 2))
    return float("inf") if noise == 0.0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def exclude_worst_node(model: Path, calib: Path, out: Path, scratch: Path, max_candidates: int) -> dict:
    """Quantize statically, then find the single node whose exclusion helps most (scored on calibration data)."""
    from .runtime import make_session

    full = scratch / "full.onnx"
    quantize_static_default(model, calib, full)
    candidates = quantized_nodes(full)
    if len(candidates) > max_candidates:
        raise SystemExit(f"error: {len(candidates)} quantized nodes exceed --max-candidates {max_candidates}; "
                         f"the one-node-at-a-time search would run {len(candidates)} quantizations")
    samples = feeds.load_feeds(calib)
    session = make_session(model)
    first = session.get_outputs()[0].name
    reference = [session.run([first], s)[0] for s in samples]
    scores = {"": _first_output_sqnr(reference, full, samples)}
    for i, node in enumerate(candidates):
        trial = scratch / f"exclude_{i}.onnx"
        quantize_static_default(model, calib, trial, nodes_to_exclude=[node])
        scores[node] = _first_output_sqnr(reference, trial, samples)
        log.info("excluding %s: calibration SQNR %.2f dB", node, scores[node])
        if node != max(scores, key=scores.get):
            trial.unlink()
    best = max(scores, key=scores.get)
    chosen = full if best == "" else scratch / f"exclude_{candidates.index(best)}.onnx"
    os.replace(chosen, out)
    return {"excluded_node": best or None, "calib_sqnr_db_full": scores[""], "calib_sqnr_db_best": scores[best],
            "candidates": len(candidates)}


def quantize(model: Path, out: Path, mode: str = "static", calib: Path | None = None,
             max_candidates: int = 64) -> dict:
    """Run one baseline quantization in-process (inside a scratch directory); returns the report."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode != "dynamic" and calib is None:
        raise ValueError(f"mode {mode!r} needs calibration data")
    model, out = Path(model).resolve(), Path(out).resolve()
    calib = Path(calib).resolve() if calib is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": str(model), "out": str(out), "mode": mode, "calib": str(calib) if calib else None}
    with _scratch_dir() as scratch:
        start = time.perf_counter()
        source, report["preprocess"] = preprocess(model, scratch)
        report["preprocess_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        if mode in ("static", "static_external_data"):
            quantize_static_default(source, calib, out, external_data=mode == "static_external_data")
        elif mode == "dynamic":
            quantize_dynamic_default(source, out)
        else:
            report.update(exclude_worst_node(source, calib, out, scratch, max_candidates))
        report["quantize_seconds"] = round(time.perf_counter() - start, 2)
    report["size_bytes"] = out.stat().st_size
    return report


def quantize_in_subprocess(model: Path, out: Path, mode: str = "static", calib: Path | None = None,
                           report: Path | None = None, timeout: float | None = None) -> dict:
    """Run the CLI as a child process and return its report plus ``ok``, ``wall_seconds`` and ``peak_rss_mb``
    (the child's own peak, see :func:`benchmarks.measure.run_measured`)."""
    from benchmarks.measure import python_module, run_measured

    report = Path(report) if report else Path(str(out) + ".json")
    report.unlink(missing_ok=True)
    cmd = python_module("benchmarks.ort_baseline", "--model", model, "--out", out, "--mode", mode, "--report", report)
    if calib is not None:
        cmd += ["--calib", str(calib)]
    measured = run_measured(cmd, timeout=timeout)
    result = json.loads(report.read_text()) if measured.ok and report.is_file() else {}
    result.update(ok=measured.ok, returncode=measured.returncode, wall_seconds=measured.wall_seconds,
                  peak_rss_mb=measured.peak_rss_mb)
    if not measured.ok:
        result["error"] = measured.output[-3000:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ort_baseline",
                                     description="One onnxruntime.quantization baseline run.")
    parser.add_argument("--model", type=Path, required=True, help="FP32 ONNX model")
    parser.add_argument("--calib", type=Path, help="calibration feeds: stacked .npz or directory of .npz")
    parser.add_argument("--out", type=Path, required=True, help="quantized model to write")
    parser.add_argument("--mode", choices=MODES, default="static")
    parser.add_argument("--report", type=Path, help="JSON report (default: <out>.json)")
    parser.add_argument("--max-candidates", type=int, default=64,
                        help="static_exclude_worst: most quantized nodes to try excluding (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.mode != "dynamic" and args.calib is None:
        parser.error(f"--mode {args.mode} needs --calib")
    report = quantize(args.model, args.out, args.mode, args.calib, args.max_candidates)
    report_path = args.report or Path(str(args.out) + ".json")
    report_path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
