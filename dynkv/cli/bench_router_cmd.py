"""`dynkv bench router`: the KV router's decision time at fleet scale (docs/kv-events.md)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from dynkv.cli.options import JsonOpt
from dynkv.cli.output import emit_json, err, numbers_table

TARGET_P99_MS = 2.0


def router(
    blocks: Annotated[
        int, typer.Option("--blocks", min=1, help="Blocks in the index (all workers together).")
    ] = 1_000_000,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Workers.")] = 8,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", min=1, help="Tokens per routed prompt.")
    ] = 8192,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="Tokens per block.")] = 16,
    decisions: Annotated[int, typer.Option("--decisions", min=1, help="Decisions timed.")] = 500,
    json_out: JsonOpt = False,
) -> None:
    """Decision time (index match + TTFT scoring + choice) for one prompt against a full index."""
    from dynkv.router.bench import run_router_bench

    with err.status(f"filling an index of {blocks:,} blocks over {workers} workers…"):
        result = run_router_bench(
            indexed_blocks=blocks,
            workers=workers,
            prompt_tokens=prompt_tokens,
            block_size=block_size,
            decisions=decisions,
        )
    if json_out:
        emit_json(asdict(result))
        return
    title = (
        f"router: {result.prompt_tokens} tokens vs {result.indexed_blocks:,} blocks over "
        f"{result.workers} workers, {result.decisions} decisions"
    )
    table = numbers_table(title, ("measure", "ms"))
    rows = [
        ("decision p50 (wall)", result.decide_p50_ms),
        ("decision p99 (wall)", result.decide_p99_ms),
        ("decision p50 (CPU)", result.decide_cpu_p50_ms),
        ("decision p99 (CPU)", result.decide_cpu_p99_ms),
        ("prompt keys p50", result.keys_p50_ms),
    ]
    for name, ms in rows:
        table.add_row(name, f"{ms:.3f}")
    err.print(table)
    err.print(
        f"index memory ≈ {result.index_memory_mb:.0f} MB; target: decision p99 ≤ "
        f"{TARGET_P99_MS:g} ms (CPU {result.decide_cpu_p99_ms:.2f}, wall {result.decide_p99_ms:.2f})"
    )


def register(bench_app: typer.Typer) -> None:
    bench_app.command("router")(router)
