"""`dynkv join-token` (on the first host) and `dynkv join TOKEN` (on another host): a node joins a
deployment with workers only (docs/multi-host.md#joining-hosts-join-token-join)."""

from __future__ import annotations

import dataclasses
import datetime
import socket
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from dynkv.cli.group import EXIT_FAILURE, EXIT_USAGE, UserError
from dynkv.cli.options import (
    WORKER_SHAPE,
    JsonOpt,
    NameOpt,
    resolve_from_options,
    settings_options,
)
from dynkv.cli.output import err, warn
from dynkv.cli.up_cmd import (
    DetachOpt,
    DryRunOpt,
    SkipChecksOpt,
    _model,
    printed_or_claimed,
    supervise,
)
from dynkv.hardware import resolve_device
from dynkv.infra.etcd_client import EtcdClient
from dynkv.join.cluster import FIRST_HOST, LeaveCheck, registrations
from dynkv.join.placement import check_placement
from dynkv.join.token import NODE_NAME, TokenError, decode, parse_ttl
from dynkv.kvbm.roles import ROLE_NAMES, Role
from dynkv.plan import HostFacts
from dynkv.plan.join import build_join_plan, node_tls_dir
from dynkv.plan.secret import secret_path
from dynkv.preflight import preflight, problems
from dynkv.supervisor.state import DeploymentState, StateStore
from dynkv.supervisor.status import live_detail
from dynkv.tls.layout import nats_token

TtlOpt = Annotated[
    str,
    typer.Option("--ttl", help="How long the token (and its certificate) is valid: 30m, 24h, 7d."),
]
NodeOpt = Annotated[
    str | None,
    typer.Option(
        "--node", help="The joining node's name (lower case, digits, '-'; default: host name)."
    ),
]
TokenArg = Annotated[
    str, typer.Argument(help="The token `dynkv join-token` printed.", show_default=False)
]
JoinAdvertiseOpt = Annotated[
    str | None,
    typer.Option(
        "--advertise",
        help="This host's address the first host's frontend reaches its workers at (required).",
    ),
]


# ---- join-token -----------------------------------------------------------------------------


def join_token(name: NameOpt = None, ttl: TtlOpt = "24h", node: NodeOpt = None) -> None:
    """Print a token another host joins this deployment with (`dynkv join TOKEN`).

    The token is a secret (it carries the deployment secret and a client key): it goes to stdout
    alone; keep it like a password."""
    try:
        ttl_s = parse_ttl(ttl)
    except ValueError as exc:
        raise UserError(f"--ttl: {exc}", "pass --ttl 30m, 24h or 7d", EXIT_USAGE) from None
    if node is not None and not NODE_NAME.match(node):
        raise UserError(
            f"--node {node!r} is not a node name",
            "use lower-case letters, digits and '-' (at most 32), e.g. --node gpu-1",
            EXIT_USAGE,
        )
    dep = resolve_from_options(name=name, require_tier=False, quiet=True).deployment
    state = _running_state(dep.name, dep.deployment_dir)
    ddir = dep.deployment_dir
    tls_dir = ddir / "tls"
    if (tls_dir / "node.crt").exists():
        raise UserError(
            f"this host is a joined node of {dep.name!r}, not its first host",
            "run `dynkv join-token` on the host that ran `dynkv up --advertise`",
            EXIT_USAGE,
        )
    endpoints = tuple(state.etcd_endpoints)
    services = {s.name: s for s in state.services}
    advertised = (
        endpoints
        and all(e.startswith("https://") for e in endpoints)
        and (tls_dir / "ca.key").is_file()
        and "enroll" in services
    )
    if not advertised:
        raise UserError(
            f"deployment {dep.name!r} serves this host only (it was started without --advertise)",
            f"dynkv down --name {dep.name} && dynkv up -d --name {dep.name} --advertise <this "
            "host's address>",
            EXIT_USAGE,
        )
    try:
        secret = secret_path(ddir).read_text(encoding="ascii").strip()
    except OSError:
        raise UserError(
            f"the deployment secret of {dep.name!r} cannot be read ({secret_path(ddir)})",
            f"dynkv down --name {dep.name} && dynkv up -d --name {dep.name} --advertise <address>",
            EXIT_USAGE,
        ) from None
    advertise = endpoints[0].split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    nats_port = services["nats"].ports.get("client") if "nats" in services else None
    frontend = services.get("frontend")
    roles = {s.role for s in state.services if s.role in ROLE_NAMES}
    topology = None if not roles else ("agg" if Role.AGG in roles else "disagg")
    # how the frontend hands KV from prefill to decode, were disagg workers to register (a
    # first host with --workers 0 serves whatever joins)
    transfer = "nixl" if frontend is not None and "nixl" in frontend.argv else "handoff"
    from dynkv.join.issue import new_token  # cryptography: only when a token is made

    token, text = new_token(
        deployment=dep.name,
        deployment_dir=ddir,
        tls_dir=tls_dir,
        etcd_endpoints=endpoints,
        nats_url=f"tls://{_host(advertise)}:{nats_port}",
        frontend_url=(frontend.info.url if frontend is not None else None) or "",
        registration_secret=secret,
        nats_token=nats_token(secret),
        ttl_s=ttl_s,
        node=node,
        topology=topology,
        disagg_transfer=transfer,
    )
    typer.echo(text)  # the secret, on stdout only: never logged
    until = datetime.datetime.fromtimestamp(token.expires_at).astimezone().isoformat("T", "seconds")
    err.print(
        f"[dim]valid until {until}, for one node; on the other host: "
        "dynkv join <token> --advertise <its address> -d[/dim]"
    )


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _running_state(name: str, ddir: Path) -> DeploymentState:
    state = StateStore(ddir).snapshot()
    if state is None or not live_detail(state):
        raise UserError(
            f"no deployment named {name!r} is running on this host",
            f"start it with `dynkv up -d --name {name} --advertise <this host's address>`",
            EXIT_USAGE,
        )
    return state


