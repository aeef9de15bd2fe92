"""``--html FILE``: the JSON report as one self-contained HTML page.

Everything is inline (CSS in a ``<style>`` block, charts as hand-written SVG), so the file can be attached to a CI
run or mailed and opened offline; nothing is fetched and no script runs. The page shows the verdict, per-output
metrics against their thresholds, a per-layer error chart when the report has ``layers`` (else per-output SQNR and
a histogram of skip reasons), skipped tensors, fallback decisions, legality findings, latency and size, passes,
the profile, and the versions and hashes needed to reproduce the run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from edgeq.model_io import atomic_path
from edgeq.report import _clean

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f4f6f8}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5dbe1;padding-bottom:4px}
.sub{color:#5b6670;margin:0 0 16px}
.badge{display:inline-block;padding:4px 12px;border-radius:4px;font-weight:600;color:#fff;margin-right:8px}
.pass{background:#1f883d}.fail{background:#cf222e}.none{background:#6e7781}
.ok{color:#1f883d;font-weight:600}.bad{color:#cf222e;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #d5dbe1;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:18px}.card span{color:#5b6670;font-size:12px}
table{border-collapse:collapse;background:#fff;width:100%;margin:6px 0}
th,td{border:1px solid #d5dbe1;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
td code{word-break:break-all}
pre{background:#fff;border:1px solid #d5dbe1;padding:10px;overflow:auto;max-height:420px}
ul.failures li{color:#cf222e}.muted{color:#6e7781}
figure{margin:8px 0;background:#fff;border:1px solid #d5dbe1;padding:8px}
figcaption{color:#5b6670;font-size:12px}summary{cursor:pointer;color:#0969da}
"""


def write_html(report: dict, path: str | os.PathLike) -> Path:
    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")
    return out


def render_html(report: dict) -> str:
    rep = _clean(report)  # the same values the JSON holds (inf as "inf"), so both files agree
    body = [_header(rep), _metrics(rep), _charts(rep), _skipped(rep), _fallback(rep), _lint(rep), _performance(rep),
            _passes(rep), _profile(rep), _reproducibility(rep)]
    title = f"edgeq {rep.get('command', 'report')}: {_subject(rep)}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(b for b in body if b) + "\n</main></body></html>\n")


# -- helpers ---------------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if v in ("inf", "-inf", "nan"):
        return float(v)
    return None


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    x = _num(v)
    if x is None:
        return "—" if v is None else str(v)
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.{digits}g}"


def _table(header: list[str], rows: Iterable[list[str]], num_cols: Iterable[int] = ()) -> str:
    """``rows`` hold pre-escaped HTML cells."""
    nums = set(num_cols)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in nums else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(_fmt(v))}</code></td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def _subject(rep: dict) -> str:
    if rep.get("command") == "validate":
        return f"{Path(str(rep['candidate']['path'])).name} vs {Path(str(rep['reference']['path'])).name}"
    model = Path(str((rep.get("model") or {}).get("path", "?"))).name
    return f"{model} for {(rep.get('profile') or {}).get('name', '?')}"


# -- sections --------------------------------------------------------------------------------------------------


