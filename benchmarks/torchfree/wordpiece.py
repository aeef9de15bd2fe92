"""BERT uncased WordPiece tokenization against a ``vocab.txt`` (no dependency).

Normalisation as BERT's: drop control characters and map whitespace to spaces, put spaces around CJK
ideographs, lowercase and strip accents (NFD, drop combining marks), split on whitespace and punctuation; then
greedy longest-match-first WordPiece with ``##`` continuations and ``[UNK]`` for words it cannot cover or longer
than 100 characters. Sequences are ``[CLS] tokens [SEP]``, truncated to ``max_length``, unpadded.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np

MAX_WORD_CHARS = 100


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _normalise(text: str) -> str:
    chars = []
    for ch in text:
        cp = ord(ch)
        cat = unicodedata.category(ch)
        if cp == 0 or cp == 0xFFFD or (cat.startswith("C") and ch not in "\t\n\r"):
            continue
        if ch in "\t\n\r" or cat == "Zs":
            chars.append(" ")
        elif _is_cjk(cp):
            chars.append(f" {ch} ")
        else:
            chars.append(ch)
    text = unicodedata.normalize("NFD", "".join(chars).lower())
    return "".join(ch for ch in text if unicodedata.category(ch) != "Mn")


def basic_tokens(text: str) -> list[str]:
    words = []
    for chunk in _normalise(text).split():
        word = ""
        for ch in chunk:
            if _is_punctuation(ch):
                if word:
                    words.append(word)
                words.append(ch)
                word = ""
            else:
                word += ch
        if word:
            words.append(word)
    return words


class WordPieceTokenizer:
    def __init__(self, vocab_file: Path | str):
        tokens = Path(vocab_file).read_text(encoding="utf-8").splitlines()
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        self.unk, self.cls, self.sep = (self.vocab[t] for t in ("[UNK]", "[CLS]", "[SEP]"))

    def word_ids(self, word: str) -> list[int]:
        if len(word) > MAX_WORD_CHARS:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_length: int = 128) -> list[int]:
        ids = [i for w in basic_tokens(text) for i in self.word_ids(w)]
        return [self.cls, *ids[: max_length - 2], self.sep]

    def feed(self, text: str, max_length: int = 128) -> dict[str, np.ndarray]:
        """One unpadded sample: input_ids, attention_mask (ones), token_type_ids (zeros), int64 [1, n]."""
        ids = np.array([self.encode(text, max_length)], np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
