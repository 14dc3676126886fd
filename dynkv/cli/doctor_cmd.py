"""`dynkv doctor`: run every preflight check and show ✓ / ! / ✗ with the fix under each problem."""

from __future__ import annotations

from typing import Any

import typer

from dynkv.cli.check_report import render_report
from dynkv.cli.options import (
    ON_THIS_HOST,
    WORKER_SHAPE,
    JsonOpt,
    resolve_from_options,
    settings_options,
)
from dynkv.cli.output import emit_json
from dynkv.doctor import exit_code, run_checks, to_json


@settings_options(
    *WORKER_SHAPE,
    *ON_THIS_HOST,
    "device_kv_gb",
    "max_model_len",
)
def doctor(flags: dict[str, Any], json_out: JsonOpt = False) -> None:
    """Check the GPU, vLLM, memory, disk tier, tier sizes, model, ports and etcd/NATS before
    `dynkv up`; exit 1 when something would fail, 0 when there are at most warnings."""
    resolved = resolve_from_options(
        **flags,
        require_tier=False,  # "no tier" is reported as a failed check, with its fix
        quiet=True,  # unknown DYN_KVBM_* variables are reported as a check, not as a warning
    )
    results = run_checks(resolved)
    if json_out:
        emit_json(to_json(results))
    else:
        render_report(results)
    raise typer.Exit(exit_code(results))
