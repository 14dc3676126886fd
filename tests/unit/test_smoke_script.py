"""scripts/smoke's modes for a caller that keeps testing the smoke's stack (--keep, then --down):
what they refuse, before anything starts. The smoke itself runs end to end in
tests/e2e/test_frontend_openai.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "smoke.py"


def smoke(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DYNKV_", "DYN_KVBM_"))}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_down_without_a_kept_stack_is_a_usage_error_with_cause_and_fix(tmp_path):
    unset = smoke("--down")
    assert unset.returncode == 2 and unset.stdout == ""
    assert "DYNKV_NAME unset" in unset.stderr and "fix: export" in unset.stderr
    gone = smoke("--down", DYNKV_NAME="nothing", DYNKV_STATE_DIR=str(tmp_path))
    assert gone.returncode == 2
    assert f"no deployment nothing under {tmp_path}" in gone.stderr


def test_keep_and_down_together_are_refused():
    both = smoke("--keep", "--down")
    assert both.returncode == 2 and "not allowed with" in both.stderr
