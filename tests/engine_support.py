"""Runs the engine driver (tests/e2e/kvbm_engine.py: one vLLM engine with the dynkv connector,
driven through a scenario) in a child process, as the KVBM and real-model e2e tests do: the
launcher's DYN_KVBM_*/DYNKV_* variables left out, the threads pinned to this process's first two
cores, the KVBM metrics on a free port, the G3 pool under `tmp`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynkv.plan.cpu import CPU_ENGINE_DEFAULTS
from dynkv.ports import free_port

ENGINE = Path(__file__).parent / "e2e" / "kvbm_engine.py"
ROOT = Path(__file__).resolve().parents[1]


def pinned_cpus() -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:2])


def run_engine_driver(
    config: Mapping[str, Any], env: Mapping[str, str], tmp: Path, *, timeout: float
) -> tuple[dict, str]:
    """(the scenario's RESULT, the driver's whole output); `env` wins over the defaults."""
    port = free_port()
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DYN_KVBM_", "DYNKV_"))
    } | {
        "VLLM_CPU_OMP_THREADS_BIND": pinned_cpus(),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        **CPU_ENGINE_DEFAULTS,  # what dynkv's plan gives a CPU engine (docs/fleet.md#cpu-engines)
        "DYN_KVBM_METRICS": "true",
        "DYN_KVBM_METRICS_PORT": str(port),
        "DYN_KVBM_DISK_CACHE_DIR": str(tmp / "g3"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, str(ENGINE), json.dumps({"metrics_port": port, **config})],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:]
    return json.loads(lines[-1][len("RESULT ") :]), out
