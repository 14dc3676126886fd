"""`dynkv bench serve`: load a running OpenAI-compatible server with a prefix-reuse workload.

Thin: check the flags (bad input → cause + fix, exit 2), build the workload
(`dynkv.bench.workloads`), send it (`dynkv.bench.runner`), scrape the workers' KVBM metrics before
and after (`dynkv.bench.scrape`), and render `dynkv.bench.report` as JSON, markdown, a plot and a
table on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dynkv.bench import compare, report, runner, scrape, stacks, workloads
from dynkv.bench.client import ENDPOINT_PATHS
from dynkv.cli import bench_compare
from dynkv.cli.group import EXIT_FAILURE, EXIT_USAGE, UserError
from dynkv.cli.options import JsonOpt
from dynkv.cli.output import emit_json, err, warn

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks: load a running server with prefix-reuse workloads.",
    no_args_is_help=True,
)

# Options of one workload only; giving one to the other workload is a usage error.
_ONLY = {
    "multi-turn": ("--users", "--rounds", "--system-tokens", "--question-tokens"),
    "long-doc": ("--docs", "--doc-tokens", "--repeats", "--mode"),
}


def _params(given: dict[str, Any]) -> dict[str, Any]:
    """--doc-tokens → doc_tokens: the builders' keyword names."""
    return {flag[2:].replace("-", "_"): value for flag, value in given.items()}


def _usage(cause: str, fix: str) -> UserError:
    return UserError(cause, fix, EXIT_USAGE)


def _check_url(url: str, flag: str) -> str:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise _usage(
            f"{flag} {url!r} is not an http(s) URL",
            f"pass {flag} like http://127.0.0.1:8000"
            + ("/metrics" if flag == "--metrics-url" else ""),
        )
    return url


def _check_flags(
    workload: str,
    given: dict[str, Any],
    endpoint: str,
    concurrency: int | None,
    rate: float | None,
    warmup: int,
) -> None:
    try:
        workloads.check_name(workload)
    except workloads.WorkloadError as exc:
        raise _usage(exc.cause, exc.fix) from None
    for other, flags in _ONLY.items():
        if other == workload:
            continue
        wrong = [f for f in flags if given.get(f) is not None]
        if wrong:
            raise _usage(
                f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to "
                f"--workload {other}, not {workload}",
                f"drop {', '.join(wrong)}, or pass --workload {other}",
            )
    if endpoint not in ENDPOINT_PATHS:
        raise _usage(
            f"unknown endpoint {endpoint!r}", "use --endpoint chat or --endpoint completions"
        )
    if concurrency is not None and concurrency < 1:
        raise _usage(
            f"--concurrency must be ≥ 1, got {concurrency}",
            "pass --concurrency 1 or more (requests in flight at once)",
        )
    if rate is not None and not rate > 0:
        raise _usage(
            f"--rate must be > 0 requests/s, got {rate}",
            "pass --rate 0.5 (for example), or leave it out to send as fast as --concurrency allows",
        )
    if warmup < 0:
        raise _usage(f"--warmup must be ≥ 0, got {warmup}", "pass --warmup 0 or more")


