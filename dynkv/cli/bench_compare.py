"""`dynkv bench compare --profiles PROFILE… | --topologies agg,disagg | --transports
loopback,tls`: bring up each configuration with `dynkv up -d` in turn (private name, ports and
state dir), run the same workload against it, take it down, and write one combined report.

Thin: the options (shared with `bench serve`, `dynkv.cli.bench_options`) build the workload; this
module plans the configurations (`dynkv.bench.compare`), starts each stack with
`dynkv.bench.stacks.UpLauncher`, shows progress, and writes the combined report (JSON with every
run, markdown, PNG of TTFT per round) into the comparison's directory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dynkv.bench import compare, report, stacks
from dynkv.bench.summary import BenchSummary, CompareMeta
from dynkv.cli import bench_router_compare
from dynkv.cli.bench_options import (
    BenchJob,
    MarkdownOpt,
    PlotOpt,
    WorkloadArgs,
    progress,
    usage,
    workload_options,
)
from dynkv.cli.group import EXIT_FAILURE, UserError
from dynkv.cli.options import JsonOpt
from dynkv.cli.output import emit_json, err, numbers_table, warn


def default_out_dir(now: dt.datetime | None = None) -> Path:
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(f"dynkv-compare-{stamp}")


def _table(summaries: list[BenchSummary]) -> Table:
    """The few numbers that fit a terminal; the markdown and JSON have the rest."""
    cols = ("configuration", "ok", "TTFT p50", "TTFT p90", "ITL p50", "tok/s", "G2 hit", "G3 hit")
    table = numbers_table("comparison (ms)", cols)
    fmt = report.fmt_number
    for s in summaries:
        error = s.stack.error if s.stack else None
        table.add_row(
            escape(s.label) + (" [red](failed)[/red]" if error else ""),
            f"{s.completed}/{s.requests}",
            fmt(s.ttft_ms.p50),
            fmt(s.ttft_ms.p90),
            fmt(s.itl_ms.p50),
            fmt(s.output_tokens_per_s),
            report.fmt_percent(s.hit_rates.host),
            report.fmt_percent(s.hit_rates.disk),
        )
    return table


def run(
    *,
    profiles: list[str],
    topologies: list[str],
    transports: list[str],
    profile: str | None,
    baseline: bool | None,
    stack_options: stacks.StackOptions,
    job: BenchJob,
    out_dir: Path | None,
    progress_factory,
) -> None:
    work, warm, options, run_config = job.work, job.warm, job.options, job.run_config
    markdown, plot, json_out = job.markdown, job.plot, job.json_out
    try:
        configs = compare.plan_configs(
            profiles, topologies, profile=profile, baseline=baseline, transports=transports
        )
    except compare.CompareError as exc:
        raise usage(exc.cause, exc.fix) from None
    out = out_dir or default_out_dir()
    if out.exists() and not out.is_dir():
        raise usage(f"--out {out} is not a directory", "pass --out with a directory path")
    launcher = stacks.UpLauncher(stack_options, out.resolve() / "stacks")
    try:
        for config in configs:
            launcher.check(config)
    except compare.CompareError as exc:
        raise usage(exc.cause, exc.fix) from None

    started = dt.datetime.now(dt.UTC)
    command = "dynkv " + shlex.join(sys.argv[1:]) if sys.argv else "dynkv bench compare"
    if not json_out:
        names = ", ".join(c.label for c in configs)
        err.print(
            f"[bold]bench compare[/bold] {escape(work.name)}: {len(configs)} "
            f"configurations ({escape(names)}), {len(work.requests)} requests each, "
            f"seed {options.seed}; reports in {escape(str(out))}",
            soft_wrap=True,
        )

    bars: dict[str, Any] = {}

    def on_event(kind: str, config: compare.StackConfig, detail: Any) -> None:
        if json_out:
            return
        label = escape(config.label)
        if kind == "up":
            err.print(f"[bold]▶ {label}[/bold]: dynkv up -d …")
        elif kind == "failed":
            warn(f"{config.label}: the stack did not come up:\n{detail}")
        elif kind == "measure":
            err.print(
                f"  up in {detail.info.get('up_s', 0):.0f} s at {escape(detail.url)} "
                f"({escape(detail.model)}); sending the workload"
            )
        elif kind == "down":
            bar = bars.pop(config.label, None)
            if bar is not None:
                bar.stop()
            err.print(f"  {label}: down")

    def progress_of(config: compare.StackConfig):
        if json_out:
            return None
        bar = progress_factory()
        bars[config.label] = bar
        bar.start()
        task = bar.add_task(config.label, total=len(work.requests))
        return lambda done, _total: bar.update(task, completed=done)

    measure = compare.measure_with(work, warm, options, run_config, progress_of)
    try:
        summaries = compare.run_compare(
            configs, launcher, measure, run_config=run_config, on_event=on_event
        )
    finally:
        for bar in bars.values():
            bar.stop()
        for message in launcher.warnings:
            warn(message)

    notes = [
        f"date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"command: `{command}`",
        f"host: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"stacks: {_stack_note(stack_options)}",
    ]
    combined = report.combined(summaries)
    combined.compare = CompareMeta(
        date=started.isoformat(timespec="seconds"),
        command=command,
        configurations=[c.to_json() for c in configs],
        stack_options={
            **{
                k: v
                for k, v in dataclasses.asdict(stack_options).items()
                if k != "advertise" or v is not None  # only a comparison with --transports tls
            },
            "env": dict(stack_options.env),
        },
    )
    data = combined.model_dump(mode="json")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path = markdown or out / "report.md"
    md_path.write_text(
        report.markdown(summaries, title=f"dynkv bench compare: {work.name}", notes=notes)
    )
    png_path = plot or out / "ttft.png"
    report.plot(summaries, png_path, title=f"TTFT per round: {work.name}")

    if json_out:
        emit_json(data)
    else:
        err.print(_table(summaries))
        for path in (json_path, md_path, png_path):
            err.print(f"  wrote {escape(str(path))}")
    failed = [s.label for s in summaries if s.failed]
    if failed:
        raise UserError(
            f"{', '.join(failed)}: no measurement (the stack did not come up, or every request "
            "failed); the other configurations are in the report",
            f"read the stack's logs under {out / 'stacks' / 'state'} and its error above",
            EXIT_FAILURE,
        )


def _stack_note(o: stacks.StackOptions) -> str:
    parts = [f"model {o.model or 'smollm2-135m-instruct (the CPU default)'}"]
    if o.device_kv_gb is not None:
        parts.append(f"G1 {o.device_kv_gb:g} GB per worker")
    if o.cpu_cache_gb is not None:
        parts.append(f"G2 {o.cpu_cache_gb:g} GB")
    if o.disk_cache_gb is not None:
        parts.append(f"G3 {o.disk_cache_gb:g} GB")
    if o.max_model_len is not None:
        parts.append(f"max model len {o.max_model_len}")
    if o.advertise is not None:
        parts.append(f"tls on {o.advertise}")
    parts += [f"{k}={v}" for k, v in o.env.items()]
    return ", ".join(parts)


@workload_options
def compare_cmd(
    profiles: Annotated[
        list[str] | None,
        typer.Option(
            "--profiles",
            help="Bring up each PROFILE in turn (plus a no-offload baseline) and run the workload "
            "against each (repeatable or comma-separated).",
            show_default=False,
        ),
    ] = None,
    topologies: Annotated[
        list[str] | None,
        typer.Option(
            "--topologies",
            help="Bring up --profile as each topology in turn: agg,disagg.",
            show_default=False,
        ),
    ] = None,
    transports: Annotated[
        list[str] | None,
        typer.Option(
            "--transports",
            help="Bring up each configuration (or --profile) once per transport: loopback, and "
            "tls (`dynkv up --advertise --advertise-addr`: TLS on every hop; "
            "docs/multi-host.md#measuring-tls-overhead).",
            show_default=False,
        ),
    ] = None,
    advertise_addr: Annotated[
        str | None,
        typer.Option(
            "--advertise-addr",
            help=f"The address of --transports tls (default {compare.DEFAULT_ADVERTISE}).",
            show_default=False,
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="The profile of --topologies or --transports.")
    ] = None,
    baseline: Annotated[
        bool | None,
        typer.Option(
            "--baseline/--no-baseline",
            help="Also run a stack without KVBM (default: on with --profiles, off with "
            "--topologies).",
            show_default=False,
        ),
    ] = None,
    stack_model: Annotated[
        str | None,
        typer.Option(
            "--stack-model",
            help="Model of every stack (directory, HF id or catalogue name; default as `dynkv up`).",
        ),
    ] = None,
    device_kv_gb: Annotated[
        float | None,
        typer.Option(
            "--device-kv-gb", min=0, help="G1 per worker, GB: keep it below the working set."
        ),
    ] = None,
    cpu_cache_gb: Annotated[
        float | None,
        typer.Option("--cpu-cache-gb", min=0, help="G2 of profiles that have one, GB."),
    ] = None,
    disk_cache_gb: Annotated[
        float | None,
        typer.Option("--disk-cache-gb", min=0, help="G3 of profiles that have one, GB."),
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option("--max-model-len", min=1, help="vLLM's --max-model-len.")
    ] = None,
    routers: Annotated[
        list[str] | None,
        typer.Option(
            "--routers",
            help="Instead of profiles: bring up one fleet (--workers) and run the workload once "
            "per routing policy on it (kv,round_robin,least_outstanding,session; "
            "docs/benchmarks.md#comparing-routers).",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=1, max=64, help="--routers: the fleet's workers (default 2)."
        ),
    ] = None,
    repeat: Annotated[
        int,
        typer.Option("--repeat", min=1, max=20, help="--routers: run every policy N times."),
    ] = 1,
    stack_env: Annotated[
        list[str] | None,
        typer.Option(
            "--stack-env",
            help="NAME=VALUE for every stack (repeatable); stacks inherit no DYNKV_*/DYN_KVBM_*.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory of report.json, report.md, ttft.png and the stacks' logs "
            "(default ./dynkv-compare-<time>).",
            show_default=False,
        ),
    ] = None,
    work: WorkloadArgs = WorkloadArgs(),  # the workload options (`workload_options`)
    markdown: MarkdownOpt = None,
    plot: PlotOpt = None,
    served_model: Annotated[str | None, typer.Option("--model", "-m", hidden=True)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Bring up each profile (topology, transport) in turn with `dynkv up -d`, run the same workload
    against it, take it down, and write one combined report."""
    if served_model is not None:
        raise usage(
            "--model names a running server's model; the stacks' model is --stack-model",
            f"pass --stack-model {served_model}",
        )
    policies = None
    if routers is not None:
        policies = bench_router_compare.policies_or_usage(routers)
        if profiles or topologies or transports or baseline is not None:
            raise usage(
                "--routers compares policies on one fleet; --profiles, --topologies, "
                "--transports and --baseline compare stacks",
                "run them as two comparisons",
            )
    elif workers is not None or repeat > 1:
        flag = "--workers is the fleet" if workers is not None else "--repeat repeats the policies"
        raise usage(f"{flag} of --routers", "pass --routers, or drop it")
    tls = "tls" in compare.split_values(transports)
    if advertise_addr is not None and not tls:
        raise usage("--advertise-addr is the address of --transports tls", "pass --transports tls")
    workload, warm = work.build()
    try:
        stack_options = stacks.StackOptions(
            model=stack_model,
            device_kv_gb=device_kv_gb,
            cpu_cache_gb=cpu_cache_gb,
            disk_cache_gb=disk_cache_gb,
            max_model_len=max_model_len,
            workers=(workers or 2) if policies else None,
            advertise=(advertise_addr or compare.DEFAULT_ADVERTISE) if tls else None,
            env=stacks.parse_env_pairs(stack_env),
        )
    except compare.CompareError as exc:
        raise usage(exc.cause, exc.fix) from None
    options = work.run_options()  # url and model: each stack's
    config = work.run_config(workload)
    job = BenchJob(workload, warm, options, config, markdown, plot, json_out)
    if policies is not None:
        bench_router_compare.run_on_new_fleet(
            policies=policies,
            profile=profile,
            stack_options=stack_options,
            out=out or default_out_dir(),
            job=job,
            repeat=repeat,
        )
        return
    run(
        profiles=compare.split_values(profiles),
        topologies=compare.split_values(topologies),
        transports=compare.split_values(transports),
        profile=profile,
        baseline=baseline,
        stack_options=stack_options,
        job=job,
        out_dir=out,
        progress_factory=progress,
    )
