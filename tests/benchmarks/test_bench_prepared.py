"""The prepared real models (slow; skipped unless ``python -m benchmarks.prepare`` has filled the cache)."""

from __future__ import annotations

import pytest

from benchmarks.cache import DEFAULT_CACHE, MANIFEST
from benchmarks.tasks import evaluate

pytestmark = pytest.mark.slow

PERFECT = {"effnet": ("top1_agreement", "top5_agreement"), "minilm": ("nn_agreement",),
           "silero": ("frame_agreement",)}


@pytest.mark.parametrize("name", sorted(PERFECT))
def test_fp32_against_itself_agrees_perfectly(name):
    if not (DEFAULT_CACHE / name / MANIFEST).is_file():
        pytest.skip(f"{name} not prepared")
    result = evaluate(name, None, {"model": DEFAULT_CACHE / name / "model.onnx"})
    for key in PERFECT[name]:
        assert result[key] == 1.0


def test_whisper_decoder_with_past_matches_cached_fp32_transcripts():
    if not (DEFAULT_CACHE / "whisper" / MANIFEST).is_file():
        pytest.skip("whisper not prepared")
    result = evaluate("whisper", None, {"decoder_with_past": DEFAULT_CACHE / "whisper" / "decoder_with_past.onnx"})
    assert result["wer_vs_fp32"] == 0.0 and result["exact_match"] == 1.0
    # teacher-forced, the KV-cache decoder stepped one token at a time is the no-cache FP32 decoder
    assert result["forced_top1_agreement"] == 1.0 and abs(result["forced_kl"]) < 1e-6
