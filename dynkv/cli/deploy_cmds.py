"""`dynkv down`, `dynkv status` and `dynkv logs`: they read a deployment's state dir, so they work
from any terminal, for foreground and detached deployments alike."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from dynkv.cli.display import (
    LogPrinter,
    QuietObserver,
    kvbm_lines,
    router_lines,
    status_table,
)
from dynkv.cli.group import EXIT_FAILURE, UserError
from dynkv.cli.options import JsonOpt, NameOpt, resolve_from_options
from dynkv.cli.output import emit_json, err, warn
from dynkv.infra.docker import DockerUnavailable
from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.supervisor import deployment_status, log_sources, stop_deployment
from dynkv.supervisor.logs import follow
from dynkv.supervisor.state import CorruptState, StateStore

WatchOpt = Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")]
IntervalOpt = Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")]
FollowOpt = Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")]
TailOpt = Annotated[
    int | None, typer.Option("--tail", "-n", help="Only the last N lines of each service.")
]
ServicesArg = Annotated[
    list[str] | None, typer.Argument(help="Services to show (default: all).", show_default=False)
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", "-t", help="Seconds to wait after SIGTERM before SIGKILL.")
]


def _deployment(name: str | None) -> tuple[str, Path]:
    """The deployment name and dir, from --name / DYNKV_NAME and DYNKV_STATE_DIR."""
    dep = resolve_from_options(name=name, require_tier=False, quiet=True).deployment
    return dep.name, dep.deployment_dir


def _api_key(name: str | None) -> str | None:
    """The frontend's API key as this caller's settings give it: `status` reads the router from
    the frontend's /metrics with it."""
    from dynkv.plan.frontend import caller_api_key

    return caller_api_key(
        resolve_from_options(name=name, require_tier=False, quiet=True).deployment
    )


def _corrupt(name: str, exc: CorruptState) -> UserError:
    return UserError(
        f"{exc} (a crash while it was written, or an edit)",
        f"dynkv down --name {name} stops whatever it still names and removes it",
    )


def _no_deployment(name: str, ddir: Path) -> UserError:
    return UserError(
        f"no deployment named {name!r} is running (no state in {ddir})",
        f"start it with `dynkv up --name {name}`, or pass the --name it was started with",
    )


def down(name: NameOpt = None, timeout: TimeoutOpt = 10.0, json_out: JsonOpt = False) -> None:
    """Stop every service of the deployment and clean its state (idempotent)."""
    dep_name, ddir = _deployment(name)
    _tell_nodes_to_leave(dep_name, ddir, quiet=json_out)
    try:
        report = stop_deployment(
            ddir, grace=timeout, observer=None if json_out else QuietObserver()
        )
    except DockerUnavailable as exc:
        raise UserError(exc.cause, exc.fix) from None
    for message in report.warnings:
        warn(message)
    if json_out:
        emit_json({"name": dep_name, **report.__dict__})
        return
    if not report.found:
        err.print(f"nothing to stop: no deployment named {dep_name!r} is running")
        return
    extra = []
    if report.stragglers:
        extra.append(f"{report.stragglers} stray process(es) swept")
    if report.killed:
        extra.append(f"{report.killed} needed SIGKILL")
    tail = f" ({'; '.join(extra)})" if extra else ""
    stopped = ", ".join(report.stopped) or "leftovers"
    err.print(
        f"[green]✓[/green] {escape(dep_name)} is down: stopped {escape(stopped)}{escape(tail)}"
    )


def _tell_nodes_to_leave(name: str, ddir: Path, *, quiet: bool) -> None:
    """The first host of an advertised deployment asks its joined nodes to leave, and waits for
    their registrations to go, before its etcd stops (docs/multi-host.md)."""
    from dynkv.join.cluster import cli_tls, request_leave, wait_nodes_gone

    tls = cli_tls(ddir)
    state = StateStore(ddir).snapshot() if tls is not None else None
    if tls is None or state is None or "enroll" not in {s.name for s in state.services}:
        return  # loopback only, not running, or a joined node (which leaves alone)
    try:
        with EtcdClient(state.etcd_endpoints, tls=tls, timeout=2.0) as client:
            if not registrations_elsewhere(client, name):
                return
            request_leave(client, name)
            if not quiet:
                err.print("asking the joined nodes to leave…")
            left = wait_nodes_gone(client, name)
    except EtcdError as exc:
        warn(f"could not ask the joined nodes to leave ({exc}); their workers stay up")
        return
    if left:
        warn(
            f"node(s) {', '.join(left)} did not leave in time; their workers lose etcd with "
            "this host and stay up (run `dynkv down` there)"
        )


