"""`dynkv doctor`: run every preflight check and show ✓ / ! / ✗ with the fix under each problem."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from dynkv.cli.options import (
    CpuGbOpt,
    DeviceOpt,
    DiskDirOpt,
    DiskGbOpt,
    EtcdOpt,
    HostOpt,
    InfraOpt,
    JsonOpt,
    ModelOpt,
    NameOpt,
    NatsOpt,
    PortOpt,
    ProfileOpt,
    TopologyOpt,
    resolve_from_options,
)
from dynkv.cli.output import emit_json, err
from dynkv.doctor import CheckResult, Status, exit_code, run_checks, to_json

SYMBOLS = {Status.OK: ("✓", "green"), Status.WARN: ("!", "yellow"), Status.FAIL: ("✗", "bold red")}


def doctor(
    profile: ProfileOpt = None,
    topology: TopologyOpt = None,
    model: ModelOpt = None,
    name: NameOpt = None,
    device: DeviceOpt = None,
    infra: InfraOpt = None,
    etcd_endpoints: EtcdOpt = None,
    nats_url: NatsOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    cpu_cache_gb: CpuGbOpt = None,
    disk_cache_gb: DiskGbOpt = None,
    disk_cache_dir: DiskDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the GPU, vLLM, memory, disk tier, tier sizes, model, ports and etcd/NATS before
    `dynkv up`; exit 1 when something would fail, 0 when there are at most warnings."""
    resolved = resolve_from_options(
        profile=profile,
        topology=topology,
        model=model,
        name=name,
        device=device,
        infra=infra,
        etcd_endpoints=etcd_endpoints,
        nats_url=nats_url,
        host=host,
        port=port,
        cpu_cache_gb=cpu_cache_gb,
        disk_cache_gb=disk_cache_gb,
        disk_cache_dir=disk_cache_dir,
        require_tier=False,  # "no tier" is reported as a failed check, with its fix
        quiet=True,  # unknown DYN_KVBM_* variables are reported as a check, not as a warning
    )
    results = run_checks(resolved)
    if json_out:
        emit_json(to_json(results))
    else:
        render(results)
    raise typer.Exit(exit_code(results))


def render(results: list[CheckResult]) -> None:
    """One table row per check (symbol, id, wrapped detail). The fix goes under its row as a
    soft-wrapped line outside the table: a table would break a long command at the column edge,
    and a fix must survive copy and paste."""
    id_width = max((len(r.id) for r in results), default=8)
    indent = " " * (1 + 2 + id_width + 2)
    for r in results:
        symbol, style = SYMBOLS[r.status]
        row = Table.grid(padding=(0, 2))
        row.add_column(width=1, no_wrap=True)
        row.add_column(width=id_width, no_wrap=True)
        row.add_column(overflow="fold")
        row.add_row(Text(symbol, style=style), Text(r.id, style="bold"), Text(r.detail))
        err.print(row)
        if r.fix:
            err.print(Text(f"{indent}fix: {r.fix}", style=style), soft_wrap=True)
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    summary = f"{counts[Status.OK]} ok, {counts[Status.WARN]} warning(s), {counts[Status.FAIL]} failure(s)"
    if counts[Status.FAIL]:
        err.print(f"[bold red]✗ doctor: {summary}[/bold red]: `dynkv up` would stop here")
    elif counts[Status.WARN]:
        err.print(f"[yellow]! doctor: {summary}[/yellow]: `dynkv up` can start")
    else:
        err.print(f"[green]✓ doctor: {summary}[/green]")
