"""`dynkv bench compare --profiles gpu-cpu` for real, kept short: two stacks (the no-offload
baseline and gpu-cpu) of the generated tiny model, each brought up with `dynkv up -d`, loaded
with the same tiny multi-turn workload, and taken down. About 100 s here (two `up`s); the
measurements themselves are not judged (a benchmark is not a test): the shape is, the baseline
runs plain vLLM, the KVBM stack's metrics are scraped, and nothing is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dynkv.supervisor.process import marked_processes, marker_prefix

pytestmark = pytest.mark.e2e


def test_compare_baseline_and_gpu_cpu(tmp_path, e2e_cache):
    out = tmp_path / "cmp"
    argv = [sys.executable, "-m", "dynkv.cli.main", "bench", "compare", "--profiles", "gpu-cpu"]
    argv += ["--users", "2", "--rounds", "2", "--system-tokens", "128", "--question-tokens", "32"]
    argv += ["--answer-tokens", "4", "--ignore-eos", "--concurrency", "2"]
    argv += ["--device-kv-gb", "0.01", "--cpu-cache-gb", "0.1", "--max-model-len", "2048"]
    argv += ["--stack-env", "DYNKV_STARTUP_TIMEOUT_SECS=300", "--out", str(out), "--json"]
    argv += ["--stack-model", "dynkv-tiny"]  # fast; the default (a real model) is not needed here
    started = time.monotonic()
    env = os.environ | {"XDG_CACHE_HOME": str(e2e_cache)}  # the model, for this and later stacks
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    print(f"\nbench compare (2 stacks): {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(proc.stdout)
    assert json.loads((out / "report.json").read_text()) == data
    base, cpu = data["runs"]
    assert (base["label"], cpu["label"]) == ("no offload", "gpu-cpu")
    for run in (base, cpu):
        assert (run["requests"], run["completed"], run["errors"]) == (4, 4, 0)
        assert run["output_tokens"] == 16 and run["stack"]["error"] is None
    # the same prompts (round 2 carries each stack's own answers, so allow a few tokens)
    assert abs(base["prompt_tokens"] - cpu["prompt_tokens"]) < 0.1 * base["prompt_tokens"]
    assert base["config"]["metrics_urls"] == []
    assert base["hit_rates"] == {"host": None, "disk": None}
    (target,) = cpu["kvbm"]["targets"]
    assert target["error"] is None and target["kvbm_matched_tokens"] is not None
    assert cpu["stack"]["env"]["DYN_KVBM_CPU_CACHE_GB"] == "0.1"

    state = out / "stacks" / "state"
    base_log = (state / base["stack"]["name"] / "logs" / "worker.log").read_text()
    cpu_log = (state / cpu["stack"]["name"] / "logs" / "worker.log").read_text()
    assert "DynkvConnector" in cpu_log and "DynkvConnector" not in base_log
    assert "| no offload | 4 | 0 |" in (out / "report.md").read_text()
    assert (out / "ttft.png").stat().st_size > 1000
    for run in (base, cpu):
        assert marked_processes(marker_prefix(state / run["stack"]["name"])) == []
        assert not (state / run["stack"]["name"] / "state.json").exists()
    assert not list((out / "stacks" / "kvbm-disk").glob("*"))  # pools deleted after each stack
