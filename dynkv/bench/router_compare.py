"""Compare routing policies on one fleet: the same workload, once per policy, each request
carrying the policy in `x-dynkv-router`, its affinity key in `x-session-id`, and a cache salt of
the policy run's own (`dynkv bench serve --compare-router`, docs/benchmarks.md#comparing-routers).

Why these rules:
- **one fleet, the header picks the policy**: every policy meets the same workers, model and
  tiers; nothing restarts between runs;
- **a fresh `cache_salt` per policy run** (vLLM's field: the same prompt under another salt shares
  no cached block, in G1 or in KVBM's tiers): no run profits from the blocks an earlier run left,
  so the order of the policies does not matter. The salt also carries a per-comparison id, so a
  second comparison does not profit from the first either;
- **`x-session-id` on every request** (the workload's affinity key: the user, or for the
  shared-prefix workload the prefix's key): the session policy needs it, the others ignore it.

The measurement of one policy is `bench serve`'s (`dynkv.bench.compare.measure_with`: the
workers' KVBM metrics before and after, the workload in between); around it the frontend's
/metrics is read before and after, and the router's numbers (`RouterStats`: accuracy, per-worker
load, decisions, NATS fallbacks, index size) are the difference.
"""

from __future__ import annotations

import dataclasses
import secrets
import statistics
from collections.abc import Callable, Sequence

import httpx

from dynkv import router_metrics
from dynkv.bench import compare, report, runner
from dynkv.bench.summary import BenchSummary, PolicyRepeats, RouterStats, RunConfig, WorkerLoad
from dynkv.bench.trust import Trust, verify_of
from dynkv.bench.workloads import Workload

POLICIES = ("kv", "round_robin", "least_outstanding", "session")
PREDICTING = ("kv",)  # the policies that predict cached tokens (accuracy n/a for the others)


def parse_policies(values: Sequence[str] | None) -> list[str]:
    """`--compare-router kv,round_robin` → ["kv", "round_robin"]; CompareError (cause + fix) for
    an unknown or repeated policy."""
    chosen = compare.split_values(values)
    if not chosen:
        raise compare.CompareError(
            "--compare-router names no policy", f"pass --compare-router {','.join(POLICIES)}"
        )
    unknown = [p for p in chosen if p not in POLICIES]
    if unknown:
        raise compare.CompareError(
            f"unknown routing {'policy' if len(unknown) == 1 else 'policies'} "
            f"{', '.join(map(repr, unknown))}",
            f"use --compare-router with some of: {','.join(POLICIES)}",
        )
    repeated = sorted({p for p in chosen if chosen.count(p) > 1})
    if repeated:
        raise compare.CompareError(
            f"{', '.join(repeated)} is listed twice", "name each policy once"
        )
    return chosen


def new_run_id() -> str:
    return secrets.token_hex(4)


def cache_salt(run_id: str, policy: str) -> str:
    return f"dynkv-bench-{run_id}-{policy}"


def frontend_metrics_url(url: str) -> str:
    return f"{url.rstrip('/')}/metrics"


Reading = router_metrics.RouterReading | str  # a reading, or why there is none


