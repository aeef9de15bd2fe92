"""Task metrics: how closely a candidate (quantized) model reproduces the FP32 model on its task.

Entry point for a benchmark runner::

    evaluate(name, fp32_paths, cand_paths, cache_dir) -> dict[str, float]

``name`` is one of ``effnet``, ``minilm``, ``whisper``, ``silero``. Paths are keyed by role: ``model`` for the
single-graph models; ``encoder``, ``decoder`` and/or ``decoder_with_past`` for Whisper. ``fp32_paths=None``
uses the FP32 models in the cache. All models run in ONNX Runtime on the CPU (:func:`runtime.make_session`).
Every metric is 1.0 (or 0.0 for errors/WER) when the candidate is the FP32 model itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import feeds
from .cache import DEFAULT_CACHE, ModelCache
from .runtime import make_session
from .wer import word_error_rate
from .whisper_decoding import DecodingConfig, forced_logits, greedy_decode

log = logging.getLogger(__name__)

Paths = Mapping[str, "Path | str"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if denominator == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.clip(a @ b / denominator, -1.0, 1.0))


def _run_first_output(path, samples) -> list[np.ndarray]:
    session = make_session(path)
    name = session.get_outputs()[0].name
    return [session.run([name], feed)[0] for feed in samples]


def evaluate_effnet(fp32: Paths, cand: Paths, cache: ModelCache) -> dict[str, float]:
    """top1_agreement: candidate top-1 == FP32 top-1; top5_agreement: FP32 top-1 is in the candidate's top-5;
    top5_overlap: mean |top5 ∩ top5| / 5; logits_cosine: mean per-image cosine of the logits."""
    samples = feeds.load_feeds(cache.role_paths("eval")["model"])
    ref = np.concatenate(_run_first_output(fp32["model"], samples))
    out = np.concatenate(_run_first_output(cand["model"], samples))
    ref_top5, out_top5 = np.argsort(-ref, axis=1)[:, :5], np.argsort(-out, axis=1)[:, :5]
    return {
        "top1_agreement": float(np.mean(ref_top5[:, 0] == out_top5[:, 0])),
        "top5_agreement": float(np.mean([r in o for r, o in zip(ref_top5[:, 0], out_top5)])),
        "top5_overlap": float(np.mean([len(set(r) & set(o)) / 5 for r, o in zip(ref_top5, out_top5)])),
        "logits_cosine": float(np.mean([_cosine(r, o) for r, o in zip(ref, out)])),
        "samples": len(samples),
    }


def evaluate_minilm(fp32: Paths, cand: Paths, cache: ModelCache) -> dict[str, float]:
    """embedding_cosine: mean cosine of mean-pooled, L2-normalised sentence embeddings;
    nn_agreement: each sentence's nearest neighbour among the others is the same under both models;
    hidden_state_cosine: mean per-sentence cosine of last_hidden_state over unmasked tokens."""
    from .models.minilm import sentence_embeddings

    samples = feeds.load_feeds(cache.role_paths("eval")["model"])
    ref_hidden = _run_first_output(fp32["model"], samples)
    out_hidden = _run_first_output(cand["model"], samples)
    masks = [s["attention_mask"] for s in samples]
    ref = np.concatenate([sentence_embeddings(h, m) for h, m in zip(ref_hidden, masks)])
    out = np.concatenate([sentence_embeddings(h, m) for h, m in zip(out_hidden, masks)])
    ref_sim, out_sim = ref @ ref.T, out @ out.T
    np.fill_diagonal(ref_sim, -np.inf)
    np.fill_diagonal(out_sim, -np.inf)
    embedding_cos = np.sum(ref * out, axis=1)
    hidden_cos = [_cosine(r[m.astype(bool)], o[m.astype(bool)]) for r, o, m in zip(ref_hidden, out_hidden, masks)]
    return {
        "embedding_cosine": float(embedding_cos.mean()),
        "embedding_cosine_min": float(embedding_cos.min()),
        "nn_agreement": float(np.mean(ref_sim.argmax(axis=1) == out_sim.argmax(axis=1))),
        "hidden_state_cosine": float(np.mean(hidden_cos)),
        "samples": len(samples),
    }


def evaluate_silero(fp32: Paths, cand: Paths, cache: ModelCache) -> dict[str, float]:
    """Each evaluation clip runs as one call from a zero LSTM state. frame_agreement: speech/non-speech decision
    (probability > 0.5) agrees with FP32; output_cosine: cosine of all frame probabilities concatenated."""
    samples = feeds.load_feeds(cache.role_paths("eval")["model"])
    ref = np.concatenate(_run_first_output(fp32["model"], samples)).ravel()
    out = np.concatenate(_run_first_output(cand["model"], samples)).ravel()
    return {
        "frame_agreement": float(np.mean((ref > 0.5) == (out > 0.5))),
        "output_cosine": _cosine(ref, out),
        "prob_mean_abs_diff": float(np.abs(ref - out).mean()),
        "prob_max_abs_diff": float(np.abs(ref - out).max()),
        "frames": int(ref.size),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _token_agreement(references: list[list[int]], hypotheses: list[list[int]]) -> float:
    """Position-wise matches / the longer sequence's length, summed over utterances."""
    matches = sum(sum(a == b for a, b in zip(r, h)) for r, h in zip(references, hypotheses))
    total = sum(max(len(r), len(h)) for r, h in zip(references, hypotheses))
    return matches / total if total else 1.0