def _header(rep: dict) -> str:
    passed = rep.get("passed")
    verdict = ('<span class="badge pass">PASSED</span>' if passed is True else
               '<span class="badge fail">FAILED</span>' if passed is False else
               '<span class="badge none">NOT VALIDATED</span>')
    lint = rep.get("lint")
    if lint:
        verdict += (f'<span class="badge pass">legal for {escape(lint["target"])}</span>' if lint["passed"] else
                    f'<span class="badge fail">{lint["errors"]} legality error(s) for {escape(lint["target"])}</span>')
    val = rep.get("validation") or {}
    cards = []
    if val:
        cards.append((f"{val['samples']}", f"evaluation samples on {val['backend']}"))
    q = rep.get("quantization")
    if q and q.get("compute_ops"):
        cards.append((f"{q['compute_ops_quantized']}/{q['compute_ops']}", "Conv/MatMul/Gemm quantized"))
    if "skipped" in rep:
        cards.append((str(len(rep["skipped"])), "tensors skipped"))
    size = val.get("size_bytes") or ({"reference": rep["model"]["size_bytes"], "candidate": rep["output"]["size_bytes"]}
                                     if "output" in rep else None)
    if size:
        cards.append((f"{size['reference'] / 1024:.1f} → {size['candidate'] / 1024:.1f} KiB", "model size"))
    lat = val.get("latency_ms") or {}
    if lat.get("candidate"):
        ref = _fmt(lat["reference"]["median"], 3) if lat.get("reference") else "n/a"
        cards.append((f"{ref} → {_fmt(lat['candidate']['median'], 3)} ms",
                      "median latency"))
    card_html = "".join(f'<div class="card"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in cards)
    note = "" if val else '<p class="muted">No evaluation data was given (--eval), so fidelity was not measured.</p>'
    return (f"<h1>edgeq {escape(str(rep.get('command', '')))}: {escape(_subject(rep))}</h1>"
            f'<p class="sub">report schema {escape(str(rep.get("schema")))}</p>'
            f"<div>{verdict}</div><div class=\"cards\">{card_html}</div>{note}")


_CHECKS = (  # (column, metric key, threshold key, higher is better, format)
    ("cosine", "cosine_mean", "min_cosine", True, ".5f"),
    ("SQNR dB", "sqnr_db", "min_sqnr_db", True, ".2f"),
    ("max |err|", "max_abs_error", "max_abs_error", False, ".4g"),
    ("top-1 agreement", "top1_agreement", "min_top1_agreement", True, ".3f"),
)


def metric_status(value: Any, threshold: Any, higher_is_better: bool) -> bool | None:
    """True/False against the threshold, None where there is no threshold or no value (NaN fails)."""
    v, t = _num(value), _num(threshold)
    if v is None or t is None:
        return None
    return v >= t if higher_is_better else v <= t


def _metrics(rep: dict) -> str:
    val = rep.get("validation")
    if not val:
        return ""
    thr = val["thresholds"]
    rows = []
    for o in val["outputs"]:
        row = [f"<code>{escape(o['name'])}</code>"]
        for _, key, tkey, higher, spec in _CHECKS:
            if key not in o:
                row.append('<span class="muted">n/a</span>')
                continue
            ok = metric_status(o[key], thr.get(tkey), higher)
            bound = "" if thr.get(tkey) is None else f" ({'≥' if higher else '≤'} {_fmt(thr[tkey])})"
            cls = {True: "ok", False: "bad", None: ""}[ok]
            shown = escape(_fmt_metric(o[key], spec))
            row.append(f'<span class="{cls}">{shown}</span>{escape(bound)}' if cls else f"{shown}{escape(bound)}")
        row.append(escape(_fmt(o.get("nonfinite_values"))))
        rows.append(row)
    failures = "".join(f"<li>{escape(f)}</li>" for f in val.get("failures", []))
    verdict = f'<ul class="failures">{failures}</ul>' if failures else "<p>All outputs are within the thresholds.</p>"
    return ("<h2>Per-output metrics</h2>"
            + _table(["output"] + [c[0] for c in _CHECKS] + ["non-finite"], rows, num_cols=range(1, 6)) + verdict)


def _fmt_metric(v: Any, spec: str) -> str:
    x = _num(v)
    return _fmt(v) if x is None or not math.isfinite(x) else format(x, spec)


def _layer_name(row: dict) -> str:
    return str(row.get("name") or row.get("tensor") or row.get("node") or "?")


def _charts(rep: dict) -> str:
    figs = []
    layers = rep.get("layers") or []
    metric = next((k for k in ("sqnr_db", "cosine", "max_abs_error", "rel_error") if any(k in r for r in layers)),
                  None)
    if layers and metric:
        rows = [r for r in layers if metric in r]
        noise = [_num(r.get("added_noise")) for r in rows]
        jump = max((i for i, v in enumerate(noise) if v is not None), key=lambda i: noise[i], default=None)
        figs.append((bar_chart([_layer_name(r) for r in rows], [_num(r[metric]) for r in rows], unit=metric,
                               highlight=jump),
                     f"Per-layer {metric} of the quantized model against FP32, in graph order"
                     + ("; red: where the error jumps (most noise added)." if jump is not None else ".")))
    else:
        val = rep.get("validation") or {}
        if val.get("outputs"):
            thr = val["thresholds"].get("min_sqnr_db")
            figs.append((bar_chart([o["name"] for o in val["outputs"]], [_num(o["sqnr_db"]) for o in val["outputs"]],
                                   unit="SQNR dB", threshold=_num(thr), higher_is_better=True),
                         ("SQNR per output (higher is better); the dashed line is the threshold. "
                          "Run 'edgeq debug' for per-layer error.")))
    reasons = Counter(_reason_kind(s["reason"]) for s in rep.get("skipped", []))
    if reasons:
        top = reasons.most_common(15)
        figs.append((bar_chart([k for k, _ in top], [float(v) for _, v in top], unit="tensors"),
                     "Why tensors were left in float (skip reasons, grouped)."))
    if not figs:
        return ""
    return "<h2>Charts</h2>" + "".join(f"<figure>{svg}<figcaption>{escape(cap)}</figcaption></figure>"
                                       for svg, cap in figs)


def _reason_kind(reason: str) -> str:
    """Group reasons that differ only in numbers or quoted names ("calibrated range [-3e+04, ...]")."""
    kind = re.sub(r"\([^)]*\)|\[[^\]]*\]|'[^']*'|-?\d[\d.e+-]*", "…", reason.split(";")[0]).strip()
    return kind[:70]


def _skipped(rep: dict) -> str:
    if "skipped" not in rep:
        return ""
    skipped = rep["skipped"]
    if not skipped:
        return "<h2>Skipped tensors</h2><p>Nothing was skipped.</p>"
    rows = [[escape(s["pass"]), f"<code>{escape(s['target'])}</code>", escape(s["reason"])] for s in skipped]
    table = _table(["pass", "tensor / node", "reason"], rows)
    if len(rows) > 30:
        table = f"<details><summary>show all {len(rows)}</summary>{table}</details>"
    return f"<h2>Skipped tensors ({len(rows)})</h2>{table}"


def _fallback(rep: dict) -> str:
    fb = rep.get("fallback")
    if not fb:
        return ""
    if isinstance(fb, dict) and ("curve" in fb or "float_nodes" in fb):
        return _fallback_search(fb)
    rows = [{"key": k, "value": v} for k, v in fb.items()] if isinstance(fb, dict) else fb
    return f"<h2>Fallback decisions ({len(rows)})</h2>" + _records(rows)


def _records(rows: list) -> str:
    """A table of a list of flat records (any keys); nested values are shown as JSON."""
    keys = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    cells = [[escape(_cell(row.get(k))) for k in keys] if isinstance(row, dict) else [escape(_cell(row))]
             for row in rows]
    return _table(keys or ["decision"], cells)


def _fallback_search(fb: dict) -> str:
    """The automatic precision fallback: what it kept in float, what that bought, and how it got there."""
    floats = fb.get("float_nodes") or []
    met = fb.get("met")
    head = (f'<p><span class="{"ok" if met else "bad"}">budget {"met" if met else "not met"}</span>'
            f" (stopped: {escape(str(fb.get('stopped', '?')))}); {len(floats)} layer(s) kept in float"
            + (": " + ", ".join(f"<code>{escape(str(n))}</code>" for n in floats) if floats else "") + "</p>")
    base, best, budget = fb.get("baseline") or {}, fb.get("best") or {}, fb.get("budget") or {}
    scores = [[escape(k), escape(_fmt(base.get(k))), escape(_fmt(best.get(k))), escape(_fmt(budget.get(b)))]
              for k, b in (("cosine", "min_cosine"), ("sqnr_db", "min_sqnr_db"), ("top1_agreement", "min_top1"),
                           ("metric", "min_metric")) if base.get(k) is not None or best.get(k) is not None]
    parts = [head, _table(["score", "all quantized", "after fallback", "budget"], scores, num_cols=(1, 2, 3))]
    if fb.get("curve"):
        parts.append("<p>Trade-off, one row per layer moved to float:</p>" + _records(fb["curve"]))
    if fb.get("ranking"):
        parts.append(f"<details><summary>sensitivity ranking ({len(fb['ranking'])} layers)</summary>"
                     f"{_records(fb['ranking'])}</details>")
    notes = [f"{k}: {_cell(fb[k])}" for k in ("data", "candidates", "evaluations", "seconds") if k in fb]
    if notes:
        parts.append(f'<p class="muted">{escape("; ".join(notes))}</p>')
    return "<h2>Fallback decisions</h2>" + "".join(parts)


def _cell(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v)


def _lint(rep: dict) -> str:
    if "lint" not in rep:
        return ""
    lint = rep["lint"]
    if lint is None:
        return "<h2>Legality</h2><p class=\"muted\">Not checked.</p>"
    if not lint["findings"]:
        return f"<h2>Legality</h2><p>No findings for {escape(lint['target'])}.</p>"
    rows = [[f'<span class="{"bad" if f["severity"] == "error" else "muted"}">{escape(f["severity"])}</span>',
             escape(f["rule"]), f"<code>{escape(f['node'])}</code>", escape(f["message"])] for f in lint["findings"]]
    return (f"<h2>Legality for {escape(lint['target'])}: {lint['errors']} error(s), {lint['warnings']} warning(s)</h2>"
            + _table(["severity", "rule", "node", "message"], rows))


def _performance(rep: dict) -> str:
    val = rep.get("validation") or {}
    lat, size = val.get("latency_ms") or {}, val.get("size_bytes") or {}
    if not size and "output" in rep:
        size = {"reference": rep["model"]["size_bytes"], "candidate": rep["output"]["size_bytes"]}
    if not lat and not size:
        return ""
    rows = []
    for who in ("reference", "candidate"):
        lt = lat.get(who) or {}
        rows.append([escape(who), escape(_fmt(size.get(who))), escape(_fmt(lt.get("median"), 3)),
                     escape(_fmt(lt.get("p90"), 3)), escape(_fmt(lt.get("runs")))])
    where = f"candidate on {val.get('backend', 'ort')}, reference on ONNX Runtime CPU"
    extra = f"<p>Speed-up: {escape(_fmt(lat.get('speedup'), 3))}× ({escape(where)}).</p>" if lat else ""
    return ("<h2>Latency and size</h2>" + _table(["model", "size (bytes)", "median ms", "p90 ms", "runs"], rows,
                                                  num_cols=(1, 2, 3, 4)) + extra)


def _passes(rep: dict) -> str:
    if not rep.get("passes"):
        return ""
    rows = [[escape(p["name"]), escape(_fmt(p["seconds"], 3)), "yes" if p["changed"] else "no",
             escape(_fmt(p["rewrites"])), escape(json.dumps(p.get("notes") or {}))] for p in rep["passes"]]
    timings = rep.get("timings") or {}
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.3f} s" for k, v in timings.items() if _num(v) is not None)
    return ("<h2>Passes</h2>" + _table(["pass", "seconds", "changed", "rewrites", "notes"], rows, num_cols=(1, 3))
            + (f'<p class="muted">Stages: {escape(stages)}</p>' if stages else ""))


