"""`dynkv up`: settings → preflight → plan → supervisor. Foreground streams the logs and stops
everything on Ctrl-C/SIGTERM; `-d` returns once every service is healthy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape

from dynkv.cli.check_report import render_problems
from dynkv.cli.display import (
    LogPrinter,
    ProgressObserver,
    QuietObserver,
    frontend_lines,
    quiet_stdout,
    render_plan,
    say,
    signals_as_interrupt,
    stdout_closed,
    uninterruptible,
)
from dynkv.cli.group import EXIT_FAILURE, EXIT_USAGE, UserError
from dynkv.cli.options import (
    ON_THIS_HOST,
    WORKER_SHAPE,
    JsonOpt,
    resolve_from_options,
    settings_options,
)
from dynkv.cli.output import emit_json, err, warn
from dynkv.doctor import Status
from dynkv.hardware import resolve_device
from dynkv.infra.docker import DockerUnavailable
from dynkv.plan import HostFacts, Plan, build_plan, choose_model
from dynkv.preflight import observability_problems, preflight, problems
from dynkv.settings import SettingsError
from dynkv.settings.deployment import DeploymentSettings
from dynkv.supervisor import (
    AlreadyRunning,
    StartFailed,
    Supervisor,
    WatchResult,
    ensure_not_running,
)
from dynkv.supervisor.background import start_in_background
from dynkv.supervisor.process import SpawnError
from dynkv.supervisor.restart_policy import RestartPolicy

DetachOpt = Annotated[
    bool, typer.Option("--detach", "-d", help="Return once all services are healthy.")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan (argv, env, ports) and start nothing.")
]
ServedNameOpt = Annotated[
    str | None,
    typer.Option(
        "--served-model-name",
        help='The name clients use in "model" (default: the model\'s own name).',
    ),
]
SkipChecksOpt = Annotated[
    bool, typer.Option("--skip-checks", help="Skip the preflight checks (ports, infra, doctor).")
]


@settings_options(
    *WORKER_SHAPE,
    "served_model_name",
    *ON_THIS_HOST,
    "api_key",
    "api_key_file",
    "tls_cert",
    "tls_key",
    "insecure",
    "router",
    "router_temperature",
    "router_tier_weights",
    "kvbm",
    "device_kv_gb",
    "max_model_len",
    "observability",
    "engine_args",
)
def up(
    flags: dict[str, Any],
    served_model_name: ServedNameOpt = None,
    detach: DetachOpt = False,
    dry_run: DryRunOpt = False,
    skip_checks: SkipChecksOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Start etcd, NATS, the vLLM worker with the bundled KVBM connector, and the OpenAI frontend.

    Words after `--` go to every worker's vLLM: `dynkv up -- --max-num-seqs 8`."""
    if json_out and not (dry_run or detach):
        raise UserError(
            "--json needs --dry-run or --detach (the foreground streams logs on stdout)",
            "add -d, or --dry-run",
            EXIT_USAGE,
        )
    resolved = resolve_from_options(**flags, quiet=json_out)
    dep = resolved.deployment
    dev = resolve_device(str(dep.device))
    choice = _model(dep.model, dev, served_model_name, dry_run=dry_run, quiet=json_out)
    if resolved.engine_args and not json_out:
        with err.status("reading vLLM's engine arguments (once per vLLM version)…"):
            facts = HostFacts.detect(resolved, choice, device=dev)
    else:
        facts = HostFacts.detect(resolved, choice, device=dev)
    plan = build_plan(resolved, facts)

    if printed_or_claimed(plan, dry_run=dry_run, json_out=json_out):
        return

    if skip_checks:
        warn(
            "--skip-checks: NOT checking ports, binaries, infra or the host; failures will be less clear"
        )
        blocking = observability_problems(plan)  # cheap, and nothing may start without it
    else:
        with err.status("checking the host (dynkv doctor)…"):
            results = preflight(resolved, plan)
        blocking = problems(results)
        if not json_out:
            render_problems(r for r in results if r.status is Status.WARN)
    if blocking:
        render_problems(blocking)
        raise typer.Exit(EXIT_FAILURE)

    if not json_out:
        for note in plan.notes:
            err.print(f"[yellow]note:[/yellow] {escape(note)}")

    supervise(plan, dep, detach=detach, json_out=json_out)


