"""Task metrics for the Whisper pipeline: transcripts of the quantized pipeline against the FP32 pipeline's."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.cache import DEFAULT_CACHE
from benchmarks.wer import word_error_rate

CACHE = DEFAULT_CACHE / "whisper"


def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(CACHE / "tokenizer.json"))


def transcript_metrics(reference: list[dict], candidate: list[dict]) -> dict[str, float]:
    """wer_vs_fp32: corpus WER of the candidate transcripts against the FP32 transcripts; exact_match: utterances
    with identical tokens; wer_vs_source_text for both (espeak-ng speech, so FP32 itself is about 0.3)."""
    tokenizer = _tokenizer()
    ref_text = [tokenizer.decode(r["transcript_tokens"][0].tolist()) for r in reference]
    cand_text = [tokenizer.decode(c["transcript_tokens"][0].tolist()) for c in candidate]
    out = {"wer_vs_fp32": word_error_rate(ref_text, cand_text),
           "exact_match": float(np.mean([np.array_equal(r["transcript_tokens"], c["transcript_tokens"])
                                         for r, c in zip(reference, candidate)]))}
    cached = CACHE / "eval_reference.json"
    if cached.is_file():
        entries = json.loads(cached.read_text())
        if len(entries) == len(reference):
            source = [e["text"] for e in entries]
            out["fp32_wer_vs_source_text"] = word_error_rate(source, ref_text)
            out["wer_vs_source_text"] = word_error_rate(source, cand_text)
            out["fp32_matches_cached_transcripts"] = float(np.mean([e["fp32_transcript"] == t
                                                                    for e, t in zip(entries, ref_text)]))
    return out