def registrations_elsewhere(client: EtcdClient, name: str) -> bool:
    from dynkv.join.cluster import FIRST_HOST, registrations

    return any(node != FIRST_HOST for node in registrations(client, name, None))


def status(
    name: NameOpt = None,
    json_out: JsonOpt = False,
    watch: WatchOpt = False,
    interval: IntervalOpt = 2.0,
) -> None:
    """Each service's pid, uptime, health and ports; per worker the KVBM blocks and hit rates.
    Exit 0 when every service is healthy, 1 otherwise."""
    dep_name, ddir = _deployment(name)
    key = _api_key(name)

    def report():
        try:
            rep = deployment_status(ddir, api_key=key)
        except DockerUnavailable as exc:
            raise UserError(exc.cause, exc.fix) from None
        except CorruptState as exc:
            raise _corrupt(dep_name, exc) from None
        if rep is None:
            raise _no_deployment(dep_name, ddir)
        return rep

    if not watch:
        rep = report()
        hosts = _hosts(dep_name, ddir)
        if json_out:
            emit_json({**rep.to_json(), **({"hosts": hosts} if hosts is not None else {})})
        else:
            err.print(status_table(rep))
            for line in kvbm_lines(rep) + router_lines(rep):
                err.print(line, markup=False, soft_wrap=True)
            for line in host_lines(hosts):
                err.print(line, markup=False, soft_wrap=True, highlight=False)
        if not rep.healthy:
            raise typer.Exit(EXIT_FAILURE)
        return

    if json_out:  # one JSON document per line per refresh
        while True:
            typer.echo(json.dumps(report().to_json(), default=str))
            time.sleep(interval)
    with Live(console=err, auto_refresh=False) as live:
        while True:
            rep = report()
            live.update(
                Group(
                    status_table(rep),
                    *(Text(line) for line in kvbm_lines(rep) + router_lines(rep)),
                ),
                refresh=True,
            )
            time.sleep(interval)


def _hosts(name: str, ddir: Path) -> dict | None:
    """The deployment's registered workers by host (an advertised or joined deployment)."""
    from dynkv.join.cluster import hosts_view

    state = StateStore(ddir).snapshot()
    return None if state is None else hosts_view(ddir, name, state.etcd_endpoints)


def host_lines(hosts: dict | None) -> list[str]:
    if not hosts:
        return []
    if "error" in hosts:
        return [f"deployment across hosts: {hosts['error']}"]
    lines = ["deployment across hosts (registered workers):"]
    for node, workers in hosts.items():
        lines.append(f"  {node}: {len(workers)} worker(s)")
        lines += [f"    {w['id']:<24} {w['role']:<8} {w['url']}" for w in workers]
    return lines


def logs(
    services: ServicesArg = None,
    name: NameOpt = None,
    follow_: FollowOpt = False,
    tail: TailOpt = None,
) -> None:
    """Service logs, prefixed with the service name in its colour (like docker compose)."""
    dep_name, ddir = _deployment(name)
    try:
        heads, sources = log_sources(ddir, services, tail=tail, follow_=follow_)
    except KeyError as exc:
        raise UserError(
            f"no service {exc.args[0]} in deployment {dep_name!r}",
            f"list them with `dynkv status --name {dep_name}`",
        ) from None
    except DockerUnavailable as exc:
        raise UserError(exc.cause, exc.fix) from None
    except CorruptState as exc:
        raise _corrupt(dep_name, exc) from None
    if not heads:
        raise _no_deployment(dep_name, ddir)
    printer = LogPrinter(heads)
    for service, lines in heads.items():
        for line in lines:
            printer(service, line)
    if follow_:
        for service, line in follow(sources):
            printer(service, line)