def supervise(
    plan: Plan,
    dep: DeploymentSettings,
    *,
    detach: bool,
    json_out: bool,
    leave: Callable[[], bool] | None = None,
) -> None:
    """Start the plan under a supervisor that restarts what fails (docs/restart.md); with -d
    report and return, else stream the logs until the end. Shared by `up` and `join` (whose
    `leave` says when the first host asked its nodes to leave)."""
    restart = RestartPolicy(limit=dep.restart_limit, window=dep.restart_window_secs)
    supervisor = Supervisor(plan, observer=QuietObserver(), restart=restart, leave=leave)
    with signals_as_interrupt():
        _start(supervisor, plan.name, detach=detach, quiet=json_out)
        if detach:
            _report_detached(supervisor, json_out)
            return
        _foreground(supervisor)


def _model(model: str | None, device: str, served_name: str | None, *, dry_run: bool, quiet: bool):
    """The served model. A catalogue model not yet in the cache is fetched here, once (a minute
    or two for the default on CPU), with a progress display unless --json."""
    from dynkv.plan.model_source import DEFAULT_CPU_MODEL

    if not (model or dry_run or quiet) and device == "cpu":
        err.print(f"[dim]no --model on CPU: serving {DEFAULT_CPU_MODEL}[/dim]")
    try:
        if dry_run or quiet or not _needs_fetch(model or DEFAULT_CPU_MODEL):
            return choose_model(model, device, generate=not dry_run, served_name=served_name)
        from dynkv.cli.fetch_display import RichFetchProgress

        with RichFetchProgress() as progress:
            return choose_model(model, device, served_name=served_name, progress=progress)
    except SettingsError:
        raise
    except OSError as exc:
        raise UserError(
            f"the model could not be written to the model cache: {exc}",
            "free some disk space or point XDG_CACHE_HOME at a writable directory, or pass --model",
        ) from None
    except Exception as exc:  # dynkv.model.ModelError carries its own cause and fix
        if hasattr(exc, "cause") and hasattr(exc, "fix"):
            raise UserError(exc.cause, exc.fix, EXIT_USAGE) from None
        raise


def _needs_fetch(model: str) -> bool:
    """A catalogue model that is not in the cache yet (a fetch worth a progress display)."""
    try:
        from dynkv.model.catalog import lookup
        from dynkv.model.fetch import installed
    except ImportError:
        return False
    entry = lookup(model)
    return bool(entry and not entry.generated and installed(entry) is None)


def printed_or_claimed(plan: Plan, *, dry_run: bool, json_out: bool) -> bool:
    """`--dry-run`: print the plan and say so (the caller stops). Otherwise refuse a deployment
    of that name that is already running, with the fix. Shared by `up` and `join`."""
    if dry_run:
        if json_out:
            emit_json(plan.to_json())
        else:
            render_plan(plan)
        return True
    try:
        ensure_not_running(plan.deployment_dir, plan.name)
    except AlreadyRunning as exc:
        raise UserError(str(exc), _down_fix(plan.name)) from None
    except DockerUnavailable as exc:
        raise UserError(exc.cause, exc.fix) from None
    return False


def _down_fix(name: str) -> str:
    return f"dynkv down --name {name}   (see it first: dynkv status --name {name})"


