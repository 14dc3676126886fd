"""scripts/smoke, as CI runs it: command A detached on real vLLM (CPU, tiny model), a chat
completion, a repeated long prompt served from the host tier (seen in `dynkv status --json`),
`dynkv down`, and nothing left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_smoke_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("DYN_KVBM_", "DYNKV_"))}
    env |= {
        "DYNKV_VENV": sys.prefix,  # this interpreter's environment; no set-up step
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "DYNKV_DEVICE": "cpu",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "scripts" / "smoke")], env=env, capture_output=True, text=True, timeout=900
    )
    print(f"\nscripts/smoke: {time.monotonic() - started:.1f} s\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["onboard_blocks_h2d"] > 0 and summary["host_cache_hit_rate"] > 0
    assert "no process left" in proc.stderr