def _check_compare_flags(
    comparing: bool,
    stack_given: dict[str, Any],
    url: str | None,
    metrics_url: list[str] | None,
    label: str | None,
    model: str | None,
) -> None:
    """Stack options need a comparison; a comparison brings its own servers, URLs and labels."""
    if not comparing:
        wrong = [flag for flag, value in stack_given.items() if value is not None]
        if wrong:
            raise _usage(
                f"{', '.join(wrong)} only {'applies' if len(wrong) == 1 else 'apply'} when "
                "comparing stacks",
                "add --compare PROFILE[,PROFILE…] or --compare-topology agg,disagg, or drop "
                + ", ".join(wrong),
            )
        return
    clashes = {
        "--url": (url, "each stack's frontend is used"),
        "--metrics-url": (metrics_url, "each stack's workers are scraped"),
        "--label": (label, "each configuration is labelled by its name"),
        "--model": (model, "pass the stacks' model with --stack-model"),
    }
    for flag, (value, why) in clashes.items():
        if value:
            raise _usage(
                f"{flag} does not apply when comparing stacks ({why})",
                f"drop {flag}" + (", and pass --stack-model M" if flag == "--model" else ""),
            )


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def _print_summary(summary: dict[str, Any]) -> None:
    title = f"{summary['label']}: {summary['config'].get('workload')}"
    table = Table(title=escape(title), expand=False)
    for col in ("metric", "p50", "p90", "p99"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key, name in (("ttft_ms", "TTFT ms"), ("itl_ms", "ITL ms"), ("latency_ms", "latency ms")):
        table.add_row(name, *(report.fmt_number(summary[key][q]) for q in ("p50", "p90", "p99")))
    err.print(table)
    err.print(
        f"  {summary['completed']}/{summary['requests']} ok, {summary['errors']} errors, "
        f"{report.fmt_number(summary['requests_per_s'], 2)} req/s, "
        f"{report.fmt_number(summary['output_tokens_per_s'])} output tok/s in "
        f"{summary['duration_s']:.1f} s; hit rates host {report.fmt_percent(summary['hit_rates']['host'])}"
        f", disk {report.fmt_percent(summary['hit_rates']['disk'])}",
        soft_wrap=True,
    )
    for r in summary["rounds"]:
        err.print(
            f"  round {r['round']}: TTFT p50 {report.fmt_number(r['ttft_ms']['p50'])} ms "
            f"({r['requests']} requests)"
        )


_STACK_PANEL = "Compare stacks (--compare / --compare-topology)"
DEFAULT_URL = "http://127.0.0.1:8000"


@bench_app.command("serve")
def serve(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help=f"Base URL of the OpenAI-compatible server (default {DEFAULT_URL}).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Served model name (default: first in /v1/models)."),
    ] = None,
    workload: Annotated[
        str, typer.Option("--workload", "-w", help="multi-turn or long-doc.")
    ] = "multi-turn",
    endpoint: Annotated[
        str, typer.Option("--endpoint", help="chat (/v1/chat/completions) or completions.")
    ] = "chat",
    users: Annotated[int | None, typer.Option(help="multi-turn: users (default 4).")] = None,
    rounds: Annotated[
        int | None, typer.Option(help="multi-turn: rounds per user (default 4).")
    ] = None,
    system_tokens: Annotated[
        int | None, typer.Option(help="multi-turn: shared system prompt tokens (default 512).")
    ] = None,
    question_tokens: Annotated[
        int | None, typer.Option(help="multi-turn: tokens of each new question (default 64).")
    ] = None,
    docs: Annotated[int | None, typer.Option(help="long-doc: documents (default 6).")] = None,
    doc_tokens: Annotated[
        int | None, typer.Option(help="long-doc: tokens per document (default 3600).")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="long-doc: sends of each document (default 2).")
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="long-doc: repeat order tile, random or interleave (default tile)."),
    ] = None,
    answer_tokens: Annotated[
        int | None,
        typer.Option(help="max_tokens of each answer (default multi-turn 32, long-doc 1)."),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="Local tokenizer directory: size prompts exactly (else an estimate)."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-c", help="Requests in flight (default 1; no cap with --rate)."
        ),
    ] = None,
    rate: Annotated[
        float | None, typer.Option("--rate", help="Requests/s, Poisson arrivals (seeded).")
    ] = None,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Warm-up requests first, not counted.")
    ] = 0,
    seed: Annotated[
        int, typer.Option("--seed", help="Prompts and arrivals; same seed, same run.")
    ] = 0,
    ignore_eos: Annotated[
        bool,
        typer.Option("--ignore-eos", help="Always generate --answer-tokens (vLLM extension)."),
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request.")] = 600.0,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="DYNKV_API_KEY", show_default=False, help="Bearer token."),
    ] = None,
    metrics_url: Annotated[
        list[str] | None,
        typer.Option("--metrics-url", help="A worker's KVBM /metrics URL (repeatable)."),
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", help="Configuration name in reports (default the URL).")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write the report as a markdown table.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of TTFT per round.")
    ] = None,
    compare_profiles: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="Bring up each PROFILE in turn (plus a no-offload baseline) and run the workload "
            "against each (repeatable or comma-separated).",
            rich_help_panel=_STACK_PANEL,
            show_default=False,
        ),
    ] = None,
    compare_topology: Annotated[
        list[str] | None,
        typer.Option(
            "--compare-topology",
            help="Bring up --profile as each topology in turn: agg,disagg.",
            rich_help_panel=_STACK_PANEL,
            show_default=False,
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", help="The profile of --compare-topology.", rich_help_panel=_STACK_PANEL
        ),
    ] = None,
    baseline: Annotated[
        bool | None,
        typer.Option(
            "--baseline/--no-baseline",
            help="Also run a stack without KVBM (default: on with --compare, off with "
            "--compare-topology).",
            rich_help_panel=_STACK_PANEL,
            show_default=False,
        ),
    ] = None,
    stack_model: Annotated[
        str | None,
        typer.Option(
            "--stack-model",
            help="Model of every stack (directory, HF id or catalogue name; default as `dynkv up`).",
            rich_help_panel=_STACK_PANEL,
        ),
    ] = None,
    device_kv_gb: Annotated[
        float | None,
        typer.Option(
            "--device-kv-gb",
            help="G1 per worker, GB: keep it below the workload's working set.",
            rich_help_panel=_STACK_PANEL,
        ),
    ] = None,
    cpu_cache_gb: Annotated[
        float | None,
        typer.Option(
            "--cpu-cache-gb", help="G2 of profiles that have one, GB.", rich_help_panel=_STACK_PANEL
        ),
    ] = None,
    disk_cache_gb: Annotated[
        float | None,
        typer.Option(
            "--disk-cache-gb",
            help="G3 of profiles that have one, GB.",
            rich_help_panel=_STACK_PANEL,
        ),
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            "--max-model-len", help="vLLM's --max-model-len.", rich_help_panel=_STACK_PANEL
        ),
    ] = None,
    stack_env: Annotated[
        list[str] | None,
        typer.Option(
            "--stack-env",
            help="NAME=VALUE for every stack (repeatable); stacks inherit no DYNKV_*/DYN_KVBM_*.",
            rich_help_panel=_STACK_PANEL,
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory of report.json, report.md, ttft.png and the stacks' logs "
            "(default ./dynkv-compare-<time>).",
            rich_help_panel=_STACK_PANEL,
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Stream a multi-turn or long-document workload; report TTFT, ITL, latency and hit rates.

    With --compare or --compare-topology, bring up each configuration with `dynkv up -d` in turn
    (private name, ports and state dir), run the same workload against it, take it down, and
    write one combined report."""
    given = {
        "--users": users,
        "--rounds": rounds,
        "--system-tokens": system_tokens,
        "--question-tokens": question_tokens,
        "--docs": docs,
        "--doc-tokens": doc_tokens,
        "--repeats": repeats,
        "--mode": mode,
    }
    _check_flags(workload, given, endpoint, concurrency, rate, warmup)
    comparing = bool(compare_profiles or compare_topology)
    stack_given = {
        "--profile": profile,
        "--baseline/--no-baseline": baseline,
        "--stack-model": stack_model,
        "--device-kv-gb": device_kv_gb,
        "--cpu-cache-gb": cpu_cache_gb,
        "--disk-cache-gb": disk_cache_gb,
        "--max-model-len": max_model_len,
        "--stack-env": stack_env,
        "--out": out,
    }
    _check_compare_flags(comparing, stack_given, url, metrics_url, label, model)
    url = url or DEFAULT_URL
    _check_url(url, "--url")
    metrics_urls = [_check_url(u, "--metrics-url") for u in metrics_url or []]
    if concurrency is None and rate is None:
        concurrency = 1

    try:
        count = workloads.tokenizer_counter(tokenizer) if tokenizer else None
        work = workloads.build(workload, seed, count, answer_tokens=answer_tokens, **_params(given))
        warm = workloads.warmup(warmup, seed=seed)
    except workloads.WorkloadError as exc:
        raise _usage(exc.cause, exc.fix) from None

    if comparing:
        try:
            options_for_stacks = stacks.StackOptions(
                model=stack_model,
                device_kv_gb=device_kv_gb,
                cpu_cache_gb=cpu_cache_gb,
                disk_cache_gb=disk_cache_gb,
                max_model_len=max_model_len,
                env=stacks.parse_env_pairs(stack_env),
            )
        except compare.CompareError as exc:
            raise _usage(exc.cause, exc.fix) from None
        run_options = runner.RunOptions(
            url="",  # each stack's frontend
            model="",  # each stack's served model
            endpoint=endpoint,  # type: ignore[arg-type]
            concurrency=concurrency,
            rate=rate,
            seed=seed,
            timeout_s=timeout,
            ignore_eos=ignore_eos,
        )
        run_config = {
            "endpoint": endpoint,
            "workload": work.name,
            "params": work.params,
            "concurrency": concurrency,
            "rate": rate,
            "warmup": warmup,
            "seed": seed,
            "ignore_eos": ignore_eos,
            "tokenizer": str(tokenizer) if tokenizer else None,
        }
        bench_compare.run(
            profiles=compare.split_values(compare_profiles),
            topologies=compare.split_values(compare_topology),
            profile=profile,
            baseline=baseline,
            stack_options=options_for_stacks,
            work=work,
            warm=warm,
            options=run_options,
            run_config=run_config,
            out_dir=out,
            markdown=markdown,
            plot=plot,
            json_out=json_out,
            progress_factory=_progress,
        )
        return

    try:
        served = model or runner.discover_model(url, api_key)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise UserError(
            f"cannot list the models at {url}/v1/models: {type(exc).__name__}: {exc}",
            "start the server (dynkv up), or pass --url of a running OpenAI-compatible "
            "server (and --api-key if it requires one); --model NAME skips the lookup",
            EXIT_FAILURE,
        ) from None

    options = runner.RunOptions(
        url=url,
        model=served,
        endpoint=endpoint,  # type: ignore[arg-type]
        concurrency=concurrency,
        rate=rate,
        seed=seed,
        timeout_s=timeout,
        ignore_eos=ignore_eos,
        api_key=api_key,
    )
    config = {
        "url": url,
        "model": served,
        "endpoint": endpoint,
        "workload": work.name,
        "params": work.params,
        "concurrency": concurrency,
        "rate": rate,
        "warmup": warmup,
        "seed": seed,
        "ignore_eos": ignore_eos,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "metrics_urls": metrics_urls,
    }
    if not json_out:
        err.print(
            f"[bold]bench serve[/bold] {escape(work.name)} → {escape(url)} ({escape(served)}): "
            f"{len(work.requests)} requests, {warmup} warm-up",
            soft_wrap=True,
        )

    before = scrape.scrape_all(metrics_urls)
    with _progress() as bar:
        task = bar.add_task(work.name, total=len(work.requests))
        result = runner.run(
            work, options, warm, progress=lambda done, _total: bar.update(task, completed=done)
        )
    after = scrape.scrape_all(metrics_urls)
    for snap in after:
        if snap.error:
            warn(f"metrics {snap.url}: {snap.error}")

    summary = report.summarize(report.LabelledRun(label or url, result, config, before, after))
    if markdown:
        markdown.write_text(report.markdown([summary], title=f"dynkv bench serve: {work.name}"))
    if plot:
        report.plot([summary], plot, title=f"TTFT per round: {work.name}")
    if json_out:
        emit_json(report.combined([summary]))
    else:
        _print_summary(summary)
        for path in (markdown, plot):
            if path:
                err.print(f"  wrote {escape(str(path))}")
    if summary["errors"]:
        for sample in summary["error_samples"]:
            warn(f"request failed: {sample}")
    if summary["requests"] and not summary["completed"]:
        raise UserError(
            f"all {summary['requests']} requests failed",
            "check the server's log; the first errors are listed above",
        )
