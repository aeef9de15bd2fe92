"""Word error rate: word-level Levenshtein distance over lower-cased, punctuation-free words."""

from __future__ import annotations

import re
from typing import Sequence

_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def normalized_words(text: str) -> list[str]:
    return _NON_WORD.sub(" ", text.lower()).split()


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Minimum substitutions + deletions + insertions turning ``reference`` into ``hypothesis``."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        prev, row = row, [i] + [0] * len(hypothesis)
        for j, hyp_word in enumerate(hypothesis, start=1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ref_word != hyp_word))
    return row[-1]


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: total word edits / total reference words (0.0 when both are empty)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = words = 0
    for ref, hyp in zip(references, hypotheses):
        ref_words = normalized_words(ref)
        errors += edit_distance(ref_words, normalized_words(hyp))
        words += len(ref_words)
    if words == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / words
