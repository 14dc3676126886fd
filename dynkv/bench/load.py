"""Bounded loopback load on a dynkv deployment: errors, latency percentiles, and the memory of
every service over time (`dynkv bench load`; docs/benchmarks.md#load-and-memory-bench-load says how to run it).

`clients` concurrent streaming chat clients send requests back to back for `duration` seconds:
a shared system prompt (so the KV caches and KVBM are exercised) plus a question of their own,
`max_tokens` output tokens each (`ignore_eos`, a vLLM extension, so every answer has that
length). A request still in flight at the deadline finishes; none may take longer than
`timeout`. Meanwhile every service's RSS (its whole process tree) is sampled
(`dynkv.bench.rss` says how flatness is judged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from dynkv.bench.client import RequestResult, request_body, stream_request
from dynkv.bench.load_report import LoadConfig, LoadReport
from dynkv.bench.report import percentiles
from dynkv.bench.rss import MIB, RssSampler, flatness
from dynkv.bench.runner import auth_headers, discover_model
from dynkv.bench.summary import Percentiles
from dynkv.bench.trust import Trust, verify_of
from dynkv.bench.workloads import text
from dynkv.private_deployment import fresh_ports
from dynkv.supervisor import read_state


@dataclass(frozen=True)
class LoadOptions:
    clients: int = 32
    duration: float = 300.0
    max_tokens: int = 32
    system_words: int = 200
    question_words: int = 40
    timeout: float = 120.0
    sample: float = 2.0
    warmup: float = 60.0
    rss_tolerance_pct: float = 2.0
    rss_tolerance_mib: float = 16.0
    api_key: str | None = None
    samples: bool = False
    trust: Trust | None = None  # the CA of an https frontend (`dynkv.bench.trust`)


def say(message: str) -> None:
    print(f"load: {message}", file=sys.stderr, flush=True)


def own_stack_env(state_dir: Path) -> dict[str, str]:
    """A private deployment; DYNKV_*/DYN_KVBM_* you export win over these defaults."""
    env = dict(os.environ)
    defaults = {
        "DYNKV_NAME": f"load-{os.getpid()}",
        "DYNKV_PROFILE": "gpu-cpu-disk",
        "DYN_KVBM_CPU_CACHE_GB": "0.05",  # ~760 tiny-model blocks: full within the warm-up
        "DYN_KVBM_DISK_CACHE_GB": "0.2",
        "DYNKV_DEVICE_KV_GB": "0.05",
        "DYNKV_MAX_MODEL_LEN": "2048",
        "DYNKV_MODEL": "dynkv-tiny",  # the tier sizes above are the tiny model's
        "DYNKV_STARTUP_TIMEOUT_SECS": "300",
        "DYN_KVBM_DISK_CACHE_DIR": str(state_dir.parent / "g3"),
        **fresh_ports(),
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    env["DYNKV_STATE_DIR"] = str(state_dir)
    return env


def services_of(ddir: Path) -> dict[str, tuple[int, float | None]] | None:
    """Each recorded service's pid and create time; None when there is no deployment."""
    state = read_state(ddir)
    if state is None:
        return None
    return {s.name: (s.pid, s.create_time) for s in state.services if s.pid}


# ---- the clients ---------------------------------------------------------------------------------


async def client_loop(
    index: int,
    http: httpx.AsyncClient,
    args: LoadOptions,
    model: str,
    system: str,
    deadline: float,
    t0: float,
) -> list[RequestResult]:
    rng = random.Random(f"load-client-{index}")
    results = []
    n = 0
    while time.perf_counter() < deadline:
        question = f"client {index} question {n}: " + text(rng, args.question_words)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        body = request_body("chat", model, messages, args.max_tokens, ignore_eos=True)
        result = RequestResult(index=n, session=str(index), round=n)
        results.append(await stream_request(http, "chat", body, result, t0))
        n += 1
    return results


async def run_clients(
    args: LoadOptions, base: str, model: str
) -> tuple[list[RequestResult], float]:
    headers = auth_headers(args.api_key)
    limits = httpx.Limits(max_connections=args.clients + 4)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    system = text(random.Random("load-system"), args.system_words)
    async with httpx.AsyncClient(
        base_url=base,
        headers=headers,
        timeout=timeout,
        limits=limits,
        trust_env=False,
        verify=verify_of(args.trust),
    ) as http:
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        per_client = await asyncio.gather(
            *(client_loop(i, http, args, model, system, deadline, t0) for i in range(args.clients))
        )
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


