"""Greedy Whisper decoding with ONNX Runtime, using either decoder form.

* no-cache decoder: ``tokens [1, T], audio_features → logits [1, T, vocab]``; every step re-runs the prefix.
* decoder-with-past: also takes ``past_key_i/past_value_i [1, heads, P, 64]`` (P = 0 on the first step) and
  returns ``present_key_i/present_value_i``; each later step feeds only the newest token. Cross-attention
  keys/values are recomputed from ``audio_features`` inside the model at every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

PAST_PREFIX, PRESENT_PREFIX = "past_", "present_"


@dataclass(frozen=True)
class DecodingConfig:
    """Special tokens of Whisper tiny.en and the greedy-search limits."""

    prompt: tuple[int, ...]  # <|startoftranscript|> <|notimestamps|>
    end_of_text: int
    suppress: tuple[int, ...]  # never emitted
    suppress_at_begin: tuple[int, ...]  # not emitted as the first token (blank, end of text)
    max_new_tokens: int = 64
    heads: int = 6
    head_dim: int = 64
    layers: int = 4

    @classmethod
    def load(cls, path: Path | str) -> "DecodingConfig":
        raw = json.loads(Path(path).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.__dict__, indent=1))


def has_past_inputs(decoder: ort.InferenceSession) -> bool:
    return any(i.name.startswith(PAST_PREFIX) for i in decoder.get_inputs())


def empty_past(config: DecodingConfig) -> dict[str, np.ndarray]:
    shape = (1, config.heads, 0, config.head_dim)
    return {f"{PAST_PREFIX}{kind}_{i}": np.zeros(shape, np.float32)
            for i in range(config.layers) for kind in ("key", "value")}


def pick_token(logits: np.ndarray, step: int, config: DecodingConfig) -> int:
    """Greedy choice from the last position's logits [vocab], with Whisper's token suppression."""
    logits = logits.astype(np.float32, copy=True)
    logits[list(config.suppress)] = -np.inf
    if step == 0:
        logits[list(config.suppress_at_begin)] = -np.inf
    return int(logits.argmax())


FeedHook = Callable[[int, dict[str, np.ndarray]], None]


class _StepRunner:
    """Runs one decoding step with either decoder form, feeding forced or chosen tokens."""

    def __init__(self, decoder: ort.InferenceSession, audio_features: np.ndarray, config: DecodingConfig,
                 on_feed: FeedHook | None):
        self.decoder, self.audio, self.config, self.on_feed = decoder, audio_features, config, on_feed
        self.with_past = has_past_inputs(decoder)
        self.outputs = [o.name for o in decoder.get_outputs()]
        self.past = empty_past(config) if self.with_past else None

    def logits(self, step: int, tokens: list[int]) -> np.ndarray:
        """Logits [T_new, vocab] for the tokens fed at ``step`` (the whole prefix, or only the new tokens)."""
        fed = tokens if (step == 0 or not self.with_past) else tokens[-1:]
        feed = {"tokens": np.array([fed], np.int64), "audio_features": self.audio}
        if self.with_past:
            feed.update(self.past)
        if self.on_feed is not None:
            self.on_feed(step, feed)
        results = dict(zip(self.outputs, self.decoder.run(self.outputs, feed)))
        if self.with_past:
            self.past = {PAST_PREFIX + name[len(PRESENT_PREFIX):]: value
                         for name, value in results.items() if name.startswith(PRESENT_PREFIX)}
        return results["logits"][0]


def greedy_decode(decoder: ort.InferenceSession, audio_features: np.ndarray, config: DecodingConfig,
                  on_feed: FeedHook | None = None) -> list[int]:
    """Generated token ids (prompt and end-of-text excluded). ``on_feed(step, feed)`` sees every decoder feed,
    e.g. to capture calibration data."""
    runner = _StepRunner(decoder, audio_features, config, on_feed)
    tokens = list(config.prompt)
    for step in range(config.max_new_tokens):
        token = pick_token(runner.logits(step, tokens)[-1], step, config)
        if token == config.end_of_text:
            break
        tokens.append(token)
    return tokens[len(config.prompt):]


def forced_logits(decoder: ort.InferenceSession, audio_features: np.ndarray, generated: list[int],
                  config: DecodingConfig) -> np.ndarray:
    """Teacher-forced logits [len(prompt) + len(generated), vocab] for a fixed token sequence; the
    decoder-with-past is stepped one token at a time, as in decoding."""
    tokens = list(config.prompt) + list(generated)
    runner = _StepRunner(decoder, audio_features, config, None)
    if not runner.with_past:
        return runner.logits(0, tokens)
    rows = [runner.logits(0, list(config.prompt))]
    for end in range(len(config.prompt) + 1, len(tokens) + 1):
        rows.append(runner.logits(end, tokens[:end]))
    return np.concatenate(rows)
