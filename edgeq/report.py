"""The JSON report (schema ``edgeq.report/1``): what was done, what was skipped and why, and how it measured."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Iterator

from edgeq.model_io import atomic_path

SCHEMA = "edgeq.report/1"


def sha256_file(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
    if not files:
        return None
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class SampleDigest:
    """SHA-256 of the feed dicts an iterable yields (input names, dtypes, shapes and bytes, in order).

    Data with no file behind it (a callable, ``module:function``, a list of arrays) is hashed as it streams through
    calibration or validation; ``hexdigest`` is set when an iteration reaches the end (every pass gives the same).
    """

    def __init__(self, data: Iterable[dict]):
        self.data = data
        self.hexdigest: str | None = None

    def __iter__(self) -> Iterator[dict]:
        import numpy as np

        h = hashlib.sha256()
        for feed in self.data:
            for name in sorted(feed):
                arr = np.ascontiguousarray(feed[name])
                h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
                h.update(arr.tobytes() if arr.ndim == 0 else arr.data)
            yield feed
        self.hexdigest = h.hexdigest()


def tool_versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    import edgeq

    versions = {"edgeq": edgeq.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "numpy": numpy.__version__, "python": platform.python_version()}
    try:
        import onnx_graphsurgeon

        versions["onnx_graphsurgeon"] = onnx_graphsurgeon.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def _clean(obj: Any) -> Any:
    """JSON-safe: inf/nan become strings, tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(report: dict, path: str | os.PathLike) -> Path:
    out = Path(path)
    text = json.dumps(_clean(report), indent=2, sort_keys=False)
    with atomic_path(out) as tmp:
        tmp.write_text(text + "\n")
    return out


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def summary_table(validation: dict) -> str:
    rows = []
    for o in validation["outputs"]:
        rows.append([o["name"], f"{o['cosine_mean']:.5f}", _fmt_db(o["sqnr_db"]), f"{o['max_abs_error']:.4g}",
                     f"{o['top1_agreement']:.3f}" if "top1_agreement" in o else "-"])
    return format_table(rows, ["output", "cosine", "SQNR dB", "max |err|", "top-1 agree"])


def _fmt_db(v) -> str:
    if isinstance(v, str):
        return v
    return "inf" if v == float("inf") else f"{v:.1f}"
