"""Silero VAD v6, the package's batched "sequence" ONNX model (``silero_vad_16k_sequence.onnx``, copied as is).

The model takes a block of frames ``input [N, 576]`` (64 context samples + a 512-sample frame at 16 kHz) and the
LSTM state ``h, c [1, 1, 128]``, and returns ``speech_probs [N]`` and the final ``hn, cn``.

Files:

* ``model.onnx``
* ``calib/`` and ``eval/`` (directory layout): one 6.4 s clip (200 frames) per feed, zero initial state, as a
  caller runs the model on a fresh stream. Axis 0 of ``input`` is time, not batch, so whole clips cannot use
  the stacked layout.
* ``calib_frames.npz`` (stacked layout): every frame of the calibration clips as ``input [1, 576]`` with the
  LSTM state ``h, c`` the FP32 model carried into it. Run one at a time, these produce exactly the activations
  of the whole clips (checked), so MinMax ranges match ``calib/``; use it where a fixed-shape stacked file is
  required. (A subset of frames is *not* equivalent: narrower ranges change ORT's result a lot.)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from .. import feeds
from ..runtime import make_session
from ..sources.speech import utterances, vad_clip

log = logging.getLogger(__name__)

RECIPE = "silero-v2"
FRAME, CONTEXT, FRAMES_PER_CLIP = 512, 64, 200
STATE_SHAPE = (1, 1, 128)
CALIB_SPEECH, CALIB_NOISE, EVAL_SPEECH, EVAL_NOISE = 24, 8, 48, 16


def frames_with_context(audio: np.ndarray) -> np.ndarray:
    """[frames, CONTEXT + FRAME]: each frame prefixed by the last CONTEXT samples of the one before (zeros first);
    the tail is zero-padded to a whole frame."""
    count = -(-audio.size // FRAME)
    frames = np.zeros((count, FRAME), np.float32)
    frames.reshape(-1)[:audio.size] = audio
    context = np.zeros((count, CONTEXT), np.float32)
    context[1:] = frames[:-1, -CONTEXT:]
    return np.concatenate([context, frames], axis=1)


def clip_feed(clip: np.ndarray) -> dict[str, np.ndarray]:
    zeros = np.zeros(STATE_SHAPE, np.float32)
    return {"input": frames_with_context(clip), "h": zeros, "c": zeros.copy()}


def _frame_feeds(session, clip_feeds: list[dict]) -> tuple[list[dict], float]:
    """Every frame with the state carried into it, and the largest difference between stepping frame by frame
    and running the whole clip (should be ~0)."""
    steps, worst = [], 0.0
    for feed in clip_feeds:
        whole = session.run(["speech_probs"], feed)[0]
        h, c = feed["h"], feed["c"]
        for i, frame in enumerate(feed["input"]):
            step = {"input": frame[None], "h": h, "c": c}
            steps.append(step)
            prob, h, c = session.run(["speech_probs", "hn", "cn"], step)
            worst = max(worst, abs(float(prob[0]) - float(whole[i])))
    return steps, worst


def prepare(out: Path) -> dict:
    import silero_vad

    source = Path(silero_vad.__file__).parent / "data" / "silero_vad_16k_sequence.onnx"
    shutil.copyfile(source, out / "model.onnx")

    samples = FRAMES_PER_CLIP * FRAME
    rng = np.random.default_rng(0)
    log.info("silero: synthesizing %d + %d speech clips", CALIB_SPEECH, EVAL_SPEECH)
    calib = ([clip_feed(vad_clip(u.audio, samples, rng)) for u in utterances(CALIB_SPEECH, seed=3, offset=600)]
             + [clip_feed(vad_clip(None, samples, rng)) for _ in range(CALIB_NOISE)])
    evals = ([clip_feed(vad_clip(u.audio, samples, rng)) for u in utterances(EVAL_SPEECH, seed=4, offset=700)]
             + [clip_feed(vad_clip(None, samples, rng)) for _ in range(EVAL_NOISE)])
    feeds.save_directory(out / "calib", calib)
    feeds.save_directory(out / "eval", evals)

    session = make_session(out / "model.onnx")
    frame_feeds, stepping_diff = _frame_feeds(session, calib)
    feeds.save_stacked(out / "calib_frames.npz", frame_feeds)
    probs = [session.run(["speech_probs"], f)[0] for f in evals]
    return {
        "models": {"model": "model.onnx"},
        "calib": {"model": "calib", "model_frames": "calib_frames.npz"},
        "eval": {"model": "eval"},
        "counts": {"calib_clips": len(calib), "eval_clips": len(evals), "calib_frames": len(frame_feeds),
                   "frames_per_clip": FRAMES_PER_CLIP, "eval_speech_clips": EVAL_SPEECH},
        "checks": {"frame_stepping_vs_whole_clip_max_abs": stepping_diff,
                   "fp32_speech_fraction_speech_clips": float(np.mean([(p > 0.5).mean() for p in probs[:EVAL_SPEECH]])),
                   "fp32_speech_fraction_noise_clips": float(np.mean([(p > 0.5).mean() for p in probs[EVAL_SPEECH:]]))},
        "source": "silero-vad==6.2.3 silero_vad/data/silero_vad_16k_sequence.onnx",
    }
