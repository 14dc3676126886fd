"""`dynkv bench tiers` and `dynkv bench offload`: the KVBM runtime's own benchmarks."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dynkv.bench.kvbm_report import OffloadReport, SlowDiskReport
from dynkv.cli.group import EXIT_USAGE, UserError
from dynkv.cli.options import JsonOpt
from dynkv.cli.output import emit_json, err, numbers_table


class W1Dtype(StrEnum):
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT16 = "float16"


def tiers(
    size_mb: Annotated[
        int, typer.Option("--size-mb", min=1, help="Bytes moved per measurement (MB).")
    ] = 256,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where the disk files go (default: the temp dir).")
    ] = None,
    buffered: Annotated[
        bool, typer.Option("--buffered", help="Buffered I/O instead of O_DIRECT.")
    ] = False,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Best of N.")] = 3,
    json_out: JsonOpt = False,
) -> None:
    """G1↔G2 copy and G2↔G3 disk throughput beside raw memcpy and raw file I/O, in one run."""
    from dynkv.bench.tiers import run

    if directory is not None and not directory.is_dir():
        raise UserError(
            f"--dir {directory} is not a directory", "pass an existing directory", EXIT_USAGE
        )
    with err.status("measuring tier throughput…"):
        result = run(size_mb=size_mb, directory=directory, o_direct=not buffered, repeats=repeats)
    if json_out:
        emit_json(result.model_dump(mode="json"))
        return
    title = (
        f"tiers: {result.bytes / 1e6:.0f} MB, {result.blocks} blocks of "
        f"{result.bytes_per_block} B, best of {repeats}"
    )
    table = numbers_table(title, ("path", "GB/s", "vs raw"))
    for path, gbps, ratio in result.rows():
        table.add_row(path, f"{gbps:.2f}", f"{ratio:.2f}")
    err.print(table)
    err.print(
        f"targets: G1↔G2 ≥ 0.5 × memcpy: {result.g1_g2_vs_memcpy:.2f}; "
        f"G3 read ≥ 0.7 × raw: {result.g3_read_vs_raw:.2f}"
    )


def offload(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model directory or catalogue name, e.g. smollm2-135m-instruct (default: dynkv-bench, generated).",
        ),
    ] = None,
    docs: Annotated[int, typer.Option("--docs", min=1, help="Documents in W1.")] = 6,
    doc_tokens: Annotated[
        int, typer.Option("--doc-tokens", min=64, help="Tokens per document.")
    ] = 3600,
    small_kv_mib: Annotated[
        int,
        typer.Option(
            "--device-kv-mib", min=1, help="Device KV of the constrained configurations (MiB)."
        ),
    ] = 100,
    large_kv_mib: Annotated[
        int,
        typer.Option("--floor-kv-mib", min=1, help="Device KV of the floor configuration (MiB)."),
    ] = 1024,
    tier_gb: Annotated[
        float, typer.Option("--tier-gb", min=0.01, help="G2/G3 size (decimal GB).")
    ] = 1.0,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only these configurations (repeatable).")
    ] = None,
    g3_read_delay_ms: Annotated[
        float,
        typer.Option(
            "--g3-read-delay-ms",
            min=0,
            help="Slow-disk variant: every G3 read takes this many ms longer per block; runs "
            "recompute, g3_slow_auto and g3_slow_always (docs/onboard-policy.md).",
        ),
    ] = 0.0,
    dtype: Annotated[
        W1Dtype | None,
        typer.Option(
            "--dtype",
            help="Every engine's dtype (default: the one `up` serves here: float32 on a CPU "
            "without native bfloat16, else bfloat16).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Workload W1 (docs/benchmarks.md): round-2 TTFT for recompute, the floor, the peer and dynkv's tiers.

    The last line of stdout is the JSON summary."""
    from dynkv.bench.offload import SLOW_DISK_CONFIGS, configurations, run

    names = (
        list(SLOW_DISK_CONFIGS)
        if g3_read_delay_ms > 0
        else [c.name for c in configurations(1, 1, 1.0, Path("."))]
    )
    bad = sorted(set(only or []) - set(names))
    if bad:
        raise UserError(
            f"unknown configuration(s) {bad}", f"choose from: {', '.join(names)}", EXIT_USAGE
        )
    model = _model_dir(model or "dynkv-bench")
    result = run(
        model=model,
        docs=docs,
        doc_tokens=doc_tokens,
        small_kv=small_kv_mib << 20,
        large_kv=large_kv_mib << 20,
        tier_gb=tier_gb,
        only=only,
        g3_read_delay_ms=g3_read_delay_ms,
        dtype=dtype.value if dtype is not None else None,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    if isinstance(result, SlowDiskReport):
        _print_slow_disk(result, json_out)
        return
    if not json_out:
        err.print(_offload_table(result, docs, doc_tokens))
        for tier, f in result.same_engine.items():
            err.print(
                f"in one engine: {tier} {f.tier_ms:.0f} ms = {f.tier_vs_floor:.2f} × its floor "
                f"({f.floor_ms:.0f} ms); cold overhead {f.cold_overhead:.3f}"
            )
        err.print(f"cold overhead: {result.cold_overhead}; targets: {result.targets}")
    # one line either way: the summary keys are at the top level of the last line of stdout
    typer.echo(json.dumps(result.model_dump(mode="json") if json_out else result.headline()))


def _offload_table(result: OffloadReport, docs: int, doc_tokens: int) -> Table:
    table = numbers_table(
        f"W1: {docs} docs × {doc_tokens} tokens, {result.dtype}, round-2 median (≈ TTFT)",
        ("configuration", "round 1 ms", "round 2 ms", "vs floor"),
    )
    for name, r in result.configs.items():
        ratio = result.vs_floor(name)
        table.add_row(
            name,
            f"{r.round1_median_ms:.0f}",
            f"{r.round2_median_ms:.0f}",
            "" if ratio is None else f"{ratio:.2f}",
        )
    return table


def _print_slow_disk(result: SlowDiskReport, json_out: bool) -> None:
    if not json_out:
        table = numbers_table(
            "W1 on a slow G3, round-2 median (≈ TTFT)",
            ("configuration", "round 2 ms", "vs recompute", "skipped blocks"),
        )
        for name, r in result.configs.items():
            ratio = getattr(result, f"{name}_vs_recompute", None)
            table.add_row(
                name,
                f"{r['round2_median_ms']:.0f}",
                "" if ratio is None else f"{ratio:.2f}",
                str(int(r["policy"]["skipped_blocks"])) if "policy" in r else "",
            )
        err.print(table)
        err.print(f"targets: {result.targets}")
    typer.echo(json.dumps(result.model_dump(mode="json") if json_out else result.headline()))


def register(bench_app: typer.Typer) -> None:
    bench_app.command("tiers")(tiers)
    bench_app.command("offload")(offload)


def _model_dir(model: str) -> str:
    """A catalogue name becomes its cache directory (fetched or generated on first use, with a
    progress display); a directory or hub id passes through."""
    from dynkv.model import ModelError
    from dynkv.model.catalog import lookup
    from dynkv.model.fetch import fetch_model, installed
    from dynkv.plan.model_source import looks_local

    entry = None if looks_local(model) else lookup(model)
    if entry is None:
        return str(Path(model).expanduser().resolve()) if looks_local(model) else model
    try:
        if entry.generated or installed(entry) is not None:
            return str(fetch_model(entry).path)
        from dynkv.cli.fetch_display import RichFetchProgress

        with RichFetchProgress() as progress:
            return str(fetch_model(entry, progress=progress).path)
    except ModelError as exc:
        raise UserError(exc.cause, exc.fix, EXIT_USAGE) from None
