"""`dynkv bench serve`: load one running OpenAI-compatible server with a prefix-reuse workload.

Thin: build the workload (`dynkv.bench.workloads`), find the server and its workers' metrics
(`dynkv.bench.target`: `--url` with or without `/v1`, `--name` or a URL a local deployment
serves), send it (`dynkv.bench.runner`), scrape the metrics before and after
(`dynkv.bench.scrape`), and render `dynkv.bench.report` as JSON, markdown, a plot and a table on
stderr. `dynkv bench compare` (cli/bench_compare.py) brings up stacks of its own instead.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import httpx
import typer
from rich.markup import escape

from dynkv.bench import compare, report, runner, scrape, target
from dynkv.bench.summary import BenchSummary
from dynkv.cli import bench_compare, bench_load_cmd, bench_router_compare
from dynkv.cli.bench_options import (
    BenchJob,
    CaCertOpt,
    MarkdownOpt,
    PlotOpt,
    WorkloadArgs,
    progress,
    trust_or_usage,
    usage,
    workload_options,
)
from dynkv.cli.group import EXIT_FAILURE, UserError
from dynkv.cli.options import JsonOpt
from dynkv.cli.output import emit_json, err, numbers_table, warn

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks: load a running server with prefix-reuse workloads, or compare stacks.",
    no_args_is_help=True,
)
DEFAULT_URL = target.DEFAULT_URL


def _check_url(url: str, flag: str) -> str:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise usage(
            f"{flag} {url!r} is not an http(s) URL",
            f"pass {flag} like http://127.0.0.1:8000"
            + ("/metrics" if flag == "--metrics-url" else "/v1"),
        )
    return url


def _find_target(url: str | None, name: str | None, metrics_urls: list[str]) -> target.Target:
    """The server, the metrics to scrape and the CA of its frontend: --metrics-url when given,
    else the workers of the deployment --name names, or of the local deployment that serves
    --url (whose frontend's CA is found either way)."""
    from dynkv.cli.options import resolve_from_options

    if name is not None:
        dep = resolve_from_options(name=name, require_tier=False, quiet=True).deployment
        from dynkv.supervisor import read_state

        state = read_state(dep.deployment_dir)
        if state is None:
            raise UserError(
                f"no deployment named {name!r} is running (no state in {dep.deployment_dir})",
                f"start it with `dynkv up -d --name {name}`, or pass --url of the server",
            )
        found = target.of_deployment(state)
        if url is not None:
            found = dataclasses.replace(found, url=target.base_url(url))
    else:
        base = target.base_url(url or DEFAULT_URL)
        found = target.Target(base, ())
        try:
            dep = resolve_from_options(require_tier=False, quiet=True).deployment
            state = target.serving(base, dep.state_dir)
        except Exception:  # noqa: BLE001 - no settings, no deployment: nothing to scrape
            state = None
        if state is not None:
            found = dataclasses.replace(target.of_deployment(state), url=base)
    if metrics_urls:
        found = dataclasses.replace(found, metrics_urls=tuple(metrics_urls))
    return found


_MOVED = "comparing stacks is `dynkv bench compare`"


def _print_summary(summary: BenchSummary) -> None:
    title = f"{summary.label}: {summary.config.workload}"
    table = numbers_table(escape(title), ("metric", "p50", "p90", "p99"))
    rows = (
        ("TTFT ms", summary.ttft_ms),
        ("ITL ms", summary.itl_ms),
        ("latency ms", summary.latency_ms),
    )
    for name, values in rows:
        table.add_row(name, *map(report.fmt_number, (values.p50, values.p90, values.p99)))
    err.print(table)
    err.print(
        f"  {summary.completed}/{summary.requests} ok, {summary.errors} errors, "
        f"{report.fmt_number(summary.requests_per_s, 2)} req/s, "
        f"{report.fmt_number(summary.output_tokens_per_s)} output tok/s in "
        f"{summary.duration_s:.1f} s; hit rates host {report.fmt_percent(summary.hit_rates.host)}"
        f", disk {report.fmt_percent(summary.hit_rates.disk)}",
        soft_wrap=True,
    )
    for r in summary.rounds:
        err.print(
            f"  round {r.round}: TTFT p50 {report.fmt_number(r.ttft_ms.p50)} ms "
            f"({r.requests} requests)"
        )


@bench_app.command("serve")
@workload_options
def serve(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help=f"The server's base URL, with or without /v1 (default {DEFAULT_URL}).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="A local dynkv deployment: its frontend is loaded and its workers' KVBM "
            "metrics scraped (a --url that a local deployment serves finds it by itself).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Served model name (default: first in /v1/models)."),
    ] = None,
    work: WorkloadArgs = WorkloadArgs(),  # the workload options (`workload_options`)
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="DYNKV_API_KEY", show_default=False, help="Bearer token."),
    ] = None,
    ca_cert: CaCertOpt = None,
    metrics_url: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics-url",
            help="A worker's KVBM /metrics URL (repeatable; default: found from the deployment).",
        ),
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", help="Configuration name in reports (default the URL).")
    ] = None,
    markdown: MarkdownOpt = None,
    plot: PlotOpt = None,
    moved: Annotated[
        list[str] | None, typer.Option("--compare", "--compare-topology", hidden=True)
    ] = None,
    compare_router: Annotated[
        list[str] | None,
        typer.Option(
            "--compare-router",
            help="Run the workload once per routing policy (kv,round_robin,least_outstanding,"
            "session) against the running fleet, each with a fresh cache salt, and report them "
            "side by side (docs/benchmarks.md#comparing-routers).",
            show_default=False,
        ),
    ] = None,
    repeat: Annotated[
        int,
        typer.Option(
            "--repeat",
            min=1,
            max=20,
            help="--compare-router: run every policy N times, each repeat starting one policy "
            "later, and report each policy's medians (docs/benchmarks.md#comparing-routers).",
        ),
    ] = 1,
    json_out: JsonOpt = False,
) -> None:
    """Stream a multi-turn, shared-prefix or long-document workload to a running server; report
    TTFT, ITL, latency and the KVBM hit rates (per routing policy with --compare-router)."""
    if moved:
        raise usage(
            f"{_MOVED}: `bench serve` loads a server that already runs",
            "dynkv bench compare --profiles PROFILE[,PROFILE…] (or --topologies agg,disagg)",
        )
    policies = None
    if repeat > 1 and compare_router is None:
        raise usage(
            "--repeat repeats a router comparison", "add --compare-router, or drop --repeat"
        )
    if compare_router is not None:
        policies = bench_router_compare.policies_or_usage(compare_router)
        if label is not None:
            raise usage(
                "--label names one run; a router comparison labels each run by its policy",
                "drop --label",
            )
    if url is not None:
        _check_url(url, "--url")
    for u in metrics_url or []:
        _check_url(u, "--metrics-url")
    workload, warm = work.build()
    found = _find_target(url, name, list(metrics_url or []))
    url, metrics_urls = found.url, list(found.metrics_urls)
    trust = trust_or_usage(ca_cert, deployment_ca=found.ca_cert, deployment=found.deployment)

    try:
        served = model or runner.discover_model(url, api_key, trust=trust)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise UserError(
            f"cannot list the models at {url}/v1/models: {type(exc).__name__}: {exc}",
            "start the server (dynkv up), or pass --url of a running OpenAI-compatible "
            "server (and --api-key if it requires one, --ca-cert if its certificate is from "
            "a CA of its own); --model NAME skips the lookup",
            EXIT_FAILURE,
        ) from None

    options = work.run_options(url, served, api_key, trust)
    config = work.run_config(workload).model_copy(
        update={
            "url": url,
            "model": served,
            "metrics_urls": metrics_urls,
            "deployment": found.deployment,
            **(trust.record() if trust else {}),
        }
    )
    if not json_out and policies is None:
        err.print(
            f"[bold]bench serve[/bold] {escape(workload.name)} → {escape(url)} ({escape(served)}): "
            f"{len(workload.requests)} requests, {work.warmup} warm-up",
            soft_wrap=True,
        )

    if policies is not None:
        stack = compare.RunningStack(url, served, metrics_urls, trust=trust)
        job = BenchJob(workload, warm, options, config, markdown, plot, json_out)
        bench_router_compare.run(policies=policies, stack=stack, job=job, repeat=repeat)
        return

    before = scrape.scrape_all(metrics_urls)
    with progress() as bar:
        task = bar.add_task(workload.name, total=len(workload.requests))
        result = runner.run(
            workload, options, warm, progress=lambda done, _total: bar.update(task, completed=done)
        )
    after = scrape.scrape_all(metrics_urls)
    for snap in after:
        if snap.error:
            warn(f"metrics {snap.url}: {snap.error}")

    summary = report.summarize(report.LabelledRun(label or url, result, config, before, after))
    if markdown:
        markdown.write_text(report.markdown([summary], title=f"dynkv bench serve: {workload.name}"))
    if plot:
        report.plot([summary], plot, title=f"TTFT per round: {workload.name}")
    if json_out:
        emit_json(summary.model_dump(mode="json"))
    else:
        _print_summary(summary)
        for path in (markdown, plot):
            if path:
                err.print(f"  wrote {escape(str(path))}")
    if summary.errors:
        for sample in summary.error_samples:
            warn(f"request failed: {sample}")
    if summary.requests and not summary.completed:
        raise UserError(
            f"all {summary.requests} requests failed",
            "check the server's log; the first errors are listed above",
        )


bench_app.command("compare")(bench_compare.compare_cmd)
bench_app.command("load")(bench_load_cmd.bench_load)
