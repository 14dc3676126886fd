"""`dynkv config` and `dynkv profiles`: what will run, and where each value came from."""

from __future__ import annotations

import shlex
from typing import Any

from rich.markup import escape
from rich.table import Table

from dynkv.cli.options import (
    KVBM_FLAGS,
    WORKER_SHAPE,
    JsonOpt,
    resolve_from_options,
    settings_options,
)
from dynkv.cli.output import emit_json, err
from dynkv.plan.engine_args import role_argv
from dynkv.plan.ports import worker_roles
from dynkv.settings import list_profiles


@settings_options(*WORKER_SHAPE, "name", "device", *KVBM_FLAGS, "kvbm", "engine_args")
def config(flags: dict[str, Any], json_out: JsonOpt = False) -> None:
    """Print every resolved setting with its source, the environment each worker receives, and
    the vLLM engine arguments (profile [vllm] tables, words after --)."""
    resolved = resolve_from_options(**flags, quiet=json_out)
    data = resolved.to_json()
    if json_out:
        emit_json(data)
        return
    table = Table(title=f"profile {data['profile']} ({resolved.profile_source})", expand=False)
    table.add_column("setting")
    table.add_column("value")
    table.add_column("source")
    for setting, item in data["settings"].items():
        value = "" if item["value"] is None else str(item["value"])
        style = "bold" if item["source"] != "default" else "dim"
        table.add_row(setting, value, item["source"], style=style)
    err.print(table)
    err.print("[bold]worker environment[/bold]")
    for key, value in data["worker_env"].items():
        err.print(f"  {key}={value}", markup=False)
    _print_engine_args(data["engine_args"])
    if resolved.engine_args:
        for role in worker_roles(
            resolved.deployment.topology
        ):  # what each worker's vLLM gets, layers merged
            words = shlex.join(role_argv(resolved, role, None))
            err.print(f"  {role} workers get: {words}", markup=False, soft_wrap=True)


def _print_engine_args(rows: list[dict]) -> None:
    """One row per argument as written; for one worker the command line wins over its role's
    table, which wins over [vllm] (docs/engine-args.md)."""
    if not rows:
        err.print("[bold]vLLM engine arguments[/bold] none", markup=True)
        return
    table = Table(title="vLLM engine arguments", expand=False)
    for col in ("argument", "value", "workers", "source"):
        table.add_column(col)
    for row in rows:
        if row["source"] == "command-line":
            source = "command line (after --)"
        else:
            source = "profile " + row["where"].split(" of ", 1)[0]
        table.add_row(escape(row["name"]), escape(row["value"]), row["role"], escape(source))
    err.print(table)


def profiles(json_out: JsonOpt = False) -> None:
    """List the tier profiles: name, tiers, sizes, description."""
    rows = []
    for prof in list_profiles():
        rows.append(
            {
                "name": prof.name,
                "tiers": prof.tiers,
                "cpu_cache_gb": prof.kvbm.get("cpu_cache_gb"),
                "disk_cache_gb": prof.kvbm.get("disk_cache_gb"),
                "topology": prof.deployment.get("topology", "agg"),
                "experimental": prof.experimental,
                "description": prof.description,
                "path": str(prof.path),
            }
        )
    if json_out:
        emit_json({"profiles": rows})
        return
    table = Table(expand=False)
    for col in ("name", "tiers", "G2 GB", "G3 GB", "description"):
        table.add_column(col)
    for row in rows:
        name = row["name"] + (" (experimental)" if row["experimental"] else "")
        table.add_row(
            name,
            " → ".join(row["tiers"]),
            "" if row["cpu_cache_gb"] is None else f"{row['cpu_cache_gb']:g}",
            "" if row["disk_cache_gb"] is None else f"{row['disk_cache_gb']:g}",
            row["description"],
        )
    err.print(table)
