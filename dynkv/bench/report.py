"""Turn runs into numbers, a markdown table and a plot, for one configuration or several.

Every function here takes a list of summaries (`summarize(...)`: a `BenchSummary` per labelled
run, `dynkv.bench.summary`), so comparing configurations (a later `bench compare --profiles PROFILE…`, or runs
saved as JSON and loaded again) is the same call as reporting one.

Definitions:
- percentiles use linear interpolation between closest ranks (numpy's default, Excel's
  PERCENTILE.INC): rank h = (n − 1)·q/100, value x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋]);
- TTFT and end-to-end latency are per successful request; ITL pools every gap of every
  successful request (as vLLM's benchmark does);
- throughput is successful requests (and their output tokens) over the wall time of the run,
  first send to last answer, warm-up excluded;
- hit rates are blocks hit / blocks asked of KVBM during the run, summed over the workers that
  have the tier (`dynkv.metrics_text.hit_rates`, the rule `dynkv status` uses too); counters
  are after − before, summed over the targets that have a tier at all (a counter that went down,
  i.e. a restarted worker, counts from zero). A target whose `kvbm_{host,disk}_blocks_total` are
  both 0 has no tier: a disagg decode worker, whose matched tokens all come from the prefill's
  handoff and whose hit rate reads 0. Counting it would double the matched tokens and halve the
  hit rate; its own numbers stay in `kvbm.targets`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynkv.bench.client import RequestResult
from dynkv.bench.runner import RunResult
from dynkv.bench.scrape import COUNTERS, GAUGES, SIZES, Snapshot
from dynkv.bench.summary import (
    BenchSummary,
    CompareReport,
    HitRates,
    Kvbm,
    KvbmTarget,
    Percentiles,
    Round,
    RunConfig,
    Warmup,
)
from dynkv.metrics_text import hit_rates, increase

QUANTILES = (50, 90, 99)
_ERROR_SAMPLES = 5


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) with linear interpolation; None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    xs = sorted(values)
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def percentiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """{"p50", "p90", "p99"} of `values` × `scale` (1000 turns seconds into ms)."""
    out: dict[str, float | None] = {}
    for q in QUANTILES:
        p = percentile(values, q)
        out[f"p{q}"] = None if p is None else p * scale
    return out


def counter_delta(before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return increase(before, after)


@dataclass
class TierStats:
    hit_rates: HitRates
    kvbm: Kvbm


def tier_stats(before: Sequence[Snapshot], after: Sequence[Snapshot]) -> TierStats:
    """Hit rates and counter deltas over the metrics targets (paired by URL)."""
    previous = {s.url: s for s in before}
    deltas: dict[str, float | None] = dict.fromkeys(COUNTERS)
    targets = []
    for snap in after:
        old = previous.get(snap.url, Snapshot(snap.url, error="not scraped before the run"))
        target: dict[str, Any] = {"url": snap.url, "error": snap.error or old.error}
        sizes = {n: snap.values.get(n) for n in SIZES}
        target["tiers"] = any(v != 0 for v in sizes.values())  # unknown counts as present
        for name in GAUGES:
            target[name] = snap.values.get(name)
        for name in COUNTERS:
            delta = counter_delta(old.values.get(name), snap.values.get(name))
            target[name] = delta
            if delta is not None and target["tiers"]:
                deltas[name] = (deltas[name] or 0.0) + delta
        targets.append(target)
    readable = [
        {**t, **{n: s.values.get(n) for n in SIZES}} for t, s in zip(targets, after, strict=True)
    ]
    rates = hit_rates([t for t in readable if not t["error"]])

    return TierStats(
        HitRates(**rates),
        Kvbm(
            onboard_blocks_h2d=deltas["kvbm_onboard_blocks_h2d"],
            onboard_blocks_d2d=deltas["kvbm_onboard_blocks_d2d"],
            matched_tokens=deltas["kvbm_matched_tokens"],
            targets=[KvbmTarget(**t) for t in targets],
        ),
    )


@dataclass
class LabelledRun:
    """One configuration's run and what surrounds it, ready to summarize."""

    label: str
    run: RunResult
    config: RunConfig | dict[str, Any] = field(default_factory=RunConfig)
    metrics_before: list[Snapshot] = field(default_factory=list)
    metrics_after: list[Snapshot] = field(default_factory=list)


def _ms(values: Sequence[float]) -> Percentiles:
    return Percentiles(**percentiles(values, 1000.0))


def _rounds(ok: Sequence[RequestResult]) -> list[Round]:
    by_round: dict[int, list[float]] = {}
    for r in ok:
        by_round.setdefault(r.round, []).append(r.ttft or 0.0)
    return [
        Round(round=n, requests=len(ttfts), ttft_ms=_ms(ttfts))
        for n, ttfts in sorted(by_round.items())
    ]


