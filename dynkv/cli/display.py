"""Rich renderings shared by `up`, `status` and `logs`: start-up progress, colour-prefixed log
lines (docker compose style), the plan of a dry run, and the status table."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dynkv.cli.output import err
from dynkv.plan.model import Plan, Service, mask_env
from dynkv.supervisor import DeploymentState, Observer, StatusReport

# Log lines are data: stdout, so `dynkv logs worker | grep` works (colour only on a terminal).
out = Console(highlight=False, soft_wrap=True)
COLOURS = ("cyan", "yellow", "green", "magenta", "blue", "bright_red", "bright_green")


class LogPrinter:
    """`name | line`, one colour per service, names padded to a common width."""

    def __init__(self, names: Iterable[str], console: Console = out) -> None:
        self.names = list(names)
        self.width = max((len(n) for n in self.names), default=0)
        self.console = console

    def colour(self, name: str) -> str:
        if name not in self.names:
            self.names.append(name)
        return COLOURS[self.names.index(name) % len(COLOURS)]

    def __call__(self, name: str, line: str) -> None:
        prefix = Text(f"{name:<{self.width}} | ", style=self.colour(name))
        self.console.print(prefix + Text(line), markup=False, highlight=False, soft_wrap=True)


class _StateColumn(SpinnerColumn):
    """A spinner while a service starts, ✓ once healthy, ✗ when it failed."""

    def render(self, task):  # type: ignore[override]
        if task.fields.get("failed"):
            return Text("✗", style="red")
        return super().render(task)


class ProgressObserver(Observer):
    """A spinner per service with its elapsed time and the last line of its log, so a model
    that takes minutes to load visibly makes progress."""

    def __init__(self, console: Console = err) -> None:
        self.progress = Progress(
            _StateColumn(finished_text="[green]✓[/green]"),
            TextColumn("[bold]{task.fields[name]:<8}[/bold]"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[line]}", markup=False),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def starting(self, service: Service) -> None:
        self.tasks[service.name] = self.progress.add_task(
            service.name, total=1, name=service.name, line="starting"
        )

    def waiting(self, service: Service, elapsed: float, last_line: str, detail: str) -> None:
        width = max(self.progress.console.width - 30, 20)
        line = (last_line or detail)[:width]
        self.progress.update(self.tasks[service.name], line=line)

    def healthy(self, service: Service, elapsed: float) -> None:
        ports = ", ".join(f"{k} {v}" for k, v in service.ports.items())
        self.progress.update(
            self.tasks[service.name], completed=1, line=f"healthy in {elapsed:.1f} s ({ports})"
        )

    def failed(self, service: Service, reason: str) -> None:
        task = self.tasks[service.name]
        self.progress.update(task, completed=1, failed=True, line=f"FAILED: {reason}")

    def stopping(self, name: str) -> None:
        say(f"[dim]stopping {escape(name)}[/dim]")


class QuietObserver(Observer):
    def stopping(self, name: str) -> None:
        say(f"[dim]stopping {escape(name)}[/dim]")


def say(message: str) -> None:
    """A line on stderr that may find no terminal (closed: EIO) or no reader (EPIPE): teardown
    goes on either way."""
    with contextlib.suppress(OSError):
        err.print(message)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal was closed) to `dynkv up` tear down like Ctrl-C: the
    services run in sessions of their own and get no signal themselves, so without this they
    would outlive `up`. Restored afterwards; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Teardown must finish: a second Ctrl-C (or the SIGHUP that follows a closed terminal)
    would leave half the services running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def stdout_closed() -> bool:
    """Nobody reads our stdout any more (`dynkv up | head` after head exited): the write end of
    a pipe whose reader is gone polls as an error, before a write fails with EPIPE."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test runner's buffer)
        return False
    poller = select.poll()
    poller.register(fd, 0)  # errors and hang-ups are reported whatever the mask
    return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in poller.poll(0))


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush into a closed pipe does
    not print a BrokenPipeError on the way out."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def render_plan(plan: Plan) -> None:
    err.print(
        f"[bold]plan[/bold] {escape(plan.name)}: {plan.topology} on {plan.device}, "
        f"infra {plan.infra}, state {escape(plan.deployment_dir)}"
    )
    for probe in plan.external:
        err.print(f"  external: {escape(probe.describe())}")
    for svc in plan.services:
        deps = f" (after {', '.join(svc.depends_on)})" if svc.depends_on else ""
        ports = ", ".join(f"{k}={v}" for k, v in svc.ports.items())
        err.print(f"\n[bold]{escape(svc.name)}[/bold] [dim]{svc.role}{deps}[/dim]  ports {ports}")
        if svc.container is not None:
            c = svc.container
            err.print(
                f"  image   {escape(c.image)} {escape(shlex.join(c.command))}", soft_wrap=True
            )
            if c.network_mode:
                err.print(f"  network {escape(c.network_mode)}")
        else:
            err.print("  argv    " + escape(shlex.join(svc.to_json()["argv"])), soft_wrap=True)
        for key, value in mask_env(svc.env).items():
            err.print(f"  env     {key}={value}", markup=False, soft_wrap=True)
        for key in svc.env_unset:
            err.print(f"  unset   {key}", markup=False)
        for path in svc.files:
            err.print(f"  file    {escape(path)} (written at start, 0600)")
        for probe in svc.probes:
            err.print(f"  ready   {escape(probe.describe())}")
        if svc.log_file:
            err.print(f"  log     {escape(svc.log_file)}")
    for note in plan.notes:
        err.print(f"\n[yellow]note:[/yellow] {escape(note)}")


