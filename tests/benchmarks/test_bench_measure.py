"""run_measured reports the child program's own peak memory, not the parent's size at fork time."""

from __future__ import annotations

import sys

import numpy as np

from benchmarks.measure import run_measured


def test_peak_rss_is_the_childs_own_even_when_the_parent_is_large():
    ballast = np.ones(400 << 17)  # 400 MB resident in this process
    m = run_measured([sys.executable, "-c", "import numpy as np, time; a = np.ones(100 << 17); time.sleep(0.3)"])
    assert m.ok and ballast.sum() > 0
    assert 100 < m.peak_rss_mb < 300, m.peak_rss_mb  # ~100 MB of array plus the interpreter and numpy


def test_a_failing_child_reports_its_exit_code_and_output():
    m = run_measured([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert m.returncode == 3 and not m.ok and "boom" in m.output