def _profile(rep: dict) -> str:
    prof = rep.get("profile")
    if not prof:
        return ""
    a, w, p = prof.get("activations", {}), prof.get("weights", {}), prof.get("placement", {})
    sym = {True: "symmetric", False: "asymmetric"}
    pairs = [("name", prof.get("name")), ("source", prof.get("source")),
             ("activations", f"{a.get('dtype')} {sym[bool(a.get('symmetric'))]}, observer {a.get('observer')}"),
             ("weights", f"{w.get('dtype')} {sym[bool(w.get('symmetric'))]}, per-channel "
                         + (", ".join(w.get("per_channel_ops") or []) or "none")),
             ("placement", p.get("mode"))]
    full = escape(json.dumps(prof, indent=2))
    return (f"<h2>Profile</h2>{_kv([(k, v) for k, v in pairs if v is not None])}"
            f"<details><summary>full profile</summary><pre>{full}</pre></details>")


def _reproducibility(rep: dict) -> str:
    pairs: list[tuple[str, Any]] = []
    for key in ("model", "output", "reference", "candidate"):
        if isinstance(rep.get(key), dict):
            pairs.append((f"{key} sha256 ({Path(str(rep[key]['path'])).name})", rep[key].get("sha256")))
    cal = rep.get("calibration") or {}
    if cal:
        pairs.append((f"calibration data sha256 ({cal.get('source', 'data')}, {cal.get('samples')} samples)",
                      cal.get("data_sha256")))
        if cal.get("preprocess_sha256"):
            pairs.append(("preprocessing sha256", cal["preprocess_sha256"]))
    for key, label in (("eval_data_sha256", "evaluation data sha256"), ("data_sha256", "evaluation data sha256"),
                       ("profile_sha256", "profile sha256"), ("seed", "seed")):
        if key in rep:
            pairs.append((label, rep[key]))
    pairs += [(f"{k} version", v) for k, v in (rep.get("versions") or {}).items()]
    return "<h2>Reproducibility</h2>" + _kv(pairs)


