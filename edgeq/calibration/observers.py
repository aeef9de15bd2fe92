"""Streaming range observers.

:class:`TensorObserver` keeps, for one tensor, the exact min/max and a fixed-size histogram over a symmetric range
``[-R, R]`` that grows by powers of two (bins merge exactly), so memory is constant whatever the number or shape of
samples. Optionally it keeps a per-channel abs-max over the last axis (SmoothQuant needs it). The range methods turn
a histogram into a clipping range: min/max, percentile, entropy (KL divergence, TensorRT-style) and MSE-optimal.
"""

from __future__ import annotations

import math

import numpy as np

NUM_BINS = 4096
ROW_SAMPLE = 512


class TensorObserver:
    __slots__ = ("min", "max", "hist", "bound", "count", "channel_absmax", "channel_axis", "rows", "rows_seen",
                 "_rng", "dtype", "shape")

    def __init__(self, *, per_channel: bool = False, channel_axis: int = -1):
        self.min = math.inf
        self.max = -math.inf
        self.hist = np.zeros(NUM_BINS, dtype=np.int64)
        self.bound = 0.0  # histogram covers [-bound, bound]
        self.count = 0
        self.channel_absmax: np.ndarray | None = np.zeros(0, np.float32) if per_channel else None
        # the channel axis: -1 for MatMul/Gemm inputs, 1 for Conv inputs (NCHW)
        self.channel_axis = channel_axis
        # per-channel observers also keep a uniform sample of rows (vectors along the channel axis), so that a pass can
        # measure a layer's quantization error on real inputs (SmoothQuant's alpha search); not saved with stats
        self.rows: np.ndarray | None = None
        self.rows_seen = 0
        self._rng = np.random.default_rng(0) if per_channel else None
        self.dtype: str | None = None
        self.shape: tuple | None = None

    def update(self, x: np.ndarray) -> None:
        self.dtype = str(x.dtype)
        self.shape = tuple(x.shape)
        if x.size == 0 or x.dtype.kind != "f":
            return
        x = x.astype(np.float32, copy=False)
        ok = np.isfinite(x)
        finite = x if ok.all() else x[ok]
        if finite.size != x.size:
            # Overflow or invalid arithmetic in the float model: widen the range to infinity so the tensor is never
            # quantized from its finite values alone (insert_qdq keeps it in float, naming the range).
            bad = x[~ok]
            if np.isnan(bad).any() or (bad > 0).any():
                self.max = math.inf
            if np.isnan(bad).any() or (bad < 0).any():
                self.min = -math.inf
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(abs(lo), abs(hi))
        if self.bound == 0.0:
            self.bound = amax if amax > 0 else 1e-8
        elif amax > self.bound:
            self._grow(amax)
        # float64: near float32's limit, x + bound would overflow.
        pos = (finite.ravel().astype(np.float64) + self.bound) * (NUM_BINS / (2 * self.bound))
        idx = np.clip(pos, 0, NUM_BINS - 1).astype(np.int64)
        self.hist += np.bincount(idx, minlength=NUM_BINS)
        self.count += finite.size
        if self.channel_absmax is not None and x.ndim >= 1:
            if self.channel_axis not in (-1, x.ndim - 1) and -x.ndim <= self.channel_axis < x.ndim:
                x = np.moveaxis(x, self.channel_axis, -1)
            cmax = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            cmax[np.isnan(cmax)] = np.inf
            if self.channel_absmax.size != cmax.size:
                self.channel_absmax = cmax if self.channel_absmax.size == 0 else \
                    np.maximum(self.channel_absmax.max(), cmax)
            else:
                np.maximum(self.channel_absmax, cmax, out=self.channel_absmax)
            self._sample_rows(x.reshape(-1, x.shape[-1]))

    def _sample_rows(self, rows: np.ndarray) -> None:
        """Reservoir sampling (algorithm R) of up to ``ROW_SAMPLE`` finite rows."""
        rows = rows[np.isfinite(rows).all(axis=1)]
        if self.rows is None or self.rows.shape[1] != rows.shape[1]:
            self.rows, self.rows_seen = np.zeros((0, rows.shape[1]), np.float32), 0
        fill = min(ROW_SAMPLE - len(self.rows), len(rows))
        if fill > 0:
            self.rows = np.concatenate([self.rows, rows[:fill].astype(np.float32)])
        rest = rows[fill:]
        if len(rest):
            seen = self.rows_seen + fill + np.arange(len(rest))
            slot = (self._rng.random(len(rest)) * (seen + 1)).astype(np.int64)
            for i in np.flatnonzero(slot < ROW_SAMPLE):
                self.rows[slot[i]] = rest[i]
        self.rows_seen += len(rows)

    def _grow(self, amax: float) -> None:
        while self.bound < amax:
            factor = min(2 ** math.ceil(math.log2(amax / self.bound)), NUM_BINS // 2)
            factor = max(factor, 2)
            new = np.zeros_like(self.hist)
            offset = NUM_BINS // 2 - NUM_BINS // (2 * factor)
            np.add.at(new, offset + np.arange(NUM_BINS) // factor, self.hist)
            self.hist = new
            self.bound *= factor

    # ------------------------------------------------------------------------------------------------------------
    def edges(self) -> np.ndarray:
        return np.linspace(-self.bound, self.bound, NUM_BINS + 1)

    def range(self, method: str, *, percentile: float = 99.999, symmetric: bool = False,
              levels: int = 256) -> tuple[float, float]:
        """The clipping range ``(lo, hi)`` for quantization with ``levels`` steps; always contains 0."""
        if self.count == 0:
            return 0.0, 0.0
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if method == "minmax":
            pass
        elif method == "percentile":
            lo, hi = self._percentile(percentile, symmetric)
        elif method == "entropy":
            t = self._entropy_threshold(levels, symmetric)
            lo, hi = max(lo, -t), min(hi, t)
        elif method == "mse":
            lo, hi = self._mse_range(levels, symmetric)
        else:
            raise ValueError(f"unknown observer {method!r}")
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if symmetric:
            a = max(abs(lo), abs(hi))
            lo, hi = (-a if self.min < 0 else 0.0), a
        return float(lo), float(hi)

    def _percentile(self, pct: float, symmetric: bool) -> tuple[float, float]:
        edges = self.edges()
        if symmetric:
            half = NUM_BINS // 2
            folded = self.hist[half:] + self.hist[:half][::-1]
            cdf = np.cumsum(folded) / folded.sum()
            i = int(np.searchsorted(cdf, pct / 100.0))
            a = min(float(edges[half + min(i, half - 1) + 1]), max(abs(self.min), abs(self.max)))
            return max(self.min, -a), min(self.max, a)
        cdf = np.cumsum(self.hist) / self.hist.sum()
        tail = (100.0 - pct) / 100.0
        i_lo = int(np.searchsorted(cdf, tail))
        i_hi = int(np.searchsorted(cdf, 1.0 - tail))
        return max(self.min, float(edges[i_lo])), min(self.max, float(edges[min(i_hi + 1, NUM_BINS)]))

    def _entropy_threshold(self, levels: int, symmetric: bool = False) -> float:
        """Threshold minimising KL(P || Q) between the clipped and the quantized |x| distribution.

        The bin holding zero is given its neighbour's count: after a ReLU it holds a large share of exact zeros,
        which quantize without error, and would otherwise pull the threshold down until most of the range clips.
        A non-negative tensor with a zero point at the type's minimum has all ``levels`` steps on ``[0, t]``."""
        half = NUM_BINS // 2
        folded = (self.hist[half:] + self.hist[:half][::-1]).astype(np.float64)
        folded[0] = folded[1]
        unsigned = self.min >= 0 and not symmetric
        target = max(levels if unsigned else levels // 2, 2)
        amax = max(abs(self.min), abs(self.max))
        width = self.bound / half
        last = max(target, min(half, int(math.ceil(amax / width))))
        best, best_i = math.inf, last
        for i in range(target, last + 1, max(1, (last - target) // 256)):
            p = folded[:i].copy()
            p[i - 1] += folded[i:].sum()
            nz = p > 0
            chunks = np.array_split(np.arange(i), target)
            q = np.zeros(i)
            for c in chunks:
                mask = nz[c]
                if mask.any():
                    q[c[mask]] = folded[:i][c].sum() / mask.sum()
            ps, qs = p / p.sum(), q / max(q.sum(), 1e-12)
            valid = nz & (qs > 0)
            kl = float(np.sum(ps[valid] * np.log(ps[valid] / qs[valid]))) + (1e9 if (nz & ~(qs > 0)).any() else 0)
            if kl < best:
                best, best_i = kl, i
        return best_i * width

    def _mse_range(self, levels: int, symmetric: bool) -> tuple[float, float]:
        edges = self.edges()
        centers = (edges[:-1] + edges[1:]) / 2
        nz = self.hist > 0
        c, w = centers[nz], self.hist[nz].astype(np.float64)
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        best, best_range = math.inf, (lo0, hi0)
        for ratio in np.unique(np.concatenate([np.geomspace(0.01, 1.0, 60), np.linspace(0.5, 1.0, 26)])):
            lo, hi = lo0 * ratio, hi0 * ratio
            if symmetric:
                a = max(-lo, hi)
                lo, hi = -a, a
            scale = (hi - lo) / (levels - 1)
            if scale <= 0:
                continue
            q = np.clip(np.round((c - lo) / scale), 0, levels - 1) * scale + lo
            err = float(np.sum(w * (q - c) ** 2))
            if err < best:
                best, best_range = err, (lo, hi)
        return best_range

    # ------------------------------------------------------------------------------------------------------------
    def merge(self, other: "TensorObserver") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            for k in self.__slots__:
                setattr(self, k, getattr(other, k))
            return
        if other.bound > self.bound:
            self._grow(other.bound)
        o = TensorObserver()
        o.hist, o.bound = other.hist.copy(), other.bound
        if o.bound < self.bound:
            o._grow(self.bound)
        # Both bounds are now powers-of-two multiples only if they started equal; fall back to re-binning centres.
        if not math.isclose(o.bound, self.bound):
            centers = (o.edges()[:-1] + o.edges()[1:]) / 2
            idx = np.clip(((centers + self.bound) * (NUM_BINS / (2 * self.bound))).astype(np.int64), 0, NUM_BINS - 1)
            np.add.at(self.hist, idx, o.hist)
        else:
            self.hist += o.hist
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
