"""A non-editable install must contain the passes, the target profiles and the bundled example."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


def test_wheel_contains_package_data(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1:]}")
    wheel = next(tmp_path.glob("edgeq-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("edgeq/passes/insert_qdq.py", "edgeq/passes/fold_batchnorm.py", "edgeq/targets/qnn.yaml",
                     "edgeq/targets/tensorrt.yaml", "edgeq/calibration_data/digits_cnn.onnx",
                     "edgeq/calibration_data/digits_calib.npz", "edgeq/cli.py"):
        assert required in names, required