def summarize(labelled: LabelledRun) -> BenchSummary:
    """The report of one configuration: the `--json` shape of `dynkv bench serve`."""
    results = labelled.run.results
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    duration = labelled.run.duration_s
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_known = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    prompt_tokens = sum(prompt_known) if prompt_known else None
    tiers = tier_stats(labelled.metrics_before, labelled.metrics_after)
    matched = tiers.kvbm.matched_tokens
    tiers.kvbm.matched_token_fraction = (
        matched / prompt_tokens if matched is not None and prompt_tokens else None
    )
    samples = list(dict.fromkeys(r.error for r in failed if r.error))[:_ERROR_SAMPLES]
    warm = labelled.run.warmup
    config = labelled.config
    return BenchSummary(
        label=labelled.label,
        ttft_ms=_ms([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=_ms([gap for r in ok for gap in r.itl]),
        latency_ms=_ms([r.latency for r in ok if r.latency is not None]),
        requests_per_s=len(ok) / duration if duration > 0 else None,
        output_tokens_per_s=output_tokens / duration if duration > 0 else None,
        hit_rates=tiers.hit_rates,
        requests=len(results),
        completed=len(ok),
        errors=len(failed),
        error_samples=samples,
        duration_s=duration,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        rounds=_rounds(ok),
        later_rounds_ttft_ms=_ms([r.ttft for r in ok if r.ttft is not None and r.round > 1]),
        kvbm=tiers.kvbm,
        warmup=Warmup(requests=len(warm), errors=sum(not r.ok for r in warm)),
        config=RunConfig.model_validate(config),
    )


def combined(summaries: Sequence[BenchSummary]) -> CompareReport:
    """Every summary, in order, as one report (`{"runs": [...]}`, however many there are)."""
    return CompareReport(runs=list(summaries))


def fmt_number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def fmt_percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown(
    summaries: Sequence[BenchSummary],
    title: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A summary table (one row per configuration) and a TTFT-per-round table (one column each).

    `notes` are bullet lines under the title (a comparison's date, command and host); a
    configuration whose stack did not come up (`summary.stack.error`) is named under the
    table with its error's first line."""
    lines = [f"## {title}", ""] if title else []
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    header = (
        "| configuration | requests | errors | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | latency p50 ms | latency p99 ms | req/s | output tok/s "
        "| host hit | disk hit |"
    )
    lines += [header, "|" + "---|" * header.count(" | ") + "---|"]
    for s in summaries:
        ttft, itl, lat = s.ttft_ms, s.itl_ms, s.latency_ms
        cells = [
            s.label,
            str(s.requests),
            str(s.errors),
            fmt_number(ttft.p50),
            fmt_number(ttft.p90),
            fmt_number(ttft.p99),
            fmt_number(itl.p50),
            fmt_number(itl.p99),
            fmt_number(lat.p50),
            fmt_number(lat.p99),
            fmt_number(s.requests_per_s, 2),
            fmt_number(s.output_tokens_per_s, 1),
            fmt_percent(s.hit_rates.host),
            fmt_percent(s.hit_rates.disk),
        ]
        lines.append(_row(cells))
    for s in summaries:
        error = s.stack.error if s.stack else None
        if error:
            lines.append(f"\n{s.label}: the stack did not come up: {error.splitlines()[0]}")
    if any(s.router for s in summaries):
        lines += ["", *router_markdown(summaries)]
    rounds = sorted({r.round for s in summaries for r in s.rounds})
    if rounds:
        # a router comparison shows the tail per round too: affinity's cost is in p90/p99
        quantiles = QUANTILES if any(s.router for s in summaries) else (50,)
        names = " / ".join(f"p{q}" for q in quantiles)
        lines += ["", f"TTFT {names} (ms) per round", ""]
        lines.append(_row(["round", *(s.label for s in summaries)]))
        lines.append("|---|" + "---|" * len(summaries))
        for n in rounds:
            row = [str(n)]
            for s in summaries:
                match = [r.ttft_ms for r in s.rounds if r.round == n]
                cells = (fmt_number(getattr(match[0], f"p{q}")) for q in quantiles)
                row.append(" / ".join(cells) if match else "–")
            lines.append(_row(row))
    return "\n".join(lines) + "\n"


def worker_loads(summary: BenchSummary) -> str:
    """`agg-0 52%, agg-1 48%`: each worker's share of a policy run's requests."""
    router = summary.router
    if router is None or not router.workers:
        return "–"
    return ", ".join(f"{w.worker} {fmt_percent(w.share)}" for w in router.workers)


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def router_markdown(summaries: Sequence[BenchSummary]) -> list[str]:
    """The router comparison's table: one row per policy (docs/benchmarks.md#comparing-routers
    says what each column means)."""
    header = (
        "| policy | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TTFT p50 rounds ≥ 2 ms "
        "| host hit | disk hit | router accuracy | busiest worker | load per worker "
        "| held twice | NATS fallbacks |"
    )
    lines = ["Routers", "", header, "|" + "---|" * header.count(" | ") + "---|"]
    for s in summaries:
        r = s.router
        error = f" (frontend metrics: {r.error.splitlines()[0]})" if r and r.error else ""
        lines.append(
            _row(
                [
                    s.label + error,
                    fmt_number(s.ttft_ms.p50),
                    fmt_number(s.ttft_ms.p90),
                    fmt_number(s.ttft_ms.p99),
                    fmt_number(s.later_rounds_ttft_ms.p50),
                    fmt_percent(s.hit_rates.host),
                    fmt_percent(s.hit_rates.disk),
                    fmt_ratio(r.accuracy if r else None),
                    fmt_percent(r.max_share if r else None),
                    worker_loads(s),
                    fmt_percent(r.held_twice_share if r else None),
                    fmt_number(r.nats_fallbacks if r else None, 0),
                ]
            )
        )
    return lines


def plot(summaries: Sequence[BenchSummary], path: str | Path, title: str | None = None) -> Path:
    """PNG of TTFT per round, one line per configuration: p50 solid, p90 dashed.

    Uses matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in summaries:
        rounds = [r for r in s.rounds if r.ttft_ms.p50 is not None]
        xs = [r.round for r in rounds]
        (line,) = ax.plot(xs, [r.ttft_ms.p50 for r in rounds], marker="o", label=s.label)
        ax.plot(
            xs,
            [r.ttft_ms.p90 for r in rounds],
            linestyle="--",
            color=line.get_color(),
            alpha=0.6,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("TTFT (ms): p50 solid, p90 dashed")
    ax.set_title(title or "TTFT per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if summaries:
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