# -- charts ----------------------------------------------------------------------------------------------------


def bar_chart(labels: list[str], values: list[float | None], *, unit: str, threshold: float | None = None,
              higher_is_better: bool | None = None, highlight: int | None = None, width: int = 1000) -> str:
    """A horizontal bar chart as inline SVG; non-finite values are marked, not drawn to scale."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    lo = min(finite + [0.0] + ([threshold] if threshold is not None else []))
    hi = max(finite + [0.0] + ([threshold] if threshold is not None else []))
    if hi == lo:
        hi = lo + 1.0
    ticks = _ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    row = 22 if len(values) <= 40 else 15
    label_w = min(420, 12 + 7 * max((len(s) for s in labels), default=4))
    plot_w = width - label_w - 70
    top, height = 26, 26 + row * len(values) + 10

    def x(v: float) -> float:
        return label_w + (v - lo) / (hi - lo) * plot_w

    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             + 'style="max-width:100%;height:auto" font-family="system-ui,sans-serif" font-size="11">'
             + f"<title>{escape(unit)}</title>"]
    for t in ticks:
        parts.append(f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{height - 10}" stroke="#e3e7eb"/>'
                     f'<text x="{x(t):.1f}" y="{top - 8}" text-anchor="middle" fill="#5b6670">{_fmt(t, 3)}</text>')
    parts.append(f'<text x="{width - 4}" y="{top - 8}" text-anchor="end" fill="#5b6670">{escape(unit)}</text>')
    for i, (label, v) in enumerate(zip(labels, values)):
        y = top + i * row
        short = label if len(label) * 7 + 12 <= label_w else "…" + label[-((label_w - 12) // 7 - 1):]
        parts.append(f'<text x="{label_w - 6}" y="{y + row * 0.68:.1f}" text-anchor="end" fill="#1d232a">'
                     f"<title>{escape(label)}</title>{escape(short)}</text>")
        if v is None or math.isnan(v):
            parts.append(f'<text x="{x(0) + 4:.1f}" y="{y + row * 0.68:.1f}" fill="#6e7781">n/a</text>')
            continue
        end = x(hi) if v == math.inf else x(lo) if v == -math.inf else x(v)
        failing = threshold is not None and higher_is_better is not None and \
            (v < threshold if higher_is_better else v > threshold)
        color = "#cf222e" if failing or i == highlight else "#4c78a8"
        x0, x1 = sorted((x(0), end))
        parts.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 1):.1f}" height="{row - 6}" '
                     f'fill="{color}"><title>{escape(label)}: {_fmt(v, 5)}</title></rect>')
        parts.append(f'<text x="{x1 + 4:.1f}" y="{y + row * 0.68:.1f}" fill="#1d232a">{_fmt(v, 4)}</text>')
    if threshold is not None:
        parts.append(f'<line x1="{x(threshold):.1f}" y1="{top - 4}" x2="{x(threshold):.1f}" y2="{height - 10}" '
                     f'stroke="#cf222e" stroke-width="1.5" stroke-dasharray="5,3"/>')
    if lo < 0 < hi:
        parts.append(f'<line x1="{x(0):.1f}" y1="{top - 4}" x2="{x(0):.1f}" y2="{height - 10}" stroke="#5b6670"/>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + k * step for k in range(math.ceil((hi - start) / step - 1e-9) + 1)]