# ---- join -------------------------------------------------------------------------------------


def default_node_name(advertise: str) -> str:
    """The host name, made a valid node name; with the address when the name says nothing
    (`localhost`), so two simulated hosts on one box differ."""
    base = "".join(c if c.isalnum() else "-" for c in socket.gethostname().split(".")[0].lower())
    base = base.strip("-")[:20] or "node"
    if base in ("localhost", "node"):
        base = f"{base}-{advertise.replace('.', '-').replace(':', '-')}"
    return base[:32].strip("-")


@settings_options(*WORKER_SHAPE, "device", "engine_args")
def join(
    token: TokenArg,
    advertise: JoinAdvertiseOpt = None,
    node: NodeOpt = None,
    *,
    flags: dict[str, Any],
    detach: DetachOpt = False,
    dry_run: DryRunOpt = False,
    skip_checks: SkipChecksOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Join another host's deployment with this host's workers (and its own G2/G3 tiers).

    They register in the first host's etcd, publish KV events to its NATS and serve its
    frontend over https at --advertise. `dynkv down` here stops them; `dynkv down` on the first
    host makes them leave."""
    try:
        tok = decode(token)
    except TokenError as exc:
        raise UserError(exc.cause, exc.fix, EXIT_USAGE) from None
    if advertise is None:
        raise UserError(
            "join needs --advertise: the address of this host the first host's frontend "
            "reaches its workers at",
            "add --advertise <this host's address> (e.g. --advertise 10.0.0.6)",
            EXIT_USAGE,
        )
    # the token names the deployment, and its topology unless --topology says otherwise
    flags = flags | dict(
        topology=flags["topology"] or tok.topology, name=tok.deployment, advertise=advertise
    )
    resolved = resolve_from_options(**flags, quiet=json_out)
    dep = resolved.deployment
    addr = str(dep.advertise)
    node = node or tok.node or default_node_name(addr)
    if not NODE_NAME.match(node):
        raise UserError(
            f"{node!r} is not a node name",
            "pass --node with lower-case letters, digits and '-' (at most 32)",
            EXIT_USAGE,
        )
    dev = resolve_device(str(dep.device))
    choice = _model(dep.model, dev, None, dry_run=dry_run, quiet=json_out)
    facts = dataclasses.replace(
        HostFacts.detect(resolved, choice, device=dev),
        secret=tok.registration_secret.get_secret_value(),
    )
    plan = build_join_plan(
        resolved,
        facts,
        node=node,
        advertise=addr,
        etcd_endpoints=tok.etcd_endpoints,
        nats_url=tok.nats_url,
        nats_token=tok.nats_token.get_secret_value(),
        frontend_url=tok.frontend_url,
    )
    here = Counter(str(w.role) for w in plan.workers)

    def placement(client: EtcdClient) -> None:
        hosts: dict[str, Counter] = {}
        for host, records in registrations(client, dep.name, None).items():
            hosts[host] = Counter(str(r.role) for r in records)
        hosts[node] = here
        deployed = tok.topology or str(dep.topology)
        check_placement(
            hosts,
            topology=deployed,
            transfer=tok.disagg_transfer,
            joining=node,
            joining_topology=str(dep.topology),
            joining_transfer=_transfer(plan),
        )

    if printed_or_claimed(plan, dry_run=dry_run, json_out=json_out):
        return
    if not skip_checks:
        with err.status("checking the host (dynkv doctor)…"):
            blocking = problems(preflight(resolved, plan))
        if blocking:
            from dynkv.cli.check_report import render_problems

            render_problems(blocking)
            raise typer.Exit(EXIT_FAILURE)
    from dynkv.join.mailbox import EnrollFailed, enroll  # cryptography: only when joining

    tls_dir = node_tls_dir(dep.deployment_dir)
    StateStore(plan.deployment_dir).ensure()
    try:
        with err.status(f"enrolling node {node} with {tok.frontend_url or tok.deployment}…"):
            client_tls = enroll(
                tok, token, node=node, ips=(addr,), tls_dir=tls_dir, check=placement
            )
    except EnrollFailed as exc:
        raise UserError(exc.cause, exc.fix, EXIT_USAGE) from None
    if not json_out:
        err.print(f"[green]✓[/green] node {escape(node)} enrolled in {escape(dep.name)}")
    leave = LeaveCheck(tok.etcd_endpoints, dep.name, client_tls)
    supervise(plan, dep, detach=detach, json_out=json_out, leave=leave)


def _transfer(plan) -> str | None:
    if plan.topology != "disagg":
        return None
    nixl = any("VLLM_NIXL_SIDE_CHANNEL_PORT" in w.env for w in plan.workers)
    return "nixl" if nixl else "handoff"


__all__ = ["FIRST_HOST", "default_node_name", "join", "join_token", "warn"]
