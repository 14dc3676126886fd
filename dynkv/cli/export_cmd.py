"""`dynkv export compose|kubernetes`: the deployment `dynkv up` would run, for containers.

The settings resolve exactly as for `up` (the same options, the same layers) and `build_plan`
builds the plan; only the host facts describe the target instead of this machine: the image's
`python3`, no inherited environment, no live deployment secret, NIXL present on CUDA (the
official vLLM image ships it). The exporters (dynkv.export) turn the plan into documents.

Without `-o` the YAML goes to stdout and no secret is made: stderr says how to create them.
With `-o DIR` the files are written there, and the secrets, freshly generated (never this host's
live ones), go into 0600 files that a later export into the same DIR keeps. docs/export.md.
"""

from __future__ import annotations

import os
import secrets
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from dynkv import __version__
from dynkv.cli.group import UserError
from dynkv.cli.options import WORKER_SHAPE, resolve_from_options, settings_options
from dynkv.cli.output import err
from dynkv.cli.up_cmd import ServedNameOpt
from dynkv.export import compose, kubernetes
from dynkv.export.containers import (
    CONTAINER_PYTHON,
    ExportOptions,
    parse_g3_volume,
    skipped,
)
from dynkv.export.render import escape_dollars, header, to_yaml
from dynkv.hardware import resolve_device
from dynkv.plan import HostFacts, Plan, build_plan, choose_model
from dynkv.plan.engine_args import detect_spec
from dynkv.plan.fleet import per_worker_gpus, worker_total
from dynkv.plan.frontend import API_KEY_ENV
from dynkv.settings.resolve import Resolved
from dynkv.vllm_args import VllmArgSpec
from dynkv.worker.record import DEPLOYMENT_SECRET_ENV

DEFAULT_IMAGE = f"dynkv:{__version__}"  # what deploy/docker/Dockerfile builds (docs/export.md)


class Target(StrEnum):
    COMPOSE = "compose"
    KUBERNETES = "kubernetes"


TargetArg = Annotated[Target, typer.Argument(help="compose or kubernetes.", show_default=False)]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Write the files (and freshly generated secrets, 0600) into this directory; "
        "without it the YAML goes to stdout.",
    ),
]
ImageOpt = Annotated[
    str | None,
    typer.Option(
        "--image",
        help=f"The dynkv image of the frontend and the workers (default {DEFAULT_IMAGE}, "
        "built from deploy/docker/Dockerfile).",
    ),
]
G3VolumeOpt = Annotated[
    str,
    typer.Option(
        "--g3-volume",
        help="kubernetes: the G3 pools' volume: emptyDir, pvc:NAME or hostPath:/path.",
    ),
]


@settings_options(
    *WORKER_SHAPE,
    "served_model_name",
    "name",
    "device",
    "host",
    "port",
    "cpu_cache_gb",
    "disk_cache_gb",
    "insecure",
    "router",
    "kvbm",
    "device_kv_gb",
    "max_model_len",
    "engine_args",
)
def export(
    target: TargetArg,
    flags: dict[str, Any],
    served_model_name: ServedNameOpt = None,
    output: OutputOpt = None,
    image: ImageOpt = None,
    g3_volume: G3VolumeOpt = "emptyDir",
) -> None:
    """Render the deployment `dynkv up` would run as a compose file or Kubernetes manifests.

    Words after `--` go to every worker's vLLM, as for `up`. Nothing is started."""
    volume = parse_g3_volume(g3_volume)  # a bad value fails before anything else
    resolved = resolve_from_options(**flags)
    plan, spec = _plan(resolved, served_model_name)
    dep = resolved.deployment
    options = ExportOptions(
        image=image or DEFAULT_IMAGE,
        etcd_image=dep.etcd_image,
        nats_image=dep.nats_image,
        g3_volume=volume,
        gpus_per_role={str(r): n for r, n in per_worker_gpus(resolved, spec).items()}
        if plan.device == "cuda"
        else {},
        profile_text=_read(resolved.profile.path),
    )
    source = f"profile {resolved.profile.name}, {plan.topology}, deployment {plan.name}"
    if target is Target.COMPOSE:
        text = to_yaml(
            [escape_dollars(compose.compose_file(plan, options))],
            head=header("compose file", source),
        )
        needed = compose.secret_env_files(plan, options)
        main_file = "compose.yaml"
    else:
        text = to_yaml(kubernetes.manifests(plan, options), head=header("manifests", source))
        needed = {f"{kubernetes.base_name(plan)}-keys.yaml": kubernetes.secret_names(plan, options)}
        main_file = f"{kubernetes.base_name(plan)}.yaml"
    for note in skipped(plan):
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    if output is None:
        sys.stdout.write(text)
        _say_secret_steps(target, plan, needed)
        return
    _write(output, target, plan, main_file, text, needed)


