"""English sentences taken from the docstrings of Python standard-library modules."""

from __future__ import annotations

import importlib
import re

_MODULES = ("json", "os", "re", "collections", "functools", "itertools", "pathlib", "subprocess", "threading",
            "argparse", "logging", "unittest", "email", "http.client", "urllib.request", "csv", "sqlite3", "string",
            "textwrap", "datetime", "decimal", "fractions", "random", "statistics", "shutil", "tempfile", "zipfile",
            "tarfile", "gzip", "pickle", "copy", "heapq", "bisect", "enum", "typing", "dataclasses", "contextlib",
            "abc", "inspect", "ast", "tokenize", "difflib", "calendar", "socket", "selectors", "asyncio", "queue",
            "multiprocessing", "configparser", "hashlib", "hmac", "secrets", "base64", "struct", "codecs", "locale")
# Code-like fragments make poor natural-language samples.
_CODE_LIKE = re.compile(r"[>{}\[\]=]|::|\(\)|__")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing from this Python build just contributes nothing
        return []
    docs = [module.__doc__ or ""]
    for attr in sorted(dir(module)):
        obj = getattr(module, attr, None)
        doc = getattr(obj, "__doc__", None)
        if callable(obj) and isinstance(doc, str):
            docs.append(doc)
    return docs


def stdlib_sentences(min_words: int = 5, max_words: int = 40) -> list[str]:
    """Unique prose sentences in a deterministic order (module order, then attribute name)."""
    seen: set[str] = set()
    found = []
    for module_name in _MODULES:
        for doc in _docstrings(module_name):
            for sentence in _SENTENCE_END.split(re.sub(r"\s+", " ", doc)):
                sentence = sentence.strip()
                words = sentence.split()
                if (min_words <= len(words) <= max_words and sentence[0].isupper() and sentence.endswith(".")
                        and not _CODE_LIKE.search(sentence) and sentence not in seen):
                    seen.add(sentence)
                    found.append(sentence)
    return found


def speakable_sentences(min_words: int = 5, max_words: int = 18) -> list[str]:
    """Sentences without digits or symbols that a speech synthesizer would spell out."""
    return [s for s in stdlib_sentences(min_words, max_words)
            if not any(c in s for c in "`'()_*/\\|<>\"#%;:") and not any(c.isdigit() for c in s)]
