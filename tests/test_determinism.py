"""Same inputs, same bytes: quantizing twice, in one process or in processes with different hash seeds, writes a
byte-identical model for every built-in target (the digits CNN and a transformer block with an attention mask)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ROOT, make_transformer_block

# Quantizes every (model, target) pair into OUT_DIR; run in fresh interpreters with different PYTHONHASHSEEDs.
_SCRIPT = """
import sys
from edgeq import api
from edgeq.profiles import list_targets
models, out = sys.argv[1:-1], sys.argv[-1]
for spec in models:
    name, model, calib = spec.split(",")
    for p in list_targets():
        api.quantize(model, target=p.name, calib=calib, output=f"{out}/{name}.{p.name}.onnx", check=False)
"""


def _targets() -> list[str]:
    from edgeq.profiles import list_targets

    return [p.name for p in list_targets()]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("determinism")
    onnx.save(make_transformer_block(mask=True), str(root / "block.onnx"))
    rng = np.random.default_rng(0)
    mask = np.ones((6, 16), np.int64)
    mask[:, 12:] = 0
    np.savez(root / "block.npz", x=rng.normal(0, 1, (6, 16, 32)).astype(np.float32), mask=mask)
    d = ROOT / "calibration_data"
    return {"digits": (d / "digits_cnn.onnx", d / "digits_calib.npz"),
            "block": (root / "block.onnx", root / "block.npz")}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def other_process(models, tmp_path_factory):
    """A fresh interpreter with another hash seed quantizing everything, started early to run alongside."""
    out = tmp_path_factory.mktemp("other_process")
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    specs = [f"{name},{m},{c}" for name, (m, c) in models.items()]
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, *specs, str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


_FIRST_RUN: dict[tuple[str, str], bytes] = {}


def _quantize(models, name: str, target: str, out: Path) -> bytes:
    from edgeq import api

    model, calib = models[name]
    res = api.quantize(model, target=target, calib=calib, output=out, check=False)
    assert res.report["output"]["sha256"] == _sha(res.output)
    return res.output.read_bytes()


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("name", ["digits", "block"])
def test_quantize_twice_gives_identical_bytes(models, other_process, tmp_path, name, target):
    first = _quantize(models, name, target, tmp_path / "a.onnx")
    assert first == _quantize(models, name, target, tmp_path / "b.onnx"), f"{name}/{target}: two runs differ"
    q = onnx.load_from_string(first)
    assert any(n.op_type in ("DequantizeLinear", "MatMulNBits") for n in q.graph.node) or \
        any(i.data_type == onnx.TensorProto.FLOAT16 for i in q.graph.initializer), "nothing was quantized"
    _FIRST_RUN[name, target] = first


def test_another_process_with_another_hash_seed_writes_the_same_bytes(models, other_process, tmp_path):
    """Catches set/dict iteration order leaking into the graph (string hashes change with PYTHONHASHSEED)."""
    proc, out = other_process
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for name in models:
        for target in _targets():
            ours = _FIRST_RUN.get((name, target)) or _quantize(models, name, target, tmp_path / "x.onnx")
            assert (out / f"{name}.{target}.onnx").read_bytes() == ours, f"{name}/{target} differs across processes"


def test_equal_inputs_give_equal_report_hashes(models, tmp_path):
    """The reproducibility keys of two runs agree, and identify the inputs by content."""
    from edgeq import api

    model, calib = models["block"]
    reps = [api.quantize(model, target="qnn", calib=calib, output=tmp_path / f"{i}.onnx", check=False).report
            for i in range(2)]
    keys = lambda r: (r["model"]["sha256"], r["calibration"]["data_sha256"], r["profile_sha256"],
                      r["output"]["sha256"], r["seed"], r["versions"])
    assert keys(reps[0]) == keys(reps[1])
    assert reps[0]["model"]["sha256"] == _sha(model)
    assert reps[0]["calibration"]["data_sha256"] == _sha(calib)