def _plan(resolved: Resolved, served_name: str | None) -> tuple[Plan, VllmArgSpec | None]:
    """The plan `up` would build, for the target's host rather than this one."""
    dep = resolved.deployment
    dev = resolve_device(str(dep.device))
    choice = choose_model(dep.model, dev, generate=False, served_name=served_name)
    spec, unchecked = detect_spec(resolved, sys.executable)
    facts = HostFacts(
        device=dev,
        cpus=tuple(range(max(2, worker_total(dep)))),  # the container's, not this host's
        python=CONTAINER_PYTHON,
        model=choice,
        environ={},
        nixl=dev == "cuda",  # the official vLLM image ships NIXL
        secret=None,  # the containers read theirs from the Secret / env file
        vllm_args=spec,
        vllm_args_unchecked=unchecked,
    )
    return build_plan(resolved, facts), spec


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _generated(names: tuple[str, ...], shared: dict[str, str]) -> dict[str, str]:
    """Fresh values, one per name, the same for a name every file shares (the deployment
    secret must match between the frontend and the workers)."""
    for n in names:
        if n not in shared:
            shared[n] = secrets.token_urlsafe(32) if n == API_KEY_ENV else secrets.token_hex(32)
    return {n: shared[n] for n in names}


def _write(
    directory: Path,
    target: Target,
    plan: Plan,
    main_file: str,
    text: str,
    needed: dict[str, tuple[str, ...]],
) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / main_file).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(
            f"cannot write the export into {directory}: {exc.strerror}",
            "pass -o with a directory you can write",
        ) from None
    err.print(f"wrote {directory / main_file}")
    shared: dict[str, str] = {}
    for filename, names in needed.items():
        path = directory / filename
        if path.exists():
            err.print(f"kept {path} (its secrets stay: running containers use them)")
            continue
        values = _generated(names, shared)
        if target is Target.COMPOSE:
            body = "".join(f"{k}={v}\n" for k, v in values.items())
        else:
            body = to_yaml([kubernetes.secret_manifest(plan, values)])
        _write_private(path, body)
        err.print(
            f"wrote {path} (0600: generated secrets {', '.join(names)})",
            markup=False,
            soft_wrap=True,
        )
    if any(API_KEY_ENV in names for names in needed.values()):
        err.print(
            f"the frontend's API key ({API_KEY_ENV}) is in the secrets file above; "
            "clients send it as 'Authorization: Bearer <key>'",
            markup=False,
            soft_wrap=True,
        )
    apply = (
        f"docker compose -f {directory / main_file} up -d"
        if target is Target.COMPOSE
        else f"kubectl apply -f {directory}"
    )
    err.print(f"next: {apply}")


def _write_private(path: Path, body: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(body)


def _say_secret_steps(target: Target, plan: Plan, needed: dict[str, tuple[str, ...]]) -> None:
    """How to create the secrets the YAML references (names only, never values)."""
    if target is Target.COMPOSE:
        for filename, names in needed.items():
            lines = ", ".join(f"{n}=<openssl rand -hex 32>" for n in names)
            err.print(
                f"create {filename} next to the compose file (mode 0600): {lines}",
                markup=False,
                soft_wrap=True,
            )
        err.print(
            f"({DEPLOYMENT_SECRET_ENV} must be the same in both; or use -o DIR)",
            markup=False,
            soft_wrap=True,
        )
        return
    for secret, names in needed.items():
        literals = " ".join(f'--from-literal={n}="$(openssl rand -hex 32)"' for n in names)
        err.print(
            f"create the Secret first: kubectl create secret generic "
            f"{secret.removesuffix('.yaml')} {literals}",
            markup=False,
            soft_wrap=True,
        )
