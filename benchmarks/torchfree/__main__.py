"""``python -m benchmarks.torchfree --out DIR``: write ``effnet.onnx`` and ``minilm.onnx`` built without torch."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnx

from . import MODELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torchfree", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--only", default=",".join(MODELS), help="comma-separated subset of: " + ",".join(MODELS))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        path = args.out / f"{name}.onnx"
        onnx.save(MODELS[name](), str(path))
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
