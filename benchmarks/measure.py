"""Run a command as a child process and measure its wall time and its own peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
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
    """``cmd`` in a child; peak RSS is the child's own (``os.wait4``), not the max over all children so far."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        timer = threading.Timer(timeout, child.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(child.pid, 0)
        if timer:
            timer.cancel()
        wall = time.perf_counter() - start
        output.seek(0)
        text = output.read().decode(errors="replace")
    return Measured(os.waitstatus_to_exitcode(status), round(wall, 2), round(usage.ru_maxrss / 1024, 1), text)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]
