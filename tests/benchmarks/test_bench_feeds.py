"""benchmarks.feeds (both calibration layouts) and the cache manifest."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import feeds
from benchmarks.cache import ModelCache


def test_stacked_round_trip(tmp_path):
    samples = [{"x": np.full((1, 3), i, np.float32), "ids": np.array([[i]], np.int64)} for i in range(4)]
    assert feeds.save_stacked(tmp_path / "s.npz", samples) == 4
    loaded = feeds.load_feeds(tmp_path / "s.npz")
    assert len(loaded) == 4 and feeds.count_feeds(tmp_path / "s.npz") == 4
    for want, got in zip(samples, loaded):
        assert set(got) == {"x", "ids"}
        np.testing.assert_array_equal(got["x"], want["x"])
        assert got["ids"].shape == (1, 1)


def test_stacked_refuses_feeds_without_unit_batch(tmp_path):
    with pytest.raises(ValueError, match="axis 0 == 1"):
        feeds.save_stacked(tmp_path / "s.npz", [{"x": np.zeros((2, 3), np.float32)}])


def test_directory_keeps_differing_shapes_in_order(tmp_path):
    samples = [{"ids": np.arange(n, dtype=np.int64)[None]} for n in (3, 7, 5)]
    assert feeds.save_directory(tmp_path / "d", samples) == 3
    assert [f["ids"].shape[1] for f in feeds.iter_feeds(tmp_path / "d")] == [3, 7, 5]
    feeds.save_directory(tmp_path / "d", samples[:1])  # rewriting drops the old files
    assert feeds.count_feeds(tmp_path / "d") == 1


def test_manifest_detects_changed_and_missing_files(tmp_path):
    cache = ModelCache(tmp_path, "toy")
    cache.dir.mkdir()
    (cache.dir / "model.onnx").write_bytes(b"abc")
    cache.write_manifest("toy-v1", {"models": {"model": "model.onnx"}})
    assert cache.is_complete("toy-v1")
    assert not cache.is_complete("toy-v2")  # recipe changed
    assert cache.role_paths("models") == {"model": cache.dir / "model.onnx"}
    (cache.dir / "model.onnx").write_bytes(b"abd")
    assert not cache.is_complete("toy-v1")
    (cache.dir / "model.onnx").unlink()
    assert not cache.is_complete("toy-v1")


def test_missing_manifest_says_to_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks.prepare"):
        ModelCache(tmp_path, "effnet").manifest()
