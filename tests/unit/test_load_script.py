"""`dynkv bench load` (and scripts/load, which calls it): its judgement of memory
(dynkv/bench/rss.py) on synthetic series (a flat line, a curve levelling off as caches fill to
their bound, a leak) and its option checks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynkv.bench.rss import MIB, flatness, tree_rss
from dynkv.cli.main import app

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def series(f, seconds: int = 300, step: int = 5) -> list[tuple[float, int]]:
    return [(t, int(f(t) * MIB)) for t in range(0, seconds + 1, step)]


def test_flat_with_noise_is_flat():
    r = flatness(series(lambda t: 1000 + 3 * math.sin(t)), warmup_s=60)
    assert r.verdict == "flat" and r.flat is True and abs(r.growth_mib) < 5


def test_a_curve_levelling_off_is_settling():
    # +500 MiB approaching a bound with a 40 s time constant: steep early, flat late
    r = flatness(series(lambda t: 2000 + 500 * (1 - math.exp(-t / 40))), warmup_s=30)
    assert r.verdict == "settling" and r.growth_mib > r.limit_mib


def test_a_steady_leak_is_growing():
    r = flatness(series(lambda t: 2000 + 0.5 * t), warmup_s=60)  # 30 MiB/min
    assert r.verdict == "growing" and r.flat is False
    assert r.slope_mib_per_min == pytest.approx(30, rel=0.01)


def test_limits_and_missing_samples():
    small = flatness(series(lambda t: 50 + 0.05 * t), warmup_s=60)  # +12 MiB: under 16 MiB
    assert small.verdict == "flat" and small.limit_mib == 16.0
    assert flatness([], warmup_s=10).verdict is None


def test_tree_rss_of_this_process_and_of_a_gone_one():
    assert tree_rss(__import__("os").getpid()) > 10 * MIB
    assert tree_rss(2**22 + 12345) is None


def test_the_script_is_bench_load_and_bad_options_exit_2_with_cause_and_fix():
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "load.py"), "--clients", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "'--clients'" in proc.stderr and "fix: pass --clients 1 or more" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--duration", "0"], "pass --duration 0.001 or more"),
        (["--max-tokens", "0"], "pass --max-tokens 1 or more"),
        (["--sample", "-1"], "pass --sample 0.001 or more"),
        (["--warmup", "-1"], "pass --warmup 0 or more"),
    ],
)
def test_bench_load_bounds(args, needle):
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["bench", "load", *args])
    assert result.exit_code == 2 and needle in result.stderr and result.stdout == ""


def test_bench_load_of_no_deployment_exits_1_with_cause_and_fix(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith(("DYNKV_", "DYN_KVBM_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("DYNKV_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(
        app, ["bench", "load", "--url", "http://127.0.0.1:9/v1", "--name", "gone"]
    )
    assert result.exit_code == 1
    assert "no deployment named 'gone'" in result.stderr and "fix:" in result.stderr
