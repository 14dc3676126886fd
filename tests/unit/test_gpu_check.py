"""scripts/gpu-check without a GPU: valid JSON naming every check it skipped, nothing started."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_one_json_summary_with_every_check_skipped():
    env = {**os.environ, "DYNKV_VENV": sys.prefix}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["checks"]) == {"environment", "byte_exact", "w1_native", "disagg_nixl"}
    assert summary["skipped"] == list(summary["checks"]) and summary["passed"] is True
    for check in summary["checks"].values():
        assert check["status"] == "skipped" and check["reason"].startswith("dry run")
    assert "--kv-offloading-size" not in proc.stdout  # names, not flags: what W1 runs is below
    assert "native" in summary["checks"]["w1_native"]["reason"]


def env_result(gc, *, cuda: bool, nixl: bool, failed: bool = False):
    out = gc.result("failed" if failed else "passed", "ImportError: x" if failed else "")
    out["numbers"] = {"cuda": cuda, "nixl": nixl}
    return out


def test_without_cuda_every_gpu_check_is_skipped_with_the_reason():
    gc = load_script()
    plan = gc.plan(env_result(gc, cuda=False, nixl=False), dry_run=False)
    assert all(isinstance(v, str) and "no CUDA device" in v for v in plan.values())


def test_with_cuda_the_checks_run_and_nixl_needs_its_import():
    gc = load_script()
    plan = gc.plan(env_result(gc, cuda=True, nixl=False), dry_run=False)
    assert plan["byte_exact"] is gc.byte_exact and plan["w1_native"] is gc.w1_native
    assert "import nixl" in plan["disagg_nixl"]
    assert gc.plan(env_result(gc, cuda=True, nixl=True), dry_run=False)["disagg_nixl"] is (
        gc.disagg_nixl
    )
    broken = gc.plan(env_result(gc, cuda=True, nixl=True, failed=True), dry_run=False)
    assert all("environment check failed" in v for v in broken.values())


def test_the_limits_fit_the_eight_minute_promise():
    gc = load_script()
    assert gc.DEADLINE_S <= 480 and sum(gc.LIMITS.values()) <= gc.DEADLINE_S + 90
    assert set(gc.W1["only"]) >= {"native", "g2", "floor"}
