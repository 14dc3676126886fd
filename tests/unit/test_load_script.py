"""scripts/load's judgement of memory (scripts/load_rss.py) and its argument checks, on
synthetic series: a flat line, a curve levelling off (caches filling to their bound), a leak."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from load_rss import MIB, flatness, tree_rss  # noqa: E402


def series(f, seconds: int = 300, step: int = 5) -> list[tuple[float, int]]:
    return [(t, int(f(t) * MIB)) for t in range(0, seconds + 1, step)]


def test_flat_with_noise_is_flat():
    r = flatness(series(lambda t: 1000 + 3 * math.sin(t)), warmup_s=60)
    assert r["verdict"] == "flat" and r["flat"] is True and abs(r["growth_mib"]) < 5


def test_a_curve_levelling_off_is_settling():
    # +500 MiB approaching a bound with a 40 s time constant: steep early, flat late
    r = flatness(series(lambda t: 2000 + 500 * (1 - math.exp(-t / 40))), warmup_s=30)
    assert r["verdict"] == "settling" and r["growth_mib"] > r["limit_mib"]


def test_a_steady_leak_is_growing():
    r = flatness(series(lambda t: 2000 + 0.5 * t), warmup_s=60)  # 30 MiB/min
    assert r["verdict"] == "growing" and r["flat"] is False
    assert r["slope_mib_per_min"] == pytest.approx(30, rel=0.01)


def test_limits_and_missing_samples():
    small = flatness(series(lambda t: 50 + 0.05 * t), warmup_s=60)  # +12 MiB: under 16 MiB
    assert small["verdict"] == "flat" and small["limit_mib"] == 16.0
    assert flatness([], warmup_s=10)["verdict"] is None


def test_tree_rss_of_this_process_and_of_a_gone_one():
    assert tree_rss(__import__("os").getpid()) > 10 * MIB
    assert tree_rss(2**22 + 12345) is None


def test_bad_arguments_exit_2():
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "load.py"), "--clients", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--clients must be > 0" in proc.stderr
