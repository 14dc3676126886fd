"""`dynkv doctor`: run every preflight check and show ✓ / ! / ✗ with the fix under each problem."""

from __future__ import annotations

import typer

from dynkv.cli.check_report import render_report
from dynkv.cli.options import (
    CpuGbOpt,
    DecodeWorkersOpt,
    DeviceOpt,
    DiskDirOpt,
    DiskGbOpt,
    EtcdOpt,
    GpusOpt,
    HostOpt,
    InfraOpt,
    JsonOpt,
    ModelOpt,
    NameOpt,
    NatsOpt,
    PortOpt,
    PrefillWorkersOpt,
    ProfileOpt,
    TopologyOpt,
    WorkersOpt,
    resolve_from_options,
    settings_flags,
)
from dynkv.cli.output import emit_json
from dynkv.doctor import exit_code, run_checks, to_json


def doctor(
    profile: ProfileOpt = None,
    topology: TopologyOpt = None,
    workers: WorkersOpt = None,
    prefill_workers: PrefillWorkersOpt = None,
    decode_workers: DecodeWorkersOpt = None,
    gpus: GpusOpt = None,
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
        **settings_flags(locals()),
        require_tier=False,  # "no tier" is reported as a failed check, with its fix
        quiet=True,  # unknown DYN_KVBM_* variables are reported as a check, not as a warning
    )
    results = run_checks(resolved)
    if json_out:
        emit_json(to_json(results))
    else:
        render_report(results)
    raise typer.Exit(exit_code(results))
