"""Options shared by every command that resolves settings (`config`, `up`, `doctor`, `bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynkv.cli.output import warn
from dynkv.settings import Resolved, resolve
from dynkv.settings.deployment import Device, InfraMode, RouterPolicy, Topology

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Tier profile: a name from `dynkv profiles`, or a path."),
]
TopologyOpt = Annotated[
    Topology | None,
    typer.Option("--topology", help="agg (whole requests) or disagg (prefill + decode workers)."),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="agg: how many workers (DYNKV_WORKERS; docs/fleet.md); 0 with --advertise: etcd, "
        "NATS and the frontend only, for workers other hosts join (docs/multi-host.md).",
        min=0,
    ),
]
PrefillWorkersOpt = Annotated[
    int | None,
    typer.Option("--prefill-workers", help="disagg: how many prefill workers.", min=1),
]
DecodeWorkersOpt = Annotated[
    int | None,
    typer.Option("--decode-workers", help="disagg: how many decode workers.", min=1),
]
GpusOpt = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        help="CUDA: the GPUs workers share out (0,1,2,3); each takes tensor_parallel_size.",
    ),
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Model directory or Hugging Face id.")
]
NameOpt = Annotated[
    str | None, typer.Option("--name", "-n", help="Deployment name (default: default).")
]
DeviceOpt = Annotated[Device | None, typer.Option("--device", help="auto, cuda or cpu.")]
InfraOpt = Annotated[
    InfraMode | None, typer.Option("--infra", help="etcd/NATS: embedded, docker or external.")
]
EtcdOpt = Annotated[
    str | None, typer.Option("--etcd-endpoints", help="External etcd URL(s), comma-separated.")
]
NatsOpt = Annotated[str | None, typer.Option("--nats-url", help="External NATS URL.")]
HostOpt = Annotated[str | None, typer.Option("--host", help="Frontend bind address.")]
AdvertiseOpt = Annotated[
    str | None,
    typer.Option(
        "--advertise",
        help="Serve other hosts at this address: etcd, NATS and the frontend bind it, all over "
        "TLS from a per-deployment CA (docs/multi-host.md).",
    ),
]
PortOpt = Annotated[int | None, typer.Option("--port", help="Frontend port.")]
CpuGbOpt = Annotated[float | None, typer.Option("--cpu-cache-gb", help="G2 host tier, decimal GB.")]
DiskGbOpt = Annotated[
    float | None, typer.Option("--disk-cache-gb", help="G3 disk tier, decimal GB.")
]
DiskDirOpt = Annotated[Path | None, typer.Option("--disk-cache-dir", help="G3 directory.")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="Require 'Authorization: Bearer <key>' at the frontend (or DYNKV_API_KEY). Never printed.",
        show_default=False,
    ),
]
ApiKeyFileOpt = Annotated[
    Path | None,
    typer.Option("--api-key-file", help="Read the frontend's API key from this file."),
]
TlsCertOpt = Annotated[
    Path | None, typer.Option("--tls-cert", help="Serve the frontend over HTTPS (PEM cert).")
]
TlsKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="Private key of --tls-cert.")]
InsecureOpt = Annotated[
    bool | None,
    typer.Option(
        "--insecure",
        help="Allow a non-loopback frontend without an API key (docs/security.md).",
        show_default=False,
    ),
]
RouterOpt = Annotated[
    RouterPolicy | None,
    typer.Option(
        "--router",
        help="How the frontend picks a worker: round_robin, least_outstanding or session "
        "(affinity by x-session-id / OpenAI user).",
    ),
]
KvbmOpt = Annotated[
    bool | None,
    typer.Option(
        "--kvbm/--no-kvbm",
        help="Workers with the bundled KVBM connector (default), or plain vLLM (no offload).",
        show_default=False,
    ),
]
ObservabilityOpt = Annotated[
    bool | None,
    typer.Option(
        "--observability/--no-observability",
        help="Also start Prometheus (127.0.0.1:DYNKV_PROMETHEUS_PORT) scraping the stack.",
        show_default=False,
    ),
]
DeviceKvOpt = Annotated[
    float | None, typer.Option("--device-kv-gb", help="G1 (vLLM's KV cache) per worker, GB.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
EngineArgsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="-- VLLM_ARGS",
        help="vLLM engine arguments after --, e.g. `-- --max-num-seqs 8` "
        "(they win over the profile's vllm tables; see docs/engine-args.md).",
        show_default=False,
    ),
]


def resolve_from_options(
    *,
    profile: str | None = None,
    topology: Topology | None = None,
    workers: int | None = None,
    prefill_workers: int | None = None,
    decode_workers: int | None = None,
    gpus: str | None = None,
    model: str | None = None,
    name: str | None = None,
    device: Device | None = None,
    infra: InfraMode | None = None,
    etcd_endpoints: str | None = None,
    nats_url: str | None = None,
    host: str | None = None,
    port: int | None = None,
    advertise: str | None = None,
    cpu_cache_gb: float | None = None,
    disk_cache_gb: float | None = None,
    disk_cache_dir: Path | None = None,
    api_key: str | None = None,
    api_key_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    insecure: bool | None = None,
    router: RouterPolicy | None = None,
    kvbm: bool | None = None,
    observability: bool | None = None,
    device_kv_gb: float | None = None,
    require_tier: bool = True,
    quiet: bool = False,
    engine_args: list[str] | None = None,
) -> Resolved:
    """Flags become the strongest layer; warnings (unknown DYN_KVBM_* names) go to stderr."""
    resolved = resolve(
        profile=profile,
        kvbm_flags={
            "cpu_cache_gb": cpu_cache_gb,
            "disk_cache_gb": disk_cache_gb,
            "disk_cache_dir": disk_cache_dir,
        },
        deployment_flags={
            "topology": topology,
            "workers": workers,
            "prefill_workers": prefill_workers,
            "decode_workers": decode_workers,
            "gpus": gpus,
            "model": model,
            "name": name,
            "device": device,
            "infra": infra,
            "etcd_endpoints": etcd_endpoints,
            "nats_url": nats_url,
            "frontend_host": host,
            "frontend_port": port,
            "advertise": advertise,
            "api_key": api_key,
            "api_key_file": api_key_file,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "insecure": insecure,
            "router": router,
            "kvbm": kvbm,
            "observability": observability,
            "device_kv_gb": device_kv_gb,
        },
        require_tier=require_tier,
        engine_args=engine_args,
    )
    if not quiet:
        for message in resolved.warnings:
            warn(message)
    return resolved