def read_router(
    url: str, api_key: str | None, timeout_s: float = 5.0, *, trust: Trust | None = None
) -> Reading:
    """The frontend's /metrics, verified against `trust` (the CA the workload is sent with)."""
    try:
        return router_metrics.fetch(url, timeout_s, api_key=api_key, verify=verify_of(trust))
    except (httpx.HTTPError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def router_stats(
    policy: str, salt: str | None, url: str | None, before: Reading, after: Reading
) -> RouterStats:
    """The router's numbers over one policy's run."""
    stats = RouterStats(policy=policy, cache_salt=salt, metrics_url=url)
    if isinstance(before, str) or isinstance(after, str):
        stats.error = after if isinstance(after, str) else before
        return stats
    delta = router_metrics.difference(before, after)
    predicted, actual, ratio = router_metrics.accuracy(delta)
    stats.predicted_cached_tokens, stats.actual_cached_tokens = predicted, actual
    # a policy that predicts nothing has no accuracy, however much the workers reused
    stats.accuracy = ratio if (policy in PREDICTING or predicted) else None
    load = router_metrics.load(delta)
    shares = load.shares()
    pred, act = router_metrics.per_worker(delta.predicted), router_metrics.per_worker(delta.actual)
    stats.load_source = load.source
    stats.workers = [
        WorkerLoad(
            worker=w,
            requests=n,
            share=shares.get(w),
            predicted_cached_tokens=pred.get(w) if delta.predicted else None,
            actual_cached_tokens=act.get(w) if delta.actual else None,
        )
        for w, n in load.requests.items()
    ]
    stats.max_share = max(shares.values()) if shares else None
    stats.decisions = {f"{p}:{r}": n for (p, r), n in sorted(delta.decisions.items()) if n}
    stats.nats_fallbacks = delta.nats_fallbacks
    stats.index_blocks, stats.index_bytes = delta.index_blocks, delta.index_bytes
    if delta.acquired:
        stats.computed_blocks = sum(delta.acquired.values())
        stats.held_twice_blocks = sum(delta.duplicated.values())
    return stats


Event = Callable[[str, str, object], None]  # ("measure" | "done", policy, detail)


def run_policies(
    policies: Sequence[str],
    stack: compare.RunningStack,
    work: Workload,
    warm: Workload | None,
    options: runner.RunOptions,
    run_config: RunConfig,
    *,
    run_id: str | None = None,
    progress: Callable[[str], runner.Progress | None] | None = None,
    on_event: Event | None = None,
    repeat: int = 1,
) -> list[BenchSummary]:
    """One summary per policy run, in the order of `schedule`, each with its `router` numbers,
    against one running fleet (`stack`: the frontend, and the workers' KVBM metrics). With
    `repeat` > 1 each run is labelled `<policy> #<n>`."""
    run_id = run_id or new_run_id()
    notify = on_event or (lambda *_: None)
    url = frontend_metrics_url(stack.url)
    trust = compare.stack_options(options, stack).trust
    summaries = []
    for n, policy in schedule(policies, repeat):
        # with repeats every run gets a salt of its own: no repeat reuses an earlier one's cache
        salt = cache_salt(run_id, policy if repeat == 1 else f"{policy}-{n}")
        label = policy if repeat == 1 else f"{policy} #{n}"
        opts = dataclasses.replace(options, router=policy, cache_salt=salt, session_header=True)
        cfg = run_config.model_copy(
            update={"router": policy, "cache_salt": salt, "session_header": True}
        )

        def bar(_config: compare.StackConfig, label: str = label) -> runner.Progress | None:
            return progress(label) if progress else None

        measure = compare.measure_with(work, warm, opts, cfg, bar)
        notify("measure", label, salt)
        before = read_router(url, options.api_key, trust=trust)
        summary = measure(compare.StackConfig(label), stack)
        after = read_router(url, options.api_key, trust=trust)
        summary.router = router_stats(policy, salt, url, before, after)
        notify("done", label, summary)
        summaries.append(summary)
    return summaries


def schedule(policies: Sequence[str], repeat: int = 1) -> list[tuple[int, str]]:
    """(repeat number from 1, policy) in the order they run. Each repeat starts one policy later
    than the one before: on a small machine the run that comes first on a stack, or after a given
    policy, is measurably different, and one order per repeat spreads that over the policies."""
    out: list[tuple[int, str]] = []
    for r in range(repeat):
        k = r % len(policies)
        out += [(r + 1, p) for p in [*policies[k:], *policies[:k]]]
    return out


def repeat_medians(summaries: Sequence[BenchSummary]) -> list[PolicyRepeats]:
    """Each policy's medians over its runs, in the order the policies first ran; the ratios are
    to the first policy's medians (the one under test, listed first)."""
    runs: dict[str, list[BenchSummary]] = {}
    for s in summaries:
        runs.setdefault(s.router.policy if s.router else s.label, []).append(s)

    def med(values) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    out = [
        PolicyRepeats(
            policy=policy,
            runs=len(group),
            ttft_p50_ms=med(s.ttft_ms.p50 for s in group),
            ttft_p90_ms=med(s.ttft_ms.p90 for s in group),
            later_rounds_p50_ms=med(s.later_rounds_ttft_ms.p50 for s in group),
        )
        for policy, group in runs.items()
    ]
    if out:
        first = out[0]
        for p in out:
            p.later_rounds_p50_vs_first = _ratio(p.later_rounds_p50_ms, first.later_rounds_p50_ms)
            p.ttft_p90_vs_first = _ratio(p.ttft_p90_ms, first.ttft_p90_ms)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def repeats_markdown(medians: Sequence[PolicyRepeats]) -> str:
    """The medians table appended to a repeated comparison's markdown."""
    if not medians:
        return ""
    first = medians[0].policy
    lines = [
        f"Medians over repeats (ratios to {first})",
        "",
        "| policy | runs | TTFT p50 ms | TTFT p90 ms | TTFT p50 rounds ≥ 2 ms "
        f"| rounds ≥ 2 p50 ÷ {first} | p90 ÷ {first} |",
        "|---|---|---|---|---|---|---|",
    ]
    num, ratio = report.fmt_number, report.fmt_ratio
    for p in medians:
        lines.append(
            f"| {p.policy} | {p.runs} | {num(p.ttft_p50_ms)} | {num(p.ttft_p90_ms)} "
            f"| {num(p.later_rounds_p50_ms)} | {ratio(p.later_rounds_p50_vs_first)} "
            f"| {ratio(p.ttft_p90_vs_first)} |"
        )
    return "\n".join(lines) + "\n"
