"""Calibration: streaming observers, data formats and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_transformer_block
from edgeq.calibration.calibrate import calibrate
from edgeq.calibration.data import InputSpec, open_dataset
from edgeq.calibration.observers import NUM_BINS, TensorObserver
from edgeq.calibration.stats import CalibrationStats
from edgeq.errors import CalibrationDataError

SPEC = [InputSpec("x", np.dtype(np.float32), (1, 3, 4, 4))]


def test_histogram_growth_merges_bins_exactly():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 10000).astype(np.float32), rng.normal(0, 9, 10000).astype(np.float32)
    streamed = TensorObserver()
    streamed.update(a)
    streamed.update(b)
    assert streamed.hist.sum() == 20000 and streamed.hist.size == NUM_BINS
    assert streamed.min == min(a.min(), b.min()) and streamed.max == max(a.max(), b.max())
    # every value lies in the bin the final histogram assigns it to
    idx = np.clip(((np.concatenate([a, b]) + streamed.bound) * NUM_BINS / (2 * streamed.bound)).astype(int), 0,
                  NUM_BINS - 1)
    direct = np.bincount(idx, minlength=NUM_BINS)
    # merging is exact; only values within float rounding of a bin edge may land one bin over
    assert np.abs(direct - streamed.hist).sum() <= 0.002 * direct.sum()
    assert (direct - streamed.hist).sum() == 0


def test_percentile_ignores_outliers_minmax_does_not():
    obs = TensorObserver()
    x = np.random.default_rng(0).normal(0, 1, 200000).astype(np.float32)
    x[:3] = 500.0
    obs.update(x)
    assert obs.range("minmax")[1] == pytest.approx(500.0)
    lo, hi = obs.range("percentile", percentile=99.99)
    assert 3.0 < hi < 6.0 and -6.0 < lo < -3.0
    heavy = TensorObserver()
    heavy.update(np.random.default_rng(1).laplace(0, 1, 200000).astype(np.float32))
    assert heavy.range("mse", symmetric=True, levels=16)[1] < 0.7 * heavy.max, "MSE clips a heavy tail at 4 bits"
    ent_hi = obs.range("entropy", levels=256)[1]
    assert 0 < ent_hi < 500


def test_streaming_handles_different_shapes_and_constant_memory():
    model = make_transformer_block(seq="s")
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, n, 32)).astype(np.float32)} for n in (3, 17, 9, 30)]
    stats = calibrate(model, samples)
    assert stats.samples == 4
    obs = stats.get("h")
    assert obs.count == 32 * (3 + 17 + 9 + 30)
    assert obs.hist.nbytes == NUM_BINS * 8, "memory per tensor does not grow with samples"


def test_stats_round_trip(tmp_path):
    model = make_transformer_block()
    rng = np.random.default_rng(0)
    stats = calibrate(model, [{"x": rng.normal(size=(1, 16, 32)).astype(np.float32)} for _ in range(3)],
                      per_channel=["h"])
    path = stats.save(tmp_path / "stats.npz")
    back = CalibrationStats.load(path)
    assert back.model_fingerprint == stats.model_fingerprint and back.samples == 3
    for name, obs in stats.tensors.items():
        o2 = back.get(name)
        assert (o2.min, o2.max, o2.count) == (obs.min, obs.max, obs.count)
        np.testing.assert_array_equal(o2.hist, obs.hist)
    np.testing.assert_array_equal(back.get("h").channel_absmax, stats.get("h").channel_absmax)


def test_npz_stacked_and_folder(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    ds = open_dataset(tmp_path / "c.npz", SPEC)
    got = list(ds)
    assert len(got) == 5 and got[2]["x"].shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(got[2]["x"][0], x[2])
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", x=x[i:i + 1])
    assert len(list(open_dataset(folder, SPEC))) == 3


def test_callable_source(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    for i in range(4):\n"
        "        yield {'x': np.full((1, 3, 4, 4), i, np.float32)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    got = list(open_dataset("mydata:samples", SPEC))
    assert [float(g["x"].mean()) for g in got] == [0, 1, 2, 3]
    got2 = list(open_dataset(f"{tmp_path / 'mydata.py'}:samples", SPEC))
    assert len(got2) == 4


def test_image_folder_matches_npz(digits):
    from edgeq.calibration.data import model_inputs
    from edgeq.model_io import load_model

    folder = digits["calib"].parent / "digits_png"
    if not folder.exists():
        pytest.skip("bundled PNGs not present")
    inputs = model_inputs(load_model(digits["model"]))
    got = list(open_dataset(folder, inputs, preprocess=digits["calib"].parent / "digits_png.yaml"))
    ref = np.load(digits["calib"])["image"]
    assert len(got) == len(list(folder.glob("*.png")))
    np.testing.assert_allclose(got[0]["image"][0], ref[0], atol=1e-5)


@pytest.mark.parametrize("arrays,match", [
    ({"y": np.zeros((2, 3, 4, 4), np.float32)}, "missing key"),
    ({"x": np.zeros((2, 3, 4), np.float32)}, "rank"),
    ({"x": np.zeros((2, 3, 5, 4), np.float32)}, "shape"),
    ({"x": np.zeros((2, 3, 4, 4), np.int64)}, "dtype"),
    ({"x": np.full((2, 3, 4, 4), np.nan, np.float32)}, "NaN"),
    ({"x": np.full((2, 3, 4, 4), np.inf, np.float32)}, "Inf"),
    ({"x": np.zeros((0, 3, 4, 4), np.float32)}, "zero samples"),
])
def test_bad_data_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationDataError, match=match):
        list(open_dataset(tmp_path / "bad.npz", SPEC))


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(CalibrationDataError, match="no .npz"):
        open_dataset(tmp_path, SPEC)
    with pytest.raises(CalibrationDataError, match="not found"):
        open_dataset(tmp_path / "nope.npz", SPEC)


def test_per_channel_observer_keeps_a_uniform_deterministic_sample_of_rows():
    from edgeq.calibration.observers import ROW_SAMPLE, TensorObserver

    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(4, 100, 8)).astype(np.float32) + i for i in range(10)]  # batch i has mean i
    a, b = TensorObserver(per_channel=True), TensorObserver(per_channel=True)
    for x in batches:
        a.update(x)
        b.update(x)
    assert a.rows.shape == (ROW_SAMPLE, 8) and a.rows_seen == 4000
    np.testing.assert_array_equal(a.rows, b.rows)  # reproducible: quantized bytes must not depend on chance
    every = np.concatenate([x.reshape(-1, 8) for x in batches])
    assert all((every == r).all(axis=1).any() for r in a.rows[:50]), "sampled rows are real rows"
    means = np.bincount(np.clip(np.round(a.rows.mean(axis=1)).astype(int), 0, 9), minlength=10)
    assert means.min() > ROW_SAMPLE / 10 * 0.5, means  # late batches are not crowded out by early ones
    assert TensorObserver().rows is None, "only per-channel observers sample rows"
    bad = np.full((1, 3, 8), np.nan, np.float32)
    a.update(bad)
    assert np.isfinite(a.rows).all() and a.rows_seen == 4000


def test_entropy_range_of_a_relu_output_is_not_pulled_down_by_its_zeros():
    """Half the values of a ReLU output are exact zeros (error-free when quantized); they must not drive the KL
    threshold into the bulk of the distribution. uint8 asymmetric has 256 steps on [0, t], int8 symmetric 128."""
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(0, 1, 400000), 0).astype(np.float32)
    obs = TensorObserver()
    obs.update(x)
    q999 = float(np.quantile(x, 0.999))
    hi_u8 = obs.range("entropy", levels=256)[1]
    hi_s8 = obs.range("entropy", levels=256, symmetric=True)[1]
    assert q999 * 0.9 < hi_u8 <= obs.max and q999 * 0.9 < hi_s8 <= obs.max
