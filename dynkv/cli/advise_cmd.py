"""`dynkv advise`: read a running deployment's KVBM metrics (and its frontend's router counters)
over a window and say whether offloading pays, and what to change (docs/advise.md)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape

from dynkv.advise import collect
from dynkv.advise.findings import advise as build_advice
from dynkv.advise.model import Advice
from dynkv.cli.group import EXIT_USAGE, UserError
from dynkv.cli.options import JsonOpt, NameOpt, resolve_from_options
from dynkv.cli.output import emit_json, err, warn
from dynkv.plan.frontend import caller_api_key
from dynkv.supervisor.state import CorruptState

WindowOpt = Annotated[
    float,
    typer.Option(
        "--window", "-w", min=1.0, help="Seconds between the two metric reads (run it under load)."
    ),
]


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"


def render(advice: Advice) -> list[str]:
    what = "KVBM" if advice.workers else "router"  # a fleet without KVBM: its router alone
    lines = [f"{advice.name}: {what} over {advice.window_s:g} s"]
    for w in advice.workers:
        if w.error:
            lines.append(f"  {w.worker}: metrics unavailable ({w.error})")
            continue
        saved = "-" if w.prefill_seconds_saved is None else f"{w.prefill_seconds_saved:.2f} s"
        lines.append(
            f"  {w.worker}: {_num(w.lookup_blocks)} blocks asked, G2 hits "
            f"{_num(w.host_hit_blocks)}, G3 hits {_num(w.disk_hit_blocks)}, new blocks "
            f"{_num(w.new_blocks)}, prefill saved {saved}"
        )
    if not advice.findings:
        lines.append("no findings: nothing to change on this evidence")
    for f in advice.findings:
        where = f" [{f.worker}]" if f.worker else ""
        lines.append(f"\n{f.kind.value}{where}: {f.summary}")
        lines.append(
            "  evidence: "
            + ", ".join(
                f"{k}={_num(v) if not isinstance(v, str) else v}" for k, v in f.evidence.items()
            )
        )
        lines.append(f"  advice: {f.advice}")
        for change in f.change:
            lines.append(f"  change: {change.describe()}")
    for note in advice.notes:
        lines.append(f"\nnote: {note}")
    for item in advice.pending:
        lines.append(f"\npending: {item}")
    return lines


def advise(name: NameOpt = None, json_out: JsonOpt = False, window: WindowOpt = 30.0) -> None:
    """Read the running deployment's KVBM metrics twice, --window seconds apart, and report what
    would make offloading pay: each finding with its numbers and the setting to change. A fleet
    without KVBM has its router judged alone."""
    resolved = resolve_from_options(name=name, require_tier=False, quiet=True)
    dep = resolved.deployment
    try:
        live = collect.running(dep.deployment_dir, caller_api_key(dep))
    except CorruptState as exc:
        raise UserError(
            f"{exc}", f"dynkv down --name {dep.name} cleans it up", exit_code=EXIT_USAGE
        ) from None
    found, roles, front = live.targets, live.roles, live.frontend
    # a fleet without KVBM (`up --no-kvbm`): its router is still worth judging
    router_only = not found and front is not None and len(roles) > 1
    if not found and not router_only:
        raise UserError(
            f"no running deployment named {dep.name!r} with KVBM workers "
            f"(no live worker with a KVBM metrics endpoint in {dep.deployment_dir})",
            f"start one with `dynkv up --name {dep.name}`, or pass the --name it was started with",
            exit_code=EXIT_USAGE,
        )
    settings = next((s for s in (collect.worker_settings(t) for t in found) if s is not None), None)
    if settings is None:
        if found:
            warn(
                "could not read the workers' DYN_KVBM_* environment; advising on this shell's "
                "settings"
            )
        settings = resolved.kvbm
    if not json_out:
        what = f"the router of {len(roles)}" if router_only else f"{len(found)}"
        err.print(
            f"reading {what} worker(s) of {escape(dep.name)} over {window:g} s "
            "(keep the traffic going)…"
        )
    before = collect.snapshot(found, front=front)
    time.sleep(window / 2)
    # halfway: the router finding wants its duplicates in both halves (a habit, not one copy)
    middle = collect.snapshot([], front=front) if front is not None else None
    time.sleep(window / 2)
    after = collect.snapshot(found, front=front)
    advice = build_advice(dep.name, before, after, settings, roles, middle)
    if router_only:
        advice.notes.append(
            "these workers run without KVBM (`dynkv up --no-kvbm`): only the router is judged"
        )
    if json_out:
        emit_json(advice.model_dump(mode="json"))
        return
    for line in render(advice):
        typer.echo(line)
