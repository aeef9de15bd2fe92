"""Faults: an interrupt (SIGINT/SIGTERM) at any stage, an unwritable output folder and a full disk end the run with a
clear error and leave no output, no partial file and no temporary file behind.

The signal tests drive the real CLI in a subprocess. A calibration (or evaluation) callable that sleeps between
samples, or an ``os.fsync`` that sleeps, holds the run in the stage under test; it touches a marker file when it
gets there, and the test then sends the signal.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

from edgeq import api
from edgeq.errors import OutputError

DIGITS = ROOT / "calibration_data"

SLOW_DATA = '''
import pathlib, time
import numpy as np

MARKER = pathlib.Path({marker!r})


def slow():
    for i in range(1000):
        if i == 2:
            MARKER.touch()
        yield {{"image": np.full((1, 1, 8, 8), 0.1 * (i % 7), np.float32)}}
        time.sleep(0.05)
'''

# The real CLI, with fsync slowed down so that a signal lands while the output file is being written.
SLOW_SAVE = '''
import os, pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
real_fsync = os.fsync


def slow_fsync(fd):
    marker.touch()
    time.sleep(60)
    real_fsync(fd)


os.fsync = slow_fsync
sys.argv = ["edgeq", *sys.argv[2:]]
from edgeq.cli import main
main()
'''


@pytest.fixture
def work(tmp_path):
    """An input folder (model + data + slow callables) and an empty output folder."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    shutil.copy(DIGITS / "digits_cnn.onnx", inp / "model.onnx")
    np.savez(inp / "calib.npz", image=np.load(DIGITS / "digits_calib.npz")["image"][:8])
    marker = tmp_path / "reached"
    (inp / "slow_data.py").write_text(SLOW_DATA.format(marker=str(marker)))
    return inp, out, marker


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _interrupt(cmd: list[str], marker: Path, sig: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the run ended (rc {proc.returncode}) before reaching the stage:\n{out}\n{err}")
            if time.monotonic() > deadline:
                pytest.fail("the run never reached the stage under test")
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _edgeq(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeq", *args]


STAGES = {
    "calibration": lambda i, o: _edgeq("quantize", f"{i}/model.onnx", "-t", "tensorrt", "--calib",
                                       f"{i}/slow_data.py:slow", "-o", f"{o}/model.int8.onnx", "--report",
                                       f"{o}/report.json"),
    "calibrate-command": lambda i, o: _edgeq("calibrate", f"{i}/model.onnx", "--calib", f"{i}/slow_data.py:slow",
                                             "-o", f"{o}/stats.npz"),
    "validation": lambda i, o: _edgeq("quantize", f"{i}/model.onnx", "-t", "tensorrt", "--calib", f"{i}/calib.npz",
                                      "--eval", f"{i}/slow_data.py:slow", "-o", f"{o}/model.int8.onnx"),
}


@pytest.mark.parametrize("stage,sig", [(stage, sig) for stage in ("calibration", "save")
                                       for sig in (signal.SIGINT, signal.SIGTERM)]
                         + [("calibrate-command", signal.SIGINT), ("validation", signal.SIGINT)],
                         ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_interrupt_leaves_no_output(stage, sig, work):
    inp, out, marker = work
    before = _listing(inp)
    if stage == "save":
        cmd = [sys.executable, "-c", SLOW_SAVE, str(marker), "quantize", f"{inp}/model.onnx", "-t", "tensorrt",
               "--calib", f"{inp}/calib.npz", "-o", f"{out}/model.int8.onnx"]
    else:
        cmd = STAGES[stage](inp, out)
    res = _interrupt(cmd, marker, sig)
    assert res.returncode == 130, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == "error: interrupted; no output was written"
    assert list(out.iterdir()) == [], "an interrupted run left files in the output folder"
    assert _listing(inp) == before


def _quantize_into(out_dir: Path, **kw):
    return api.quantize(DIGITS / "digits_cnn.onnx", target="tensorrt", calib=DIGITS / "digits_calib.npz",
                        output=out_dir / "model.int8.onnx", **kw)


def _cli_quantize_into(edgeq_cli, out_dir: Path, *extra: str):
    return edgeq_cli("quantize", DIGITS / "digits_cnn.onnx", "-t", "tensorrt", "--calib", DIGITS / "digits_calib.npz",
                     "-o", out_dir / "model.int8.onnx", *extra)


def _clean_failure(res, *words: str) -> None:
    assert res.returncode == 2, res
    assert "Traceback" not in res.output, res
    last = res.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), res


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a read-only bind mount (root ignores file modes; a read-only mount stops it too)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root and mount permission)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_read_only_output_dir(read_only_dir, edgeq_cli):
    res = _cli_quantize_into(edgeq_cli, read_only_dir)
    _clean_failure(res, "not writable", str(read_only_dir))
    assert list(read_only_dir.iterdir()) == []
    with pytest.raises(OutputError, match="not writable"):
        _quantize_into(read_only_dir)


@pytest.mark.parametrize("where", ["/proc", "/proc/self", "/sys"])
def test_pseudo_filesystem_output_dir(where, edgeq_cli):
    """Paths root cannot write to whatever the file modes say; checked before any work is done."""
    res = _cli_quantize_into(edgeq_cli, Path(where))
    _clean_failure(res, "not writable", where)
    with pytest.raises(OutputError, match="not writable"):
        _quantize_into(Path(where))


def test_output_under_a_file(tmp_path, edgeq_cli):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    res = _cli_quantize_into(edgeq_cli, f)
    _clean_failure(res, "not a directory")
    assert f.read_text() == "x"


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled up but for a few KiB: enough to create files, not to write a model."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        filler = mnt / "filler"
        with open(filler, "wb") as fh:
            try:
                fh.write(b"\0" * (64 << 10))
                fh.flush()
            except OSError:
                pass
        with open(filler, "r+b") as fh:
            fh.truncate(max(0, filler.stat().st_size - (12 << 10)))  # ~12 KiB left; the int8 digits model is ~20
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_cli(full_disk, edgeq_cli):
    before = sorted(p.name for p in full_disk.iterdir())
    res = _cli_quantize_into(edgeq_cli, full_disk)
    _clean_failure(res, "No space left on device")
    assert sorted(p.name for p in full_disk.iterdir()) == before, "a partial file was left on the full disk"


def test_full_disk_stats_and_report(full_disk, edgeq_cli, tmp_path):
    before = sorted(p.name for p in full_disk.iterdir())
    res = edgeq_cli("calibrate", DIGITS / "digits_cnn.onnx", "--calib", DIGITS / "digits_calib.npz", "-o",
                    full_disk / "stats.npz")
    if res.returncode == 0:  # the statistics fitted: fill the rest and write a report instead
        pytest.skip("the statistics file fitted into the space left")
    _clean_failure(res, "No space left on device")
    assert sorted(p.name for p in full_disk.iterdir()) == before


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_model(tmp_path, monkeypatch):
    """Without mount permission, a full disk is simulated where it shows up when saving: fsync."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OutputError, match="No space left on device"):
        _quantize_into(out)
    assert list(out.iterdir()) == []


def test_disk_full_while_saving_stats_and_report(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(np, "savez_compressed", _enospc)
    with pytest.raises(OutputError, match="No space left on device"):
        api.calibrate(DIGITS / "digits_cnn.onnx", DIGITS / "digits_calib.npz", stats_out=out / "stats.npz")
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(OutputError, match="No space left on device"):
        _quantize_into(out, report=out / "report.json")
    assert [p.name for p in out.iterdir()] == ["model.int8.onnx"], "only the complete model, no partial report"