def curl_example(openai_url: str, model: str, *, bearer: bool, ca_cert: str | None = None) -> str:
    """A chat completion to paste into a shell; the key stays a variable reference. `ca_cert`:
    the frontend's certificate is from an advertised deployment's CA (docs/multi-host.md)."""
    question = {"role": "user", "content": "What is the capital of France?"}
    # greedy: the answer does not depend on the model's own sampling defaults
    body = json.dumps({"model": model, "messages": [question], "max_tokens": 32, "temperature": 0})
    auth = ' -H "Authorization: Bearer $DYNKV_API_KEY"' if bearer else ""
    cacert = f" --cacert {shlex.quote(ca_cert)}" if ca_cert else ""
    return (
        f"curl -s{cacert} {shlex.quote(openai_url + '/chat/completions')} "
        f"-H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"
    )


def frontend_lines(state: DeploymentState) -> list[str]:
    """Where the OpenAI API is, and a request to try it (after `up`); where Prometheus is."""
    lines = []
    for rec in state.services:
        info = rec.info
        if info.prometheus_url:
            lines.append(
                f"  Prometheus: {info.prometheus_url}  (Grafana: add it as a data source, "
                "import deploy/grafana/dynkv-kvbm.json)"
            )
        if not info.openai_url:
            continue
        bearer = info.auth == "bearer"
        key = " (API key required)" if bearer else ""
        lines.append(f"  OpenAI API: {info.openai_url}  model {info.model}{key}")
        lines.append("  try it:" + (" (export DYNKV_API_KEY=<the key> first)" if bearer else ""))
        example = curl_example(
            info.openai_url, info.model or "", bearer=bearer, ca_cert=info.ca_cert
        )
        lines.append("  " + example)
    return lines


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def status_table(report: StatusReport) -> Table:
    title = f"{report.name}: {report.phase}, {report.mode}, infra {report.infra}"
    table = Table(title=title, expand=False)
    if report.supervisor_pid is None and report.mode == "detached":
        table.caption = "no supervisor runs it: a service that fails is not restarted"
    for col in ("service", "role", "pid", "uptime", "health", "restarts", "ports"):
        table.add_column(col)
    for s in report.services:
        health = "[green]healthy[/green]" if s.healthy else f"[red]{escape(s.detail)}[/red]"
        ports = ", ".join(f"{k} {v}" for k, v in s.ports.items())
        table.add_row(
            s.name, s.role, str(s.pid or "-"), _uptime(s.uptime_s), health, _restarts(s), ports
        )
    return table


