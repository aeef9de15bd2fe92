"""Streaming fidelity metrics between a reference and a candidate output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class OutputMetrics:
    """Accumulates per-sample comparisons of one output tensor."""

    name: str
    samples: int = 0
    cos_sum: float = 0.0
    cos_min: float = 1.0
    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0
    abs_sum: float = 0.0
    elements: int = 0
    top1_hits: int = 0
    top5_hits: int = 0
    rows: int = 0
    classifier: bool | None = None
    nonfinite: int = 0
    shape: list = field(default_factory=list)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref = np.asarray(ref)
        cand = np.asarray(cand)
        self.shape = list(ref.shape)
        if ref.shape != cand.shape:
            raise ValueError(f"output {self.name}: reference shape {ref.shape} != candidate shape {cand.shape}")
        if ref.dtype.kind not in "fc":
            same = np.array_equal(ref, cand)
            self.samples += 1
            self.cos_sum += 1.0 if same else 0.0
            self.cos_min = min(self.cos_min, 1.0 if same else 0.0)
            self.signal += 1.0
            self.noise += 0.0 if same else 1.0
            return
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        bad = ~np.isfinite(c)
        if bad.any():
            self.nonfinite += int(bad.sum())
            c = np.where(bad, 0.0, c)
        r = np.where(np.isfinite(r), r, 0.0)
        nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
        cos = 1.0 if nr == 0 and nc == 0 else (float(r @ c) / (nr * nc) if nr > 0 and nc > 0 else 0.0)
        self.samples += 1
        self.cos_sum += cos
        self.cos_min = min(self.cos_min, cos)
        err = r - c
        self.signal += float(r @ r)
        self.noise += float(err @ err)
        if err.size:
            self.max_abs = max(self.max_abs, float(np.abs(err).max()))
        self.abs_sum += float(np.abs(err).sum())
        self.elements += err.size
        if self.classifier is None:
            # [N, classes] scores, or [N, T, vocab] token logits
            self.classifier = (ref.ndim == 2 and 2 <= ref.shape[-1] <= 100000) or \
                (ref.ndim == 3 and 1000 <= ref.shape[-1] <= 1000000)
        if self.classifier:
            rr = ref.reshape(-1, ref.shape[-1])
            cc = np.nan_to_num(cand.reshape(-1, ref.shape[-1]).astype(np.float64), nan=-np.inf)
            top_ref = rr.argmax(axis=1)
            self.top1_hits += int((cc.argmax(axis=1) == top_ref).sum())
            k = min(5, rr.shape[1])
            top5 = np.argpartition(-cc, k - 1, axis=1)[:, :k]
            self.top5_hits += int((top5 == top_ref[:, None]).any(axis=1).sum())
            self.rows += rr.shape[0]

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.samples if self.samples else float("nan")

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        if self.signal == 0:
            return float("-inf")
        return 10.0 * math.log10(self.signal / self.noise)

    def as_dict(self) -> dict:
        d = {
            "name": self.name, "shape": self.shape, "samples": self.samples, "cosine_mean": self.cosine,
            "cosine_min": self.cos_min, "sqnr_db": self.sqnr_db, "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / self.elements if self.elements else 0.0,
            "nonfinite_values": self.nonfinite,
        }
        if self.classifier and self.rows:
            d["top1_agreement"] = self.top1_hits / self.rows
            d["top5_agreement"] = self.top5_hits / self.rows
        return d


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    noise = float(np.sum((ref - cand) ** 2))
    return float("inf") if noise == 0 else 10 * math.log10(max(float(np.sum(ref**2)), 1e-300) / noise)
