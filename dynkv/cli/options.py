"""Options shared by every command that resolves settings (`config`, `up`, `doctor`, `export`,
`join`, `bench`), each declared once, so that every command's --help says the same of a flag.

A new settings flag: its declaration goes into `SETTINGS_OPTIONS` under the name of the setting
it gives (which makes it a deployment flag, or add it to `KVBM_FLAGS`), and its name into the
`@settings_options(...)` of each command that offers it; the command's code does not change,
since it hands all its flags to `resolve_from_options` at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dynkv.cli.output import warn
from dynkv.settings import Resolved, resolve
from dynkv.settings.deployment import Device, InfraMode, RouterPolicy, Topology

NameOpt = Annotated[
    str | None, typer.Option("--name", "-n", help="Deployment name (default: default).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


# The declaration of every settings option, by parameter name (the settings flags, the profile
# and the engine arguments after --); a command takes its own from here with `settings_options`.
SETTINGS_OPTIONS: dict[str, Any] = {
    "profile": Annotated[
        str | None,
        typer.Option(
            "--profile", "-p", help="Tier profile: a name from `dynkv profiles`, or a path."
        ),
    ],
    "topology": Annotated[
        Topology | None,
        typer.Option(
            "--topology", help="agg (whole requests) or disagg (prefill + decode workers)."
        ),
    ],
    "workers": Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="agg: how many workers (DYNKV_WORKERS; docs/fleet.md); 0 with --advertise: etcd, "
            "NATS and the frontend only, for workers other hosts join (docs/multi-host.md).",
            min=0,
        ),
    ],
    "prefill_workers": Annotated[
        int | None,
        typer.Option("--prefill-workers", help="disagg: how many prefill workers.", min=1),
    ],
    "decode_workers": Annotated[
        int | None,
        typer.Option("--decode-workers", help="disagg: how many decode workers.", min=1),
    ],
    "gpus": Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help="CUDA: the GPUs workers share out (0,1,2,3); each takes tensor_parallel_size.",
        ),
    ],
    "model": Annotated[
        str | None, typer.Option("--model", "-m", help="Model directory or Hugging Face id.")
    ],
    "name": NameOpt,
    "device": Annotated[Device | None, typer.Option("--device", help="auto, cuda or cpu.")],
    "infra": Annotated[
        InfraMode | None, typer.Option("--infra", help="etcd/NATS: embedded, docker or external.")
    ],
    "etcd_endpoints": Annotated[
        str | None, typer.Option("--etcd-endpoints", help="External etcd URL(s), comma-separated.")
    ],
    "nats_url": Annotated[str | None, typer.Option("--nats-url", help="External NATS URL.")],
    "host": Annotated[str | None, typer.Option("--host", help="Frontend bind address.")],
    "port": Annotated[int | None, typer.Option("--port", help="Frontend port.")],
    "advertise": Annotated[
        str | None,
        typer.Option(
            "--advertise",
            help="Serve other hosts at this address: etcd, NATS and the frontend bind it, all over "
            "TLS from a per-deployment CA (docs/multi-host.md).",
        ),
    ],
    "cpu_cache_gb": Annotated[
        float | None, typer.Option("--cpu-cache-gb", help="G2 host tier, decimal GB.")
    ],
    "disk_cache_gb": Annotated[
        float | None, typer.Option("--disk-cache-gb", help="G3 disk tier, decimal GB.")
    ],
    "disk_cache_dir": Annotated[
        Path | None, typer.Option("--disk-cache-dir", help="G3 directory.")
    ],
    "api_key": Annotated[
        str | None,
        typer.Option(
            "--api-key",
            help="Require 'Authorization: Bearer <key>' at the frontend (or DYNKV_API_KEY). Never printed.",
            show_default=False,
        ),
    ],
    "api_key_file": Annotated[
        Path | None,
        typer.Option("--api-key-file", help="Read the frontend's API key from this file."),
    ],
    "tls_cert": Annotated[
        Path | None, typer.Option("--tls-cert", help="Serve the frontend over HTTPS (PEM cert).")
    ],
    "tls_key": Annotated[Path | None, typer.Option("--tls-key", help="Private key of --tls-cert.")],
    "insecure": Annotated[
        bool | None,
        typer.Option(
            "--insecure",
            help="Allow a non-loopback frontend without an API key (docs/security.md).",
            show_default=False,
        ),
    ],
    "router": Annotated[
        RouterPolicy | None,
        typer.Option(
            "--router",
            help="How the frontend picks a worker: round_robin, least_outstanding, session "
            "(affinity by x-session-id / OpenAI user) or kv (where the prompt's prefix is cached; "
            "docs/frontend.md#routing).",
        ),
    ],
    "router_temperature": Annotated[
        float | None,
        typer.Option(
            "--router-temperature",
            help="kv router: 0 picks the lowest estimated TTFT; > 0 samples among near-ties.",
            min=0.0,
        ),
    ],
    "router_tier_weights": Annotated[
        str | None,
        typer.Option(
            "--router-tier-weights",
            help="kv router: G1,G2,G3 weights of a cached block instead of measured rates "
            "(dynamo = 1,0.75,0.25).",
        ),
    ],
    "kvbm": Annotated[
        bool | None,
        typer.Option(
            "--kvbm/--no-kvbm",
            help="Workers with the bundled KVBM connector (default), or plain vLLM (no offload).",
            show_default=False,
        ),
    ],
    "device_kv_gb": Annotated[
        float | None, typer.Option("--device-kv-gb", help="G1 (vLLM's KV cache) per worker, GB.")
    ],
    "max_model_len": Annotated[
        int | None,
        typer.Option(
            "--max-model-len",
            min=16,
            help="Longest sequence a worker accepts (vLLM's --max-model-len; default: the model's).",
        ),
    ],
    "observability": Annotated[
        bool | None,
        typer.Option(
            "--observability/--no-observability",
            help="Also start Prometheus (127.0.0.1:DYNKV_PROMETHEUS_PORT) scraping the stack.",
            show_default=False,
        ),
    ],
    "engine_args": Annotated[
        list[str] | None,
        typer.Argument(
            metavar="-- VLLM_ARGS",
            help="vLLM engine arguments after --, e.g. `-- --max-num-seqs 8` "
            "(they win over the profile's vllm tables; see docs/engine-args.md).",
            show_default=False,
        ),
    ],
}
# The settings flags among them: a parameter name → the setting it gives, the strongest layer.
# Each is named after its setting, except the frontend's --host/--port.
KVBM_FLAGS = {name: name for name in ("cpu_cache_gb", "disk_cache_gb", "disk_cache_dir")}
_NOT_DEPLOYMENT = {"profile", "engine_args", "host", "port", *KVBM_FLAGS}
DEPLOYMENT_FLAGS = {name: name for name in SETTINGS_OPTIONS if name not in _NOT_DEPLOYMENT} | {
    "host": "frontend_host",
    "port": "frontend_port",
}
# The options every deploying command starts with (config, doctor, up, export, join), in order.
WORKER_SHAPE = (
    "profile",
    "topology",
    "workers",
    "prefill_workers",
    "decode_workers",
    "gpus",
    "model",
)
# What doctor checks on this host and up runs there, after WORKER_SHAPE: the deployment and its
# device, where etcd and NATS come from, where the frontend listens and is reached, the KVBM tiers.
ON_THIS_HOST = (
    "name",
    "device",
    "infra",
    "etcd_endpoints",
    "nats_url",
    "host",
    "port",
    "advertise",
    *KVBM_FLAGS,
)


def settings_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A command offers the settings options `names`, declared once in `SETTINGS_OPTIONS`, and
    receives the values given (None: not given) as one dict in its parameter `flags`, ready for
    `resolve_from_options(**flags)`. The signature typer reads (and so --help) has them where
    `flags` stands, in the order of `names`; a name of one of the command's own parameters puts
    that one there among them (`up`'s --served-model-name between --model and --name)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command, eval_str=True).parameters
        if "flags" not in own:
            raise TypeError(f"{command.__name__} takes no 'flags'")
        shared = [n for n in names if n not in own]
        kw = inspect.Parameter.KEYWORD_ONLY
        block = [
            own.get(n) or inspect.Parameter(n, kw, default=None, annotation=SETTINGS_OPTIONS[n])
            for n in names
        ]
        params: list[inspect.Parameter] = []
        for param in own.values():
            if param.name == "flags":
                params += block
            elif param.name not in names:
                params.append(param)
        params = [p.replace(kind=kw) for p in params]  # typer passes them all by name

        @functools.wraps(command)
        def with_flags(**given: Any) -> Any:
            flags = {n: given.pop(n, None) for n in shared}
            return command(**given, flags=flags)

        with_flags.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        with_flags.__annotations__ = {p.name: p.annotation for p in params}
        return with_flags

    return decorate


def resolve_from_options(
    *,
    profile: str | None = None,
    require_tier: bool = True,
    quiet: bool = False,
    engine_args: list[str] | None = None,
    **flags: Any,
) -> Resolved:
    """Flags (keyword arguments named as in `KVBM_FLAGS` / `DEPLOYMENT_FLAGS`; None: not given)
    become the strongest layer; warnings (unknown DYN_KVBM_* names) go to stderr."""
    unknown = flags.keys() - KVBM_FLAGS.keys() - DEPLOYMENT_FLAGS.keys()
    if unknown:
        raise TypeError(f"not a settings flag: {', '.join(sorted(unknown))}")
    resolved = resolve(
        profile=profile,
        kvbm_flags={setting: flags.get(param) for param, setting in KVBM_FLAGS.items()},
        deployment_flags={setting: flags.get(param) for param, setting in DEPLOYMENT_FLAGS.items()},
        require_tier=require_tier,
        engine_args=engine_args,
    )
    if not quiet:
        for message in resolved.warnings:
            warn(message)
    return resolved
