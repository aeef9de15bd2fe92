"""Export the shared real models and build their calibration/evaluation data into a cache.

    python -m benchmarks.prepare [--cache benchmarks/.cache] [--only effnet,minilm,whisper,silero] [--force]

Each model goes to ``<cache>/<name>/`` with a ``manifest.json`` naming its files by role (``models``,
``calib``, ``eval``), sample counts, sanity checks and the SHA-256 of every file. A model whose manifest
matches the current recipe and whose files all hash as recorded is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import time
from pathlib import Path

from . import MODEL_NAMES
from .cache import DEFAULT_CACHE, ModelCache

log = logging.getLogger(__name__)


def _module(name: str):
    return importlib.import_module(f"benchmarks.models.{name}")


def prepare_model(name: str, cache_root: Path = DEFAULT_CACHE, force: bool = False) -> dict:
    """Prepare one model (skipped when cached and intact); returns its manifest."""
    module = _module(name)
    cache = ModelCache(Path(cache_root), name)
    if not force and cache.is_complete(module.RECIPE):
        log.info("%s: cached in %s", name, cache.dir)
        return cache.manifest()
    if cache.dir.exists():
        shutil.rmtree(cache.dir)
    cache.dir.mkdir(parents=True)
    start = time.perf_counter()
    info = module.prepare(cache.dir)
    info["prepare_seconds"] = round(time.perf_counter() - start, 1)
    manifest = cache.write_manifest(module.RECIPE, info)
    log.info("%s: prepared in %.1f s", name, info["prepare_seconds"])
    return manifest


def prepare_all(names=MODEL_NAMES, cache_root: Path = DEFAULT_CACHE, force: bool = False) -> dict[str, dict]:
    return {name: prepare_model(name, cache_root, force) for name in names}


def _parse_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; choose from {', '.join(MODEL_NAMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default: %(default)s)")
    parser.add_argument("--only", type=_parse_names, default=list(MODEL_NAMES),
                        help="comma-separated subset of: " + ",".join(MODEL_NAMES))
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is intact")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    for name, manifest in prepare_all(args.only, args.cache, args.force).items():
        print(f"{name}: {args.cache / name}  checks={manifest.get('checks')}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