def _restarts(s) -> str:
    """How often a service was started again, and how it last ended (docs/restart.md)."""
    phase = {"backoff": "waiting to restart", "starting": "restarting", "given_up": "stays down"}
    text = str(s.restarts)
    if s.last_exit:
        when = time.strftime("%H:%M:%S", time.localtime(s.last_exit.get("at") or 0))
        text += f" (last: {s.last_exit.get('describe', '?')} at {when})"
    text = escape(text)
    if s.restart_phase in phase:
        text += f" [yellow]{phase[s.restart_phase]}[/yellow]"
    return text


def kvbm_lines(report: StatusReport) -> list[str]:
    lines = []
    for s in report.services:
        k = s.kvbm
        if k is None:
            continue
        if not k.get("reachable"):
            lines.append(f"{s.name} KVBM: metrics unavailable ({k.get('error', '')})")
            continue
        lines.append(
            f"{s.name} KVBM: G2 {_num(k['host_blocks_used'])}/{_num(k['host_blocks_total'])} blocks, "
            f"G3 {_num(k['disk_blocks_used'])}/{_num(k['disk_blocks_total'])} blocks; "
            f"hit rate host {_pct(k['host_cache_hit_rate'])}, disk {_pct(k['disk_cache_hit_rate'])}; "
            f"matched tokens {_num(k['matched_tokens'])}; offloaded d2h {_num(k['offload_blocks_d2h'])}, "
            f"h2d {_num(k['offload_blocks_h2d'])}; onboarded h2d {_num(k['onboard_blocks_h2d'])}, "
            f"d2d {_num(k['onboard_blocks_d2d'])}; integrity failures {_num(k['integrity_failures'])}, "
            f"read failures {_num(k.get('load_failures'))}"
        )
        lines.append(f"{s.name} savings: {_saved(k.get('prefill_seconds_saved'))}")
    return lines


def _saved(seconds: Any) -> str:
    """Prefill seconds the worker's KVBM saved since it started; `-` when its runtime does not
    measure them (docs/advise.md)."""
    return "-" if seconds is None else f"{seconds:.1f} s of prefill saved"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def router_lines(report: StatusReport) -> list[str]:
    """The frontend's router since it started (docs/observability.md#router); nothing when the
    frontend exposes no router metrics."""
    r = report.router
    if not r:
        return []
    parts = [f"policy {r.get('policy') or '?'}"]
    decisions = r.get("decisions") or {}
    if decisions:
        parts.append(
            "decisions " + ", ".join(f"{p} {n:,.0f}" for p, n in sorted(decisions.items()))
        )
    predicted, actual, accuracy = (
        r.get("predicted_cached_tokens"),
        r.get("actual_cached_tokens"),
        r.get("accuracy"),
    )
    if actual is None and predicted is None:
        parts.append("accuracy n/a")
    else:
        shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
        parts.append(
            f"accuracy {shown} ({_num_or_dash(predicted)} predicted / {_num_or_dash(actual)} "
            "reused cached tokens)"
        )
    shares = r.get("shares") or {}
    if shares:
        parts.append("routed " + ", ".join(f"{w} {_pct(s)}" for w, s in shares.items()))
    acquired, duplicated = r.get("acquired_blocks"), r.get("duplicated_blocks")
    if acquired:  # held elsewhere already: in an agg fleet, computed again
        parts.append(
            f"held twice {duplicated or 0:,.0f} of {acquired:,.0f} new blocks "
            f"({_pct((duplicated or 0) / acquired)})"
        )
    # the KV router's own parts, once it is in use (a frontend exposes them at 0 without one)
    kv = r.get("policy") == "kv" or "kv" in decisions or bool(r.get("index_blocks"))
    if r.get("index_blocks") is not None and kv:
        size = "" if r.get("index_bytes") is None else f", {_bytes(r['index_bytes'])}"
        parts.append(f"index {r['index_blocks']:,.0f} blocks{size}")
    if r.get("nats_fallbacks") is not None and (kv or r["nats_fallbacks"]):
        parts.append(f"NATS fallbacks {r['nats_fallbacks']:,.0f}")
    return ["router: " + "; ".join(parts)]


def _num_or_dash(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"
