"""Calibration/evaluation feeds on disk, in the two layouts edgeq reads.

* **stacked** – one ``.npz`` whose keys are the model's input names; samples are stacked on axis 0 and sample
  ``i`` is ``arr[i:i+1]``. For models whose inputs all have a fixed shape with a leading batch axis of 1.
* **directory** – a folder of ``.npz`` files, one feed dict per file with full shapes; shapes may differ between
  files (variable sequence length, KV-cache length). Files are read in name order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

Feed = Mapping[str, np.ndarray]


def save_stacked(path: Path, feeds: Iterable[Feed]) -> int:
    """Write feeds (each with a leading axis of 1) as one stacked ``.npz``; returns the sample count."""
    feeds = list(feeds)
    if not feeds:
        raise ValueError(f"no feeds to write to {path}")
    names = list(feeds[0])
    for i, feed in enumerate(feeds):
        if list(feed) != names:
            raise ValueError(f"feed {i} has inputs {list(feed)}, expected {names}")
        for name, arr in feed.items():
            if arr.shape[:1] != (1,):
                raise ValueError(f"feed {i} input {name!r} has shape {arr.shape}; stacked feeds need axis 0 == 1")
    np.savez(path, **{name: np.concatenate([f[name] for f in feeds]) for name in names})
    return len(feeds)


def save_directory(path: Path, feeds: Iterable[Feed]) -> int:
    """Write one ``NNNNN.npz`` per feed into ``path`` (created, emptied of old ``.npz``); returns the count."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.npz"):
        old.unlink()
    count = 0
    for count, feed in enumerate(feeds, start=1):
        np.savez(path / f"{count - 1:05d}.npz", **feed)
    return count


def iter_feeds(path: Path | str) -> Iterator[dict[str, np.ndarray]]:
    """Yield feed dicts from either layout, one sample at a time."""
    path = Path(path)
    if path.is_dir():
        for file in sorted(path.glob("*.npz")):
            with np.load(file) as z:
                yield {name: z[name] for name in z.files}
        return
    with np.load(path) as z:
        arrays = {name: z[name] for name in z.files}
    counts = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"{path}: inputs have different sample counts on axis 0: {counts}")
    for i in range(next(iter(counts.values()))):
        yield {name: arr[i:i + 1] for name, arr in arrays.items()}


def load_feeds(path: Path | str) -> list[dict[str, np.ndarray]]:
    return list(iter_feeds(path))


def count_feeds(path: Path | str) -> int:
    path = Path(path)
    if path.is_dir():
        return len(list(path.glob("*.npz")))
    with np.load(path) as z:
        return int(z[z.files[0]].shape[0])
