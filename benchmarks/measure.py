"""Run a command as a child process and measure its wall time and its own peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Measured:
    returncode: int
    wall_seconds: float
    peak_rss_mb: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_measured(cmd: list[str], *, timeout: float | None = None, cwd: Path = REPO) -> Measured:
    """``cmd`` in a child; peak RSS is the child program's own.

    ``ru_maxrss`` from ``wait4`` is not: a forked child starts as a copy of this process, and Linux carries the
    high-water mark of that copy over ``exec``, so after this process has loaded a model every child would report
    at least this process's size. The child's ``VmHWM`` (the peak of its own address space, which ``exec``
    replaces) is read every 20 ms while it runs; ``ru_maxrss`` is the fallback for a child too short to sample.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        peak_kb = 0
        deadline = start + timeout if timeout else None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak_kb = max(peak_kb, _vm_hwm_kb(child.pid))
            if deadline and time.perf_counter() > deadline:
                child.kill()
            time.sleep(0.02)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        output.seek(0)
        text = output.read().decode(errors="replace")
    peak_mb = peak_kb / 1024 if peak_kb else usage.ru_maxrss / 1024
    return Measured(os.waitstatus_to_exitcode(status), round(wall, 2), round(peak_mb, 1), text)


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]
