"""WER, Whisper greedy-step helpers and the task-metric helpers, on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.tasks import _cosine, _token_agreement
from benchmarks.wer import edit_distance, normalized_words, word_error_rate
from benchmarks.whisper_decoding import DecodingConfig, pick_token


def test_edit_distance_counts_substitutions_insertions_deletions():
    assert edit_distance("a b c".split(), "a b c".split()) == 0
    assert edit_distance("a b c".split(), "a x c".split()) == 1
    assert edit_distance("a b c".split(), "a c".split()) == 1
    assert edit_distance("a b".split(), "a b c d".split()) == 2
    assert edit_distance([], "a b".split()) == 2


def test_wer_normalises_case_and_punctuation():
    assert normalized_words(" Hello, World! it's") == ["hello", "world", "it's"]
    assert word_error_rate(["Hello, world."], ["hello world"]) == 0.0
    assert word_error_rate(["one two three four", "five"], ["one too three four", ""]) == pytest.approx(2 / 5)
    assert word_error_rate([""], [""]) == 0.0


def test_token_agreement_penalises_length_differences():
    assert _token_agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert _token_agreement([[1, 2, 3, 4]], [[1, 2]]) == 0.5
    assert _token_agreement([[1, 2]], [[9, 2, 5, 6]]) == 0.25


def test_cosine_edge_cases():
    assert _cosine(np.ones(3), np.ones(3)) == pytest.approx(1.0)
    assert _cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert _cosine(np.array([1.0, 0]), np.array([0, 1.0])) == 0.0


def test_pick_token_applies_suppression_and_first_step_rule(tmp_path):
    config = DecodingConfig(prompt=(5, 6), end_of_text=0, suppress=(3,), suppress_at_begin=(0, 1))
    logits = np.array([9.0, 8.0, 1.0, 10.0, 2.0])
    assert pick_token(logits, step=0, config=config) == 4  # 3 suppressed, 0 and 1 banned at the start
    assert pick_token(logits, step=1, config=config) == 0
    config.save(tmp_path / "d.json")
    assert DecodingConfig.load(tmp_path / "d.json") == config
