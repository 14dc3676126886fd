"""The router comparison's rendering: the markdown's router table and per-round percentiles, and
the terminal table, from summaries built by hand."""

from __future__ import annotations

from rich.console import Console

from dynkv.bench import report
from dynkv.bench.summary import (
    BenchSummary,
    HitRates,
    Percentiles,
    Round,
    RouterStats,
    WorkerLoad,
)
from dynkv.cli.bench_router_compare import table


def summary(policy: str, p50: float, accuracy: float | None, shares: dict[str, float]):
    return BenchSummary(
        label=policy,
        requests=8,
        completed=8,
        ttft_ms=Percentiles(p50=p50, p90=p50 * 2, p99=p50 * 3),
        later_rounds_ttft_ms=Percentiles(p50=p50 / 2),
        hit_rates=HitRates(host=0.25),
        rounds=[
            Round(round=1, requests=4, ttft_ms=Percentiles(p50=p50, p90=p50 + 1, p99=p50 + 2)),
            Round(round=2, requests=4, ttft_ms=Percentiles(p50=p50 / 2, p90=9.0, p99=9.5)),
        ],
        router=RouterStats(
            policy=policy,
            accuracy=accuracy,
            max_share=max(shares.values()),
            workers=[WorkerLoad(worker=w, requests=8 * s, share=s) for w, s in shares.items()],
            nats_fallbacks=0,
        ),
    )


RUNS = [
    summary("kv", 40.0, 0.975, {"agg-0": 0.5, "agg-1": 0.5}),
    summary("session", 44.0, None, {"agg-1": 1.0}),
]


def test_markdown_has_a_router_row_per_policy_and_percentiles_per_round():
    text = report.markdown(RUNS, title="routers")
    lines = text.splitlines()
    lines = lines[lines.index("Routers") :]  # below the summary table's own row per run
    header = next(line for line in lines if line.startswith("| policy |"))
    assert "router accuracy" in header and "load per worker" in header
    kv = next(line for line in lines if line.startswith("| kv |"))
    cells = [c.strip() for c in kv.strip("|").split("|")]
    assert cells == [
        "kv", "40.0", "80.0", "120.0", "20.0", "25.0%", "–", "0.975", "50.0%",
        "agg-0 50.0%, agg-1 50.0%", "–", "0",
    ]  # fmt: skip
    session = next(line for line in lines if line.startswith("| session |"))
    assert "| n/a | 100.0% | agg-1 100.0% |" in session
    assert "| 2 | 20.0 / 9.0 / 9.5 | 22.0 / 9.0 / 9.5 |" in text
    assert "TTFT p50 (ms) per round" not in text  # replaced by the p50/p90/p99 table


def test_markdown_without_router_numbers_is_unchanged():
    plain = [s.model_copy(update={"router": None}) for s in RUNS]
    text = report.markdown(plain)
    assert "| policy |" not in text and "TTFT p50 (ms) per round" in text


def test_terminal_table():
    console = Console(width=200, record=True)
    console.print(table(RUNS))
    out = console.export_text()
    assert "0.975" in out and "n/a" in out and "agg-1 100.0%" in out and "8/8" in out
