"""edgeq against onnxruntime.quantization on the shared real models, in one run, on the same data.

    python -m benchmarks.run [--models effnet,minilm,whisper,silero] [--variants ...] [--out benchmarks/results]

Prepares the models (cached, ``benchmarks.prepare``), quantizes every model role with each variant in a child
process (wall time and that child's peak RSS), scores the task metrics (``benchmarks.tasks``), measures ONNX
Runtime CPU latency (2 threads, median) against FP32, and writes ``<out>/<model>.json``, ``<out>/latest.md`` and
PNG plots. Variants: ``ort-static`` (the shared README's default static QDQ), ``ort-best`` (the best
onnxruntime option per model), ``edgeq:<target>`` (``edgeq quantize -t <target>`` with default settings) and
``edgeq:<target>+fallback`` (with ``--auto-fallback``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from benchmarks.cache import ModelCache
from benchmarks.measure import REPO, python_module, run_measured

DEFAULT_CACHE = REPO / "benchmarks" / ".cache"
MODELS = ("effnet", "minilm", "whisper", "silero")
DEFAULT_VARIANTS = ("ort-static", "ort-best", "edgeq:ort-cpu", "edgeq:tensorrt", "edgeq:qnn")
ORT_BEST = {"effnet": "static", "minilm": "dynamic", "whisper": "dynamic", "silero": "static_exclude_worst"}
# The number each model is judged by, and whether higher is better.
KEY_METRICS = {"effnet": [("top1_agreement", True)],
               "minilm": [("embedding_cosine", True), ("nn_agreement", True)],
               "whisper": [("wer_vs_fp32", False), ("token_agreement", True), ("with_past_wer_vs_fp32", False),
                           ("forced_kl", False), ("with_past_forced_kl", False)],
               "silero": [("frame_agreement", True)]}
# Roles quantized per model (whisper's decoder_with_past is scored with the KV-cache decoding loop).
ROLES = {"whisper": ("encoder", "decoder", "decoder_with_past")}


def quantize_role(variant: str, name: str, role: str, model: Path, calib: Path, out: Path) -> dict:
    if variant.startswith("ort-"):
        mode = "static" if variant == "ort-static" else ORT_BEST[name]
        cmd = python_module("benchmarks.ort_baseline", "--model", model, "--out", out, "--mode", mode,
                            *(("--calib", calib) if mode != "dynamic" else ()))
        label = f"onnxruntime.quantization {mode}"
    else:
        target, _, extra = variant.split(":", 1)[1].partition("+")
        report = out.with_suffix(".report.json")
        cmd = python_module("edgeq", "quantize", model, "-t", target, "--calib", calib, "-o", out, "--report",
                            report, *(("--auto-fallback",) if extra == "fallback" else ()))
        label = f"edgeq -t {target}" + (" --auto-fallback" if extra else "")
    measured = run_measured(cmd, timeout=3600)
    row = {"tool": label, "ok": measured.ok and out.exists(), "wall_seconds": measured.wall_seconds,
           "peak_rss_mb": measured.peak_rss_mb}
    if row["ok"]:
        row["size_bytes"] = out.stat().st_size
        rep = out.with_suffix(".report.json")
        if rep.exists():
            q = json.loads(rep.read_text())
            row["quantized_compute_fraction"] = q["quantization"].get("quantized_compute_fraction")
            row["skipped"] = len(q.get("skipped", []))
            if q.get("fallback"):
                row["float_nodes"] = q["fallback"].get("float_nodes")
        else:
            row["quantized_compute_fraction"] = _int8_fraction(out)
    else:
        row["error"] = measured.output[-2000:]
    return row


def _int8_fraction(path: Path) -> float | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    compute = [n for n in m.graph.node if n.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose")]
    integer = [n for n in m.graph.node if n.op_type in ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
                                                           "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat")]
    dq = [n for n in compute if len(n.input) > 1 and all(producers.get(i) == "DequantizeLinear" for i in n.input[:2])]
    total = len(compute) + len(integer)
    return (len(dq) + len(integer)) / total if total else None


def first_feed(model: Path, data: Path) -> dict:
    from edgeq.calibration.data import model_inputs, open_dataset
    from edgeq.model_io import load_model

    return next(iter(open_dataset(data, model_inputs(load_model(model, check=False)))))


def latency_ms(path: Path, feed: dict, runs: int = 30) -> float:
    from benchmarks.runtime import make_session

    session = make_session(path, threads=2)
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_model(name: str, variants: list[str], cache_root: Path, out_dir: Path) -> dict:
    from benchmarks.tasks import evaluate

    cache = ModelCache(cache_root, name)
    models, calib, evals = cache.role_paths("models"), cache.role_paths("calib"), cache.role_paths("eval")
    roles = ROLES.get(name, tuple(models))
    work = out_dir / "models" / name
    work.mkdir(parents=True, exist_ok=True)
    feeds = {r: first_feed(models[r], evals.get(r) or calib[r]) for r in roles}
    fp32_latency = {r: latency_ms(models[r], feeds[r]) for r in roles}
    result = {"model": name, "fp32": {"latency_ms": fp32_latency,
                                      "size_bytes": {r: models[r].stat().st_size for r in roles}},
              "variants": {}}
    for variant in variants:
        print(f"[{name}] {variant} ...", flush=True)
        entry: dict = {"roles": {}}
        paths = {}
        for role in roles:
            out = work / f"{role}.{re.sub(r'[^A-Za-z0-9_.-]', '_', variant)}.onnx"
            row = quantize_role(variant, name, role, models[role], calib[role], out)
            if row["ok"]:
                row["latency_ms"] = latency_ms(out, feeds[role])
                row["latency_vs_fp32"] = row["latency_ms"] / fp32_latency[role]
                paths[role] = out
            entry["roles"][role] = row
        if len(paths) == len(roles):
            start = time.perf_counter()
            entry["metrics"] = evaluate(name, None, paths, cache_root)
            entry["eval_seconds"] = round(time.perf_counter() - start, 1)
        else:
            entry["metrics"] = None
        result["variants"][variant] = entry
        print(f"[{name}] {variant}: {json.dumps(entry['metrics'])}", flush=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| model | variant | task metric | size (MB) | latency vs FP32 | quantize wall (s) | peak RSS (MB) | "
             "Conv/MatMul/Gemm in int8 |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        name = res["model"]
        for variant, entry in res["variants"].items():
            roles = entry["roles"]
            metrics = entry.get("metrics") or {}
            task = ", ".join(f"{k} {metrics[k]:.3f}" for k, _ in KEY_METRICS[name] if k in metrics) or "failed"
            ok = [r for r in roles.values() if r["ok"]]
            size = sum(r.get("size_bytes", 0) for r in ok) / 1e6
            lat = " / ".join(f"{r['latency_vs_fp32']:.2f}x" for r in ok if "latency_vs_fp32" in r)
            wall = sum(r["wall_seconds"] for r in roles.values())
            rss = max(r["peak_rss_mb"] for r in roles.values())
            frac = [r.get("quantized_compute_fraction") for r in ok if r.get("quantized_compute_fraction") is not None]
            lines.append(f"| {name} | {variant} | {task} | {size:.1f} | {lat or '-'} | {wall:.0f} | {rss:.0f} | "
                         f"{'/'.join(f'{f:.0%}' for f in frac) or '-'} |")
    return "\n".join(lines) + "\n"


def plots(results: list[dict], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'edgeq[plot]')")
        return []
    written = []
    for res in results:
        name = res["model"]
        key, higher = KEY_METRICS[name][0]
        variants = [v for v, e in res["variants"].items() if e.get("metrics")]
        values = [res["variants"][v]["metrics"][key] for v in variants]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh(variants, values, color=["#888" if v.startswith("ort") else "#2a7" for v in variants])
        ax.set_xlabel(f"{key} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{name}: fidelity against FP32")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    start = time.perf_counter()
    prep = run_measured(python_module("benchmarks.prepare", "--cache", args.cache, "--only", ",".join(names)))
    if not prep.ok:
        print(prep.output[-3000:], file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = [bench_model(n, args.variants.split(","), args.cache, args.out) for n in names]
    table = markdown(results)
    header = (f"# edgeq vs onnxruntime.quantization\n\nGenerated by `python -m benchmarks.run` in "
              f"{(time.perf_counter() - start) / 60:.1f} min on this machine (ONNX Runtime CPU, 2 threads). "
              f"Fidelity is measured against the FP32 model on held-out data.\n\n")
    (args.out / "latest.md").write_text(header + table)
    plots(results, args.out)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