# ---- the report ----------------------------------------------------------------------------------


def report(
    args: LoadOptions, results: list[RequestResult], wall: float, sampler: RssSampler
) -> LoadReport:
    ok = [r for r in results if r.ok]
    errors = [r.error or "unknown" for r in results if not r.ok]
    samples: list[str] = []
    for e in errors:
        if e not in samples and len(samples) < 5:
            samples.append(e)
    rss = {
        name: flatness(
            sampler.series(name),
            warmup_s=args.warmup,
            tolerance_pct=args.rss_tolerance_pct,
            tolerance_mib=args.rss_tolerance_mib,
        )
        for name in sampler.services
    }
    out = LoadReport(
        config=LoadConfig.model_validate(
            {**dataclasses.asdict(args), **(args.trust.record() if args.trust else {})}
        ),
        requests=len(results),
        completed=len(ok),
        errors=len(errors),
        error_samples=samples,
        wall_s=round(wall, 1),
        requests_per_s=round(len(ok) / wall, 2) if wall else None,
        output_tokens_per_s=round(sum(r.output_tokens for r in ok) / wall, 1) if wall else None,
        ttft_ms=_rounded(percentiles([r.ttft for r in ok if r.ttft is not None], 1000)),
        e2e_ms=_rounded(percentiles([r.latency for r in ok if r.latency is not None], 1000)),
        max_e2e_ms=round(max((r.latency or 0) for r in ok) * 1000, 1) if ok else None,
        rss=rss,
        rss_ok=all(v.verdict != "growing" for v in rss.values()),
    )
    if args.samples:  # per service, and per process of each service's tree, in MiB
        out.rss_samples = [
            (round(t, 1), {k: (None if v is None else round(v / MIB, 1)) for k, v in s.items()})
            for t, s in sampler.samples
        ]
        out.rss_processes = [
            (
                round(t, 1),
                {
                    svc: (None if p is None else {k: round(v / MIB, 1) for k, v in p.items()})
                    for svc, p in parts.items()
                },
            )
            for t, parts in sampler.parts
        ]
    return out


def _rounded(d: dict[str, float | None]) -> Percentiles:
    return Percentiles(**{k: (None if v is None else round(v, 1)) for k, v in d.items()})


def summary(rep: LoadReport) -> None:
    say(
        f"{rep.requests} requests in {rep.wall_s} s ({rep.requests_per_s}/s, "
        f"{rep.output_tokens_per_s} tokens/s), errors {rep.errors}"
    )
    for sample in rep.error_samples:
        say(f"  error: {sample}")
    t, e = rep.ttft_ms, rep.e2e_ms
    say(
        f"TTFT ms p50 {t.p50} p90 {t.p90} p99 {t.p99}; end-to-end ms p50 {e.p50} "
        f"p90 {e.p90} p99 {e.p99} (max {rep.max_e2e_ms})"
    )
    for name, r in rep.rss.items():
        if not r.samples or r.verdict is None:
            say(f"RSS {name}: {r.reason}")
            continue
        verdict = r.verdict.upper() if r.verdict == "growing" else r.verdict
        say(
            f"RSS {name:<8} {r.start_mib:>8} → {r.end_mib:>8} MiB (max {r.max_mib}); "
            f"after warm-up {r.growth_mib:+} MiB over {r.window_s} s, last half "
            f"{r.last_half_growth_mib:+} (limit {r.limit_mib}): {verdict}"
        )


def run(args: LoadOptions, base: str, services: dict) -> LoadReport:
    model = discover_model(base, args.api_key, trust_env=False, trust=args.trust)
    say(f"{args.clients} streaming clients × {args.duration:g} s against {base} (model {model})")
    sampler = RssSampler(services, interval=args.sample).start()
    try:
        results, wall = asyncio.run(run_clients(args, base, model))
    finally:
        sampler.stop()
    return report(args, results, wall, sampler)
