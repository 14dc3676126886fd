"""`dynkv bench serve --compare-router kv,round_robin,…`: the same workload against one running
fleet once per routing policy, and one combined report (`dynkv.bench.router_compare` runs it;
docs/benchmarks.md#comparing-routers). `dynkv bench compare --routers …` does the same on a fleet
it starts for the purpose (`dynkv up -d`, as for its profiles) and takes down afterwards.

Thin: the caller has found the server, its model and its workers' metrics (or `run_on_new_fleet`
starts them); this shows the progress, renders the combined report (the `bench compare` JSON
shape, a markdown table with the router columns, the TTFT-per-round plot) and a terminal table.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from dynkv.bench import compare, report, router_compare, stacks
from dynkv.bench.summary import BenchSummary, CompareMeta, PolicyRepeats
from dynkv.cli.bench_options import BenchJob, progress, usage
from dynkv.cli.group import EXIT_FAILURE, UserError
from dynkv.cli.output import emit_json, err, numbers_table, warn


def policies_or_usage(values: list[str]) -> list[str]:
    try:
        return router_compare.parse_policies(values)
    except compare.CompareError as exc:
        raise usage(exc.cause, exc.fix) from None


def table(summaries: list[BenchSummary]) -> Table:
    """The few numbers that fit a terminal; the markdown and JSON have the rest."""
    cols = (
        "policy", "ok", "TTFT p50", "p90", "p99", "p50 r≥2", "G2 hit", "G3 hit", "accuracy",
        "held twice", "load per worker",
    )  # fmt: skip
    out = numbers_table("routers (ms)", cols, text=("load per worker",))
    fmt = report.fmt_number
    for s in summaries:
        r = s.router
        out.add_row(
            escape(s.label),
            f"{s.completed}/{s.requests}",
            fmt(s.ttft_ms.p50),
            fmt(s.ttft_ms.p90),
            fmt(s.ttft_ms.p99),
            fmt(s.later_rounds_ttft_ms.p50),
            report.fmt_percent(s.hit_rates.host),
            report.fmt_percent(s.hit_rates.disk),
            report.fmt_ratio(r.accuracy if r else None),
            report.fmt_percent(r.held_twice_share if r else None),
            escape(report.worker_loads(s)),
        )
    return out


def medians_table(medians: list[PolicyRepeats]) -> Table:
    first = medians[0].policy
    cols = ("policy", "runs", "TTFT p50", "p90", "p50 r≥2", f"r≥2 ÷ {first}", f"p90 ÷ {first}")
    out = numbers_table("medians over repeats (ms)", cols)
    fmt, ratio = report.fmt_number, report.fmt_ratio
    for p in medians:
        out.add_row(
            escape(p.policy),
            str(p.runs),
            fmt(p.ttft_p50_ms),
            fmt(p.ttft_p90_ms),
            fmt(p.later_rounds_p50_ms),
            ratio(p.later_rounds_p50_vs_first),
            ratio(p.ttft_p90_vs_first),
        )
    return out


def run(
    *,
    policies: list[str],
    stack: compare.RunningStack,
    job: BenchJob,
    out: Path | None = None,
    repeat: int = 1,
) -> None:
    """`out`: also write report.json, report.md and ttft.png there (`bench compare`'s files).
    `repeat` > 1: every policy runs that many times (`router_compare.schedule`), and the report
    adds each policy's medians."""
    work, warm, options, run_config = job.work, job.warm, job.options, job.run_config
    markdown, plot, json_out = job.markdown, job.plot, job.json_out
    started = dt.datetime.now(dt.UTC)
    command = "dynkv " + shlex.join(sys.argv[1:]) if sys.argv else "dynkv bench serve"
    run_id = router_compare.new_run_id()
    if not json_out:
        err.print(
            f"[bold]bench serve --compare-router[/bold] {escape(work.name)} → "
            f"{escape(stack.url)} ({escape(stack.model)}): {len(policies)} policies "
            f"({escape(', '.join(policies))}){f' × {repeat}' if repeat > 1 else ''}, "
            f"{len(work.requests)} requests each, seed "
            f"{options.seed}; cache salt dynkv-bench-{run_id}-<policy>"
            f"{'-<n>' if repeat > 1 else ''} (no run reuses another's "
            "cache)",
            soft_wrap=True,
        )
    bars: list = []

    def progress_of(policy: str):
        if json_out:
            return None
        bar = progress()
        bars.append(bar)
        bar.start()
        task = bar.add_task(policy, total=len(work.requests))
        return lambda done, _total: bar.update(task, completed=done)

    def on_event(kind: str, policy: str, detail: object) -> None:
        if kind == "done" and bars:
            bars.pop().stop()
        router = detail.router if isinstance(detail, BenchSummary) else None
        if kind == "done" and not json_out and router and router.error:
            warn(f"{policy}: frontend metrics: {router.error}")

    try:
        summaries = router_compare.run_policies(
            policies,
            stack,
            work,
            warm,
            options,
            run_config,
            run_id=run_id,
            progress=progress_of,
            on_event=on_event,
            repeat=repeat,
        )
    finally:
        for bar in bars:
            bar.stop()

    combined = report.combined(summaries)
    if repeat > 1:
        combined.repeats = router_compare.repeat_medians(summaries)
    combined.compare = CompareMeta(
        date=started.isoformat(timespec="seconds"),
        command=command,
        configurations=[
            {"label": s.label, "router": s.label, "cache_salt": s.config.cache_salt}
            for s in summaries
        ],
        stack_options={"url": stack.url, "model": stack.model, "metrics_urls": stack.metrics_urls},
    )
    title = f"dynkv bench serve --compare-router: {work.name}"
    notes = [f"date: {started.strftime('%Y-%m-%d %H:%M UTC')}", f"command: `{command}`"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        data = combined.model_dump(mode="json")
        (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        markdown, plot = markdown or out / "report.md", plot or out / "ttft.png"
    if markdown:
        text = report.markdown(summaries, title=title, notes=notes)
        if combined.repeats:
            text += "\n" + router_compare.repeats_markdown(combined.repeats)
        markdown.write_text(text)
    if plot:
        report.plot(summaries, plot, title=f"TTFT per round: {work.name}")
    if json_out:
        emit_json(combined.model_dump(mode="json"))
    else:
        err.print(table(summaries))
        if combined.repeats:
            err.print(medians_table(combined.repeats))
        for path in (markdown, plot):
            if path:
                err.print(f"  wrote {escape(str(path))}")
    for s in summaries:
        for sample in s.error_samples:
            warn(f"{s.label}: request failed: {sample}")
    failed = [s.label for s in summaries if s.failed]
    if failed:
        raise UserError(
            f"{', '.join(failed)}: every request failed; the other policies are in the report",
            "check that the frontend knows the policy (x-dynkv-router) and the server's log",
            EXIT_FAILURE,
        )


def run_on_new_fleet(
    *,
    policies: list[str],
    profile: str | None,
    stack_options: stacks.StackOptions,
    out: Path,
    job: BenchJob,
    repeat: int = 1,
) -> None:
    """Start one agg fleet (`dynkv up -d` under a private name, ports and state dir in `out`),
    compare the policies on it, and take it down whatever happens."""
    launcher = stacks.UpLauncher(stack_options, out.resolve() / "stacks")
    config = compare.StackConfig("fleet", profile, topology="agg")
    try:
        launcher.check(config)
    except compare.CompareError as exc:
        raise usage(exc.cause, exc.fix) from None
    if not job.json_out:
        err.print(f"[bold]▶ fleet[/bold]: dynkv up -d ({stack_options.workers or 1} workers) …")
    try:
        stack = launcher.up(config)
    except compare.StackFailed as exc:
        raise UserError(
            f"the fleet did not come up: {exc.detail}",
            f"read its logs under {out / 'stacks' / 'state'}",
            EXIT_FAILURE,
        ) from None
    try:
        run(policies=policies, stack=stack, job=job, out=out, repeat=repeat)
    finally:
        launcher.down(stack)
        for message in launcher.warnings:
            warn(message)