def _whisper_decoder_metrics(decoder_path, ref_decoder, features, ref_features, reference, config, tokenizer):
    decoder = make_session(decoder_path)
    log.info("whisper: greedy decoding %d utterances with %s", len(features), Path(decoder_path).name)
    hypotheses = [greedy_decode(decoder, f, config) for f in features]
    ref_tokens = [r["fp32_tokens"] for r in reference]
    texts = [tokenizer.decode(h) for h in hypotheses]
    logits_cos = [_cosine(forced_logits(ref_decoder, f, t, config), forced_logits(decoder, f, t, config))
                  for f, t in zip(ref_features, ref_tokens)]
    # the whole candidate pipeline (its audio features, its decoder), teacher-forced on the FP32 tokens: a
    # fidelity measure that greedy decoding's flips on a few unsure tokens do not move
    agree, kl = [], []
    for f_ref, f_cand, t in zip(ref_features, features, ref_tokens):
        a = _log_softmax(forced_logits(ref_decoder, f_ref, t, config))
        b = _log_softmax(forced_logits(decoder, f_cand, t, config))
        agree.append(a.argmax(-1) == b.argmax(-1))
        kl.append((np.exp(a) * (a - b)).sum(-1))
    return {
        "forced_top1_agreement": float(np.mean(np.concatenate(agree))),
        "forced_kl": float(np.mean(np.concatenate(kl))),
        "wer_vs_fp32": word_error_rate([r["fp32_transcript"] for r in reference], texts),
        "token_agreement": _token_agreement(ref_tokens, hypotheses),
        "exact_match": float(np.mean([h == t for h, t in zip(hypotheses, ref_tokens)])),
        "wer_vs_source_text": word_error_rate([r["text"] for r in reference], texts),
        "decoder_logits_cosine": float(np.mean(logits_cos)),
    }


def evaluate_whisper(fp32: Paths, cand: Paths, cache: ModelCache) -> dict[str, float]:
    """Greedy decoding (≤ 64 new tokens) of the evaluation utterances with the candidate encoder and decoder
    (either missing one is taken from FP32), scored against the cached FP32 transcripts.

    wer_vs_fp32: corpus WER of candidate transcripts vs FP32 transcripts; token_agreement: position-wise token
    matches / longer length; exact_match: utterances with identical tokens; encoder_cosine: mean cosine of
    audio_features; decoder_logits_cosine: candidate vs FP32 decoder, teacher-forced on the FP32 tokens with FP32
    audio features (isolates the decoder); forced_top1_agreement and forced_kl: the candidate pipeline (its
    encoder's features into its decoder) teacher-forced on the FP32 tokens, against FP32: top-1 agreement and mean
    KL(FP32 || candidate) per token position, prompt included. ``decoder_with_past`` candidates decode with the KV cache; when both
    decoder forms are given, the with-past metrics are prefixed ``with_past_``.
    """
    from tokenizers import Tokenizer

    files = cache.role_paths("eval")
    config = DecodingConfig.load(files["decoding"])
    tokenizer = Tokenizer.from_file(str(files["tokenizer"]))
    reference = json.loads(files["reference"].read_text())
    mels = feeds.load_feeds(files["encoder"])

    ref_features = _run_first_output(fp32["encoder"], mels)
    features = _run_first_output(cand["encoder"], mels) if "encoder" in cand else ref_features
    result: dict[str, float] = {"utterances": len(mels)}
    if "encoder" in cand:
        result["encoder_cosine"] = float(np.mean([_cosine(r, o) for r, o in zip(ref_features, features)]))

    ref_decoder = make_session(fp32["decoder"])
    forms = [form for form in ("decoder", "decoder_with_past") if form in cand] or ["decoder"]
    for form in forms:
        path = cand.get(form, fp32.get(form))
        metrics = _whisper_decoder_metrics(path, ref_decoder, features, ref_features, reference, config, tokenizer)
        prefix = "with_past_" if form == "decoder_with_past" and len(forms) > 1 else ""
        result.update({prefix + key: value for key, value in metrics.items()})
    return result


EVALUATORS: dict[str, Callable[[Paths, Paths, ModelCache], dict]] = {
    "effnet": evaluate_effnet, "minilm": evaluate_minilm, "whisper": evaluate_whisper, "silero": evaluate_silero}


def evaluate(name: str, fp32_paths: Paths | None, cand_paths: Paths, cache_dir: Path | str = DEFAULT_CACHE) -> dict:
    """Task metrics of the candidate model(s) against FP32 on the cached evaluation data of ``name``."""
    if name not in EVALUATORS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(EVALUATORS)}")
    cache = ModelCache(Path(cache_dir), name)
    fp32 = {**cache.role_paths("models"), **(fp32_paths or {})}
    unknown = set(cand_paths) - set(cache.manifest()["models"])
    if unknown:
        raise ValueError(f"{name}: unknown candidate role(s) {sorted(unknown)}; "
                         f"roles are {sorted(cache.manifest()['models'])}")
    return EVALUATORS[name](fp32, {k: Path(v) for k, v in cand_paths.items()}, cache)