def _start(supervisor: Supervisor, name: str, *, detach: bool, quiet: bool) -> None:
    mode = "detached" if detach else "foreground"
    if not quiet:
        err.print(f"[bold]dynkv up[/bold] {escape(name)} ({mode}), state in {supervisor.store.dir}")
    # -d: the supervisor stays in the background to restart what fails (docs/restart.md)
    run = (
        (lambda: start_in_background(supervisor))
        if detach
        else (lambda: supervisor.start(detach=False))
    )
    try:
        if quiet:
            run()
        else:
            with ProgressObserver() as progress:
                supervisor.observer = progress
                try:
                    run()
                finally:
                    supervisor.observer = QuietObserver()
    except AlreadyRunning as exc:
        raise UserError(str(exc), _down_fix(name)) from None
    except StartFailed as exc:
        if exc.log_tail:
            err.print(f"[bold]last lines of {escape(exc.service)}'s log[/bold] {escape(exc.log)}")
            printer = LogPrinter([exc.service], console=err)
            for line in exc.log_tail:
                printer(exc.service, line)
        raise UserError(
            f"{exc.service} {exc.reason}; everything was stopped",
            f"read the log above (full: {exc.log or f'dynkv logs {exc.service}'}), fix the cause, run `dynkv up` again",
        ) from None
    except SpawnError as exc:
        raise UserError(
            str(exc), "re-run scripts/setup-env, or run `dynkv up` without --skip-checks"
        ) from None
    except DockerUnavailable as exc:
        raise UserError(exc.cause, exc.fix) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: everything that had started was stopped[/yellow]")
        raise


def _report_detached(supervisor: Supervisor, json_out: bool) -> None:
    state = supervisor.state
    assert state is not None
    if json_out:
        emit_json(state.to_json())
        return
    name = state.name
    err.print(f"[green]✓[/green] {escape(name)} is up (detached)")
    width = max((len(rec.name) for rec in state.services), default=8)
    for rec in state.services:
        err.print(f"  {rec.name:<{width}} pid {rec.pid or '-':<8} {rec.ports}", markup=False)
    for line in frontend_lines(state):
        err.print(line, markup=False, soft_wrap=True, highlight=False)
    err.print(
        f"  dynkv status --name {name} · dynkv logs -f --name {name} · dynkv down --name {name}",
        markup=False,
    )


def _foreground(supervisor: Supervisor) -> None:
    """Stream the logs until a service dies, `dynkv down` runs elsewhere, Ctrl-C, SIGTERM, SIGHUP
    or our stdout closes; whatever ends it (an exception included), the services are stopped."""
    state = supervisor.state
    assert state is not None
    try:
        for line in frontend_lines(state):
            err.print(line, markup=False, soft_wrap=True, highlight=False)
        err.print(
            f"[green]✓[/green] all services healthy; streaming logs (Ctrl-C stops {state.name})"
        )
        printer = LogPrinter([s.name for s in state.services])
        result = supervisor.watch(printer, output_closed=stdout_closed)
        if result.reason == "died":
            printer = LogPrinter([result.service or "?"], console=err)
            for line in result.log_tail:
                printer(result.service or "?", line)
    except KeyboardInterrupt:
        say("\n[yellow]stopping…[/yellow]")
        raise
    except (OSError, SystemExit):  # EPIPE (rich turns it into SystemExit) or EIO
        result = WatchResult("output_closed")
    finally:
        # rich answers EPIPE on stdout with SystemExit, a closed terminal makes writes fail
        # with EIO: neither may leave the services running
        with uninterruptible():
            supervisor.stop()
    if result.reason == "output_closed":
        quiet_stdout()
        say(f"stdout was closed: {state.name} was stopped")
        raise typer.Exit(EXIT_FAILURE)
    if result.reason == "removed":
        err.print(f"{state.name} was stopped by `dynkv down`")
        return
    if result.reason == "left":  # a joined node (docs/multi-host.md)
        err.print(f"{state.name}: the first host went down and asked its nodes to leave")
        return
    raise UserError(
        f"{result.service} exited with code {result.exit_code}; everything was stopped",
        f"read its log: dynkv logs {result.service} --name {state.name}",
    )
