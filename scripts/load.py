"""Bounded loopback load on a dynkv deployment: errors, latency percentiles, and the memory of
every service over time (scripts/load; the README's "Load" section has the reference numbers).

`--clients` concurrent streaming chat clients send requests back to back for `--duration`
seconds: a shared system prompt (so the KV caches and KVBM are exercised) plus a question of
their own, `--max-tokens` output tokens each (`ignore_eos`, a vLLM extension, so every answer has
that length). A request still in flight at the deadline finishes; none may take longer than
`--timeout`. Meanwhile every service's RSS (its whole process tree) is sampled (scripts/
load_rss.py says how flatness is judged).

Targets: `--url` with `--name` (and DYNKV_STATE_DIR as for `dynkv status`) loads a running
deployment; without `--url` the script brings one up itself (`dynkv up -d`: tiny model, private
state dir and free ports, small tiers so they fill during the warm-up) and takes it down after.

Output: a summary on stderr; with `--json` the report alone on stdout. Exit 0 when there were no
errors and no service's RSS was judged `growing` (flat or settling), 1 otherwise, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_rss import MIB, RssSampler, flatness  # noqa: E402

from dynkv.bench.client import RequestResult, request_body, stream_request  # noqa: E402
from dynkv.bench.report import percentiles  # noqa: E402
from dynkv.bench.workloads import text  # noqa: E402
from dynkv.private_deployment import dynkv_cli, fresh_ports  # noqa: E402
from dynkv.settings import resolve  # noqa: E402
from dynkv.supervisor import read_state  # noqa: E402


def say(message: str) -> None:
    print(f"load: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="frontend base URL of a running deployment (else start one)")
    p.add_argument("--name", help="its deployment name (default: DYNKV_NAME, else default)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--system-words", type=int, default=200, help="shared system prompt size")
    p.add_argument("--question-words", type=int, default=40)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request, at most")
    p.add_argument("--sample", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--warmup", type=float, help="seconds not judged for RSS (default 20%%, ≤60)")
    p.add_argument("--rss-tolerance-pct", type=float, default=2.0)
    p.add_argument("--rss-tolerance-mib", type=float, default=16.0)
    p.add_argument("--api-key", default=os.environ.get("DYNKV_API_KEY"))
    p.add_argument("--json", action="store_true", help="the report alone on stdout")
    p.add_argument("--samples", action="store_true", help="include every RSS sample in --json")
    args = p.parse_args(argv)
    for name in ("clients", "duration", "max_tokens", "timeout", "sample"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup is None:
        args.warmup = min(60.0, 0.2 * args.duration)
    return args


# ---- the deployment ------------------------------------------------------------------------------


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


def deployment_dir(name: str | None) -> Path:
    env = dict(os.environ)
    if name:
        env["DYNKV_NAME"] = name
    return resolve(env=env, require_tier=False).deployment.deployment_dir


def services_of(ddir: Path) -> dict[str, tuple[int, float | None]]:
    state = read_state(ddir)
    if state is None:
        raise SystemExit(f"load: no deployment state in {ddir} (pass --name, DYNKV_STATE_DIR)")
    return {s.name: (s.pid, s.create_time) for s in state.services if s.pid}


# ---- the clients ---------------------------------------------------------------------------------


async def client_loop(
    index: int, http: httpx.AsyncClient, args, model: str, system: str, deadline: float, t0: float
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


async def run_clients(args, base: str, model: str) -> tuple[list[RequestResult], float]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    system = text(random.Random("load-system"), args.system_words)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=timeout, limits=limits, trust_env=False
    ) as http:
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        per_client = await asyncio.gather(
            *(client_loop(i, http, args, model, system, deadline, t0) for i in range(args.clients))
        )
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def first_model(base: str, api_key: str | None) -> str:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{base}/v1/models", headers=headers, timeout=10, trust_env=False)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


# ---- the report ----------------------------------------------------------------------------------


def report(args, results: list[RequestResult], wall: float, sampler: RssSampler) -> dict:
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
    out = {
        "config": {
            k: getattr(args, k)
            for k in ("clients", "duration", "max_tokens", "system_words", "question_words")
            + ("timeout", "sample", "warmup", "rss_tolerance_pct", "rss_tolerance_mib")
        },
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": samples,
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(ok) / wall, 2) if wall else None,
        "output_tokens_per_s": round(sum(r.output_tokens for r in ok) / wall, 1) if wall else None,
        "ttft_ms": _rounded(percentiles([r.ttft for r in ok if r.ttft is not None], 1000)),
        "e2e_ms": _rounded(percentiles([r.latency for r in ok if r.latency is not None], 1000)),
        "max_e2e_ms": round(max((r.latency or 0) for r in ok) * 1000, 1) if ok else None,
        "rss": rss,
        "rss_ok": all(v.get("verdict") != "growing" for v in rss.values()),
    }
    if args.samples:  # per service, and per process of each service's tree, in MiB
        out["rss_samples"] = [
            [round(t, 1), {k: (None if v is None else round(v / MIB, 1)) for k, v in s.items()}]
            for t, s in sampler.samples
        ]
        out["rss_processes"] = [
            [
                round(t, 1),
                {
                    svc: (None if p is None else {k: round(v / MIB, 1) for k, v in p.items()})
                    for svc, p in parts.items()
                },
            ]
            for t, parts in sampler.parts
        ]
    return out


def _rounded(d: dict) -> dict:
    return {k: (None if v is None else round(v, 1)) for k, v in d.items()}


def summary(rep: dict) -> None:
    say(
        f"{rep['requests']} requests in {rep['wall_s']} s ({rep['requests_per_s']}/s, "
        f"{rep['output_tokens_per_s']} tokens/s), errors {rep['errors']}"
    )
    for sample in rep["error_samples"]:
        say(f"  error: {sample}")
    t, e = rep["ttft_ms"], rep["e2e_ms"]
    say(f"TTFT ms p50 {t['p50']} p90 {t['p90']} p99 {t['p99']}; end-to-end ms p50 {e['p50']} "
        f"p90 {e['p90']} p99 {e['p99']} (max {rep['max_e2e_ms']})")  # fmt: skip
    for name, r in rep["rss"].items():
        if not r.get("samples"):
            say(f"RSS {name}: {r.get('reason')}")
            continue
        verdict = r["verdict"].upper() if r["verdict"] == "growing" else r["verdict"]
        say(
            f"RSS {name:<8} {r['start_mib']:>8} → {r['end_mib']:>8} MiB (max {r['max_mib']}); "
            f"after warm-up {r['growth_mib']:+} MiB over {r['window_s']} s, last half "
            f"{r['last_half_growth_mib']:+} (limit {r['limit_mib']}): {verdict}"
        )


def run(args, base: str, services: dict) -> dict:
    model = first_model(base, args.api_key)
    say(f"{args.clients} streaming clients × {args.duration:g} s against {base} (model {model})")
    sampler = RssSampler(services, interval=args.sample).start()
    try:
        results, wall = asyncio.run(run_clients(args, base, model))
    finally:
        sampler.stop()
    return report(args, results, wall, sampler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.url:
        rep = run(args, args.url.rstrip("/"), services_of(deployment_dir(args.name)))
    else:
        with tempfile.TemporaryDirectory(prefix="dynkv-load-") as tmp:
            env = own_stack_env(Path(tmp) / "state")
            say(f"starting a deployment ({env['DYNKV_NAME']}) with the tiny model…")
            up = dynkv_cli("up", "-d", "--json", env=env, timeout=600)
            if up.returncode != 0:
                say(f"dynkv up failed:\n{up.stderr[-4000:]}")
                return 1
            try:
                state = json.loads(up.stdout)
                frontend = next(s for s in state["services"] if s["name"] == "frontend")
                services = {s["name"]: (s["pid"], s["create_time"]) for s in state["services"]}
                rep = run(args, frontend["meta"]["url"], services)
            finally:
                down = dynkv_cli("down", env=env, timeout=180)
                say("down: " + (down.stderr.strip().splitlines() or ["?"])[-1])
    summary(rep)
    if args.json:
        print(json.dumps(rep, indent=2))
    return 0 if rep["errors"] == 0 and rep["rss_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
