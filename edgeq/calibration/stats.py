"""Calibration statistics: per-tensor observers, savable and reusable (``--stats FILE``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.calibration.observers import NUM_BINS, TensorObserver
from edgeq.errors import CalibrationDataError
from edgeq.model_io import atomic_path

FORMAT_VERSION = 1


@dataclass
class CalibrationStats:
    tensors: dict[str, TensorObserver] = field(default_factory=dict)
    samples: int = 0
    model_fingerprint: str = ""
    data_fingerprint: str = ""

    def __contains__(self, name: str) -> bool:
        return name in self.tensors and self.tensors[name].count > 0

    def get(self, name: str) -> TensorObserver | None:
        return self.tensors.get(name)

    def dtype(self, name: str) -> str | None:
        obs = self.tensors.get(name)
        return obs.dtype if obs else None

    def save(self, path: str | os.PathLike) -> Path:
        out = Path(path)
        names = sorted(self.tensors)
        meta = {
            "format": FORMAT_VERSION, "samples": self.samples, "model": self.model_fingerprint,
            "data": self.data_fingerprint, "names": names, "bins": NUM_BINS,
            "dtypes": [self.tensors[n].dtype for n in names],
            "shapes": [list(self.tensors[n].shape) if self.tensors[n].shape is not None else None for n in names],
        }
        arrays = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "minmax": np.array([[self.tensors[n].min, self.tensors[n].max] for n in names], np.float64).reshape(-1, 2),
            "bound": np.array([self.tensors[n].bound for n in names], np.float64),
            "count": np.array([self.tensors[n].count for n in names], np.int64),
            "hist": np.stack([self.tensors[n].hist for n in names]) if names else np.zeros((0, NUM_BINS), np.int64),
        }
        for i, n in enumerate(names):
            cm = self.tensors[n].channel_absmax
            if cm is not None and cm.size:
                arrays[f"channel_{i}"] = cm
        with atomic_path(out, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationStats":
        p = Path(path)
        if not p.is_file():
            raise CalibrationDataError(f"statistics file not found: {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                minmax, bound, count, hist = z["minmax"], z["bound"], z["count"], z["hist"]
                channels = {k: z[k] for k in z.files if k.startswith("channel_")}
        except Exception as exc:
            raise CalibrationDataError(f"{p} is not an edgeq statistics file: {str(exc).splitlines()[0][:200]}") \
                from None
        if meta.get("format") != FORMAT_VERSION or meta.get("bins") != NUM_BINS:
            raise CalibrationDataError(f"{p}: unsupported statistics format {meta.get('format')}")
        stats = cls(samples=meta["samples"], model_fingerprint=meta["model"], data_fingerprint=meta["data"])
        for i, name in enumerate(meta["names"]):
            obs = TensorObserver()
            obs.min, obs.max = float(minmax[i, 0]), float(minmax[i, 1])
            obs.bound, obs.count, obs.hist = float(bound[i]), int(count[i]), hist[i].astype(np.int64)
            obs.dtype = meta["dtypes"][i]
            obs.shape = tuple(meta["shapes"][i]) if meta["shapes"][i] is not None else None
            if f"channel_{i}" in channels:
                obs.channel_absmax = channels[f"channel_{i}"]
            stats.tensors[name] = obs
        return stats
