"""`dynkv restart [SERVICE…]`: have the running deployment's supervisor (a foreground `up`, or the
background one of `up -d`) stop and start chosen services, and wait until they are healthy.

The request travels as a file in the deployment's state dir (`StateStore.add_restart_request`),
written under the state lock; the supervisor takes it at its next check (about a second). The
supervisor restarts, not this command, because only it has the plan (the services' environment
and secrets are not in the state file) and is their parent. With `--rolling` the requests go one
service at a time, each after the one before is healthy again. docs/restart.md.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape

from dynkv.cli.deploy_cmds import _corrupt, _deployment, _no_deployment
from dynkv.cli.group import EXIT_FAILURE, EXIT_USAGE, UserError
from dynkv.cli.options import JsonOpt, NameOpt
from dynkv.cli.output import emit_json, err
from dynkv.kvbm.roles import ROLE_NAMES
from dynkv.supervisor import read_state
from dynkv.supervisor.process import same_process
from dynkv.supervisor.state import CorruptState, DeploymentState, StateStore

ServicesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Services to restart (default: every worker).", show_default=False),
]
WaitOpt = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Wait until the services are healthy again.")
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", "-t", help="Seconds to wait for them to be healthy.")
]
RollingOpt = Annotated[
    bool,
    typer.Option(
        "--rolling",
        help="One service at a time, each healthy again before the next is stopped "
        "(a fleet keeps serving on the others).",
    ),
]
TAKE_WITHIN = 15.0  # seconds for the supervisor to take the request before we call it gone


def restart(
    services: ServicesArg = None,
    name: NameOpt = None,
    wait: WaitOpt = True,
    rolling: RollingOpt = False,
    timeout: TimeoutOpt = 900.0,
    json_out: JsonOpt = False,
) -> None:
    """Restart services of a running deployment (default: every worker), waiting until they
    are healthy again. Works for foreground and detached (`up -d`) deployments."""
    if rolling and not wait:
        raise UserError(
            "--rolling waits for each service before it restarts the next",
            "drop --no-wait, or drop --rolling to ask for every restart at once",
            EXIT_USAGE,
        )
    dep_name, ddir = _deployment(name)
    state = _state(dep_name, ddir)
    chosen = _choose(state, services, dep_name)
    if same_process(state.supervisor_pid, state.supervisor_create_time) is None:
        raise UserError(
            f"no supervisor runs deployment {dep_name!r} (it was started without one, or its "
            "supervisor was killed), so nothing can restart its services",
            f"dynkv down --name {dep_name}, then dynkv up -d --name {dep_name}",
        )
    store = StateStore(ddir)
    if not wait:
        with store.lock():
            store.add_restart_request(chosen)
        if json_out:
            emit_json({"name": dep_name, "asked": chosen})
        else:
            err.print(f"asked the supervisor to restart {escape(', '.join(chosen))}")
        return
    took: dict[str, float] = {}
    for batch in [[svc] for svc in chosen] if rolling else [chosen]:
        asked_at = time.time()
        with store.lock():
            store.add_restart_request(batch)
        took |= _wait(store, dep_name, batch, asked_at, timeout)
    if json_out:
        emit_json({"name": dep_name, "restarted": took})
        return
    for svc, seconds in took.items():
        err.print(f"[green]✓[/green] {escape(svc)} restarted: healthy after {seconds:.1f} s")


def _state(dep_name: str, ddir) -> DeploymentState:
    try:
        state = read_state(ddir)
    except CorruptState as exc:
        raise _corrupt(dep_name, exc) from None
    if state is None:
        raise _no_deployment(dep_name, ddir)
    return state


def _choose(state: DeploymentState, services: list[str] | None, dep_name: str) -> list[str]:
    names = [s.name for s in state.services]
    if not services:
        workers = [s.name for s in state.services if s.role in ROLE_NAMES]
        if not workers:
            raise UserError(
                f"deployment {dep_name!r} has no worker", f"name the services: {', '.join(names)}"
            )
        return workers
    unknown = [s for s in services if s not in names]
    if unknown:
        raise UserError(
            f"no service {', '.join(unknown)} in deployment {dep_name!r}",
            f"name one of: {', '.join(names)}",
            EXIT_USAGE,
        )
    containers = [s for s in services if state.service(s).is_container]  # type: ignore[union-attr]
    if containers:
        raise UserError(
            f"{', '.join(containers)} runs in a container, which dynkv does not restart",
            "docker restart <container>, or dynkv down and up again",
            EXIT_USAGE,
        )
    return list(dict.fromkeys(services))


def _wait(
    store: StateStore, dep_name: str, chosen: list[str], asked_at: float, timeout: float
) -> dict[str, float]:
    """Until every chosen service was started after `asked_at` and is healthy again."""
    began = time.monotonic()
    took: dict[str, float] = {}
    with err.status(f"restarting {', '.join(chosen)}…"):
        while len(took) < len(chosen):
            state = store.snapshot()
            if state is None:
                raise UserError(
                    f"deployment {dep_name!r} was stopped while it restarted",
                    f"dynkv up -d --name {dep_name}",
                )
            for svc in chosen:
                rec = state.service(svc)
                if rec is None or svc in took:
                    continue
                if (rec.started_at or 0) > asked_at and rec.restart_phase == "":
                    took[svc] = time.monotonic() - began
                elif rec.restart_phase == "given_up" and not store.restart_request_path.exists():
                    raise UserError(
                        f"{svc} did not come back: {_last_exit(rec)}",
                        f"read its log: dynkv logs {svc} --name {dep_name}",
                    )
            waited = time.monotonic() - began
            if waited > TAKE_WITHIN and store.restart_request_path.exists():
                raise UserError(
                    f"the supervisor of {dep_name!r} did not take the request in {TAKE_WITHIN:g} s",
                    f"see dynkv status --name {dep_name}; dynkv down and up again if it is stuck",
                )
            if waited > timeout:
                late = ", ".join(s for s in chosen if s not in took)
                raise UserError(
                    f"{late} not healthy within {timeout:g} s of the restart",
                    f"dynkv status --name {dep_name}; dynkv logs {late.split(', ')[0]}",
                    EXIT_FAILURE,
                )
            time.sleep(0.5)
    return {k: round(v, 2) for k, v in took.items()}


def _last_exit(rec) -> str:
    return rec.last_exit.describe() if rec.last_exit is not None else "it exited"
