"""`dynkv bench offload`: workload W1 (docs/benchmarks.md) in real vLLM engines, side by side in one run.

W1: D documents of ~L tokens, each sent twice (round 1, then round 2), max_tokens=1, block size
32, prefix caching on. Each configuration runs in an engine of its own, with the same pinned
threads (`VLLM_CPU_OMP_THREADS_BIND`, `VLLM_CPU_NUM_OF_RESERVED_CPU=0`): vLLM on CPU reserves one
of two cores when no KV connector is set and uses both when one is, which alone halves prefill
time and would make every comparison lie. Every engine computes in one dtype: `--dtype`, else
the one `up` serves on this machine (`served_dtype`).

Configurations (the device KV of all but `floor` cannot hold the working set):
  recompute  no connector, small device KV: round 2 recomputes
  floor      no connector, device KV large enough: vLLM's own prefix cache (the floor)
  peer       vLLM's ExampleConnector (safetensors files per request), small device KV
  g2         dynkv, host tier (G2)
  g3         dynkv, disk tier only (G3), buffered I/O: round 2 reads from a warm page cache, the
             condition of the G3 target
  g3_direct  the same with O_DIRECT (dynkv's default): round 2 reads the device itself
  g2g3       dynkv, host and disk tiers
  g2_same    dynkv's G2 in one engine whose device KV holds every document: the floor, G2 and
             the cold overhead measured side by side in it (dynkv.bench.offload_same)
  g3_same    the same for G3 (buffered I/O)
  native     vLLM's own OffloadingConnector (`--kv-offloading-size`, CPU offload of CUDA KV):
             CUDA only, so run only when named (`--only native`; scripts/gpu-check does)
Reported: round-2 median latency per configuration (≈ TTFT, one output token), and
cold_overhead = dynkv's round-1 median ÷ the recompute configuration's (same device KV, no
connector). Targets: g2 ≤ 1.1 × floor and ≤ peer, g3 ≤ 1.3 × floor, cold_overhead ≤ 1.03; the
same-engine configurations are held to the same factors (`same_engine` in the report).

The slow-disk variant (`g3_read_delay_ms` > 0, docs/onboard-policy.md) runs instead:
  recompute       as above
  g3_slow_auto    G3 only, every disk read `g3_read_delay_ms` longer per block, onboard policy auto
  g3_slow_always  the same disk, policy always (every hit loaded, however slow)
all three with the engine in the benchmark's process (the delay is installed where the disk pool
lives). Target: g3_slow_auto ≤ 1.05 × recompute.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dynkv.bench import offload_same as same
from dynkv.bench.kvbm_report import OffloadReport, SlowDiskReport
from dynkv.plan.cpu import CPU_ENGINE_DEFAULTS

CONNECTOR = {"connector": "DynkvConnector", "module_path": "dynkv.kvbm.vllm_connector"}


@dataclass(frozen=True)
class Config:
    name: str
    device_kv_bytes: int
    connector: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # extra `vllm.LLM` arguments
    opt_in: bool = False  # run only when named in `only`
    slow_disk_ms: float = 0.0  # > 0: the engine runs in-process, its G3 reads slowed
    same_engine: bool = False  # floor, tier and no-offload baseline in this one engine
    cold_pairs: bool = False  # same engine: a document's cold sends back to back (no async work)


SLOW_DISK_CONFIGS = ("recompute", "g3_slow_auto", "g3_slow_always")


def slow_disk_configurations(
    small_kv: int, tier_gb: float, workdir: Path, delay_ms: float
) -> list[Config]:
    """recompute against G3 on a slowed disk, with the onboard policy on and off."""
    inproc = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = [Config("recompute", small_kv, env=inproc)]
    for policy in ("auto", "always"):
        env = {
            **inproc,
            "DYN_KVBM_DISK_CACHE_GB": str(tier_gb),
            "DYN_KVBM_DISK_CACHE_DIR": str(workdir / f"g3_slow_{policy}"),
            "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true",
            "DYN_KVBM_ONBOARD_POLICY": policy,
        }
        out.append(Config(f"g3_slow_{policy}", small_kv, CONNECTOR, env, slow_disk_ms=delay_ms))
    return out


def configurations(small_kv: int, large_kv: int, tier_gb: float, workdir: Path) -> list[Config]:
    return [
        Config("recompute", small_kv),
        Config("floor", large_kv),
        Config(
            "peer",
            small_kv,
            {
                "connector": "ExampleConnector",
                "extra_config": {"shared_storage_path": str(workdir / "peer")},
            },
        ),
        Config("g2", small_kv, CONNECTOR, {"DYN_KVBM_CPU_CACHE_GB": str(tier_gb)}),
        Config(
            "g3",
            small_kv,
            CONNECTOR,
            {
                "DYN_KVBM_DISK_CACHE_GB": str(tier_gb),
                "DYN_KVBM_DISK_CACHE_DIR": str(workdir / "g3"),
                "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true",
            },
        ),
        Config(
            "g3_direct",
            small_kv,
            CONNECTOR,
            {
                "DYN_KVBM_DISK_CACHE_GB": str(tier_gb),
                "DYN_KVBM_DISK_CACHE_DIR": str(workdir / "g3_direct"),
            },
        ),
        Config(
            "g2g3",
            small_kv,
            CONNECTOR,
            {
                "DYN_KVBM_CPU_CACHE_GB": str(tier_gb),
                "DYN_KVBM_DISK_CACHE_GB": str(tier_gb),
                "DYN_KVBM_DISK_CACHE_DIR": str(workdir / "g2g3"),
            },
        ),
        Config(
            "g2_same",
            large_kv,
            CONNECTOR,
            {"DYN_KVBM_CPU_CACHE_GB": str(tier_gb)},
            same_engine=True,
            cold_pairs=True,  # G2's stores are done when a request answers: nothing spills over
        ),
        Config(
            "g3_same",
            large_kv,
            CONNECTOR,
            {
                "DYN_KVBM_DISK_CACHE_GB": str(tier_gb),
                "DYN_KVBM_DISK_CACHE_DIR": str(workdir / "g3_same"),
                "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true",
            },
            same_engine=True,
        ),
        Config(
            "native",
            small_kv,
            # vLLM's size is in GiB, ours in decimal GB: the same bytes
            engine={"kv_offloading_size": tier_gb * 1e9 / 2**30, "kv_offloading_backend": "native"},
            opt_in=True,
        ),
    ]


def documents(count: int, tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (no special tokens): every document is a distinct prefix."""
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(tokens)] for _ in range(count)]


def cpu_binding() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    return (
        f"{cpus[0]}-{cpus[-1]}"
        if cpus == list(range(cpus[0], cpus[-1] + 1))
        else ",".join(map(str, cpus))
    )


def run_engine(
    config: Config, payload: dict, timeout: float, workdir: Path, engine: dict | None = None
) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=cpu_binding(),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        **{k: os.environ.get(k, v) for k, v in CPU_ENGINE_DEFAULTS.items()},
        DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS="3600",
        **config.env,
    )
    result_file = workdir / f"{config.name}.json"
    cfg = {
        **payload,
        "device_kv_bytes": config.device_kv_bytes,
        "result_file": str(result_file),
        **config.connector,
        "engine_kwargs": {**(engine or {}), **config.engine},
        "slow_disk_ms": config.slow_disk_ms,
        "same_engine": config.same_engine,
        "cold_pairs": config.cold_pairs,
        "passes": same.PASSES,
    }
    cfg_file = workdir / f"{config.name}.config.json"
    cfg_file.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "dynkv.bench.offload_engine", str(cfg_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not result_file.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"engine {config.name!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_file.read_text())


def run(
    *,
    model: str,
    docs: int = 6,
    doc_tokens: int = 3600,
    vocab: int = 2048,
    small_kv: int = 100 << 20,
    large_kv: int = 1 << 30,
    tier_gb: float = 1.0,
    only: list[str] | None = None,
    directory: str | None = None,
    timeout: float = 1800,
    g3_read_delay_ms: float = 0.0,
    progress: Callable[[str], None] = lambda _msg: None,
    engine: dict | None = None,
    dtype: str | None = None,
) -> OffloadReport | SlowDiskReport:
    """W1 over `configurations` (all but the opt-in ones, or those in `only`); `engine`: extra
    `vllm.LLM` arguments for every engine (scripts/gpu-check: enforce_eager, to start fast);
    `dtype`: every engine's, by default the one `up` serves on this machine (`served_dtype`)."""
    dtype = dtype or served_dtype()
    workdir = Path(tempfile.mkdtemp(prefix="dynkv-w1-", dir=directory))
    try:
        payload = {
            "model": model,
            "dtype": dtype,
            "docs": documents(docs, doc_tokens, vocab, seed=1),
            "warmup": documents(1, 256, vocab, seed=99)[0],
            "warmup_full": documents(1, doc_tokens, vocab, seed=98)[0],
            "max_model_len": max(2048, doc_tokens + 64),
        }
        results: dict[str, dict] = {}
        configs = (
            slow_disk_configurations(small_kv, tier_gb, workdir, g3_read_delay_ms)
            if g3_read_delay_ms > 0
            else configurations(small_kv, large_kv, tier_gb, workdir)
        )
        for config in configs:
            if (only and config.name not in only) or (not only and config.opt_in):
                continue
            progress(f"{config.name}: starting an engine")
            ran = run_engine(config, payload, timeout, workdir, engine)
            rounds = ran["rounds"]
            results[config.name] = {
                "round1_ms": [round(x, 1) for x in rounds[0]],
                "round2_ms": [round(x, 1) for x in rounds[1]],
                "round1_median_ms": round(statistics.median(rounds[0]), 1),
                "round2_median_ms": round(statistics.median(rounds[1]), 1),
            }
            if "policy" in ran:
                results[config.name]["policy"] = ran["policy"]
            if "same_engine" in ran:
                results[config.name]["same_engine"] = {
                    k: [round(x, 1) for x in v] for k, v in ran["same_engine"].items()
                }
            progress(
                f"{config.name}: round 1 {results[config.name]['round1_median_ms']} ms, "
                f"round 2 {results[config.name]['round2_median_ms']} ms"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    workload = {"docs": docs, "doc_tokens": doc_tokens, "small_kv": small_kv, "large_kv": large_kv}
    if g3_read_delay_ms > 0:
        slow = summarize_slow_disk(results, g3_read_delay_ms=g3_read_delay_ms, **workload)
        return SlowDiskReport.model_validate({**slow, "dtype": dtype})
    return OffloadReport.model_validate({**summarize(results, **workload), "dtype": dtype})


def served_dtype() -> str:
    """The dtype a `dynkv up` worker computes in on this machine, so W1 measures what is served:
    bfloat16 (every model dynkv serves) on a GPU or a CPU with native bfloat16, float32 on a CPU
    without it (dynkv.plan.dtype; there vLLM-cpu emulates bfloat16, slowly and inexactly)."""
    from dynkv.hardware import resolve_device
    from dynkv.plan.dtype import CPU_FALLBACK_DTYPE, cpu_bf16_native

    if resolve_device("auto") == "cuda" or cpu_bf16_native():
        return "bfloat16"
    return CPU_FALLBACK_DTYPE


def summarize_slow_disk(results: dict[str, dict], **workload) -> dict:
    """Round-2 medians of the slow-disk variant, each G3 run as a ratio of recompute."""
    out: dict = {f"{name}_ms": None for name in SLOW_DISK_CONFIGS}
    for name in SLOW_DISK_CONFIGS:
        if name in results:
            out[f"{name}_ms"] = results[name]["round2_median_ms"]
    recompute = out["recompute_ms"]
    for name in SLOW_DISK_CONFIGS[1:]:
        if recompute and out[f"{name}_ms"] is not None:
            out[f"{name}_vs_recompute"] = round(out[f"{name}_ms"] / recompute, 3)
    out["targets"] = {
        "g3_slow_auto_le_1.05x_recompute": _le(out["g3_slow_auto_ms"], recompute, 1.05)
    }
    out["configs"] = results
    out["workload"] = workload
    return out


def summarize(results: dict[str, dict], **workload) -> dict:
    def r2(name: str) -> float | None:
        return results[name]["round2_median_ms"] if name in results else None

    out: dict = {
        "recompute_ms": r2("recompute"),
        "floor_ms": r2("floor"),
        "peer_ms": r2("peer"),
        "g2_ms": r2("g2"),
        "g3_ms": r2("g3"),
        "g3_direct_ms": r2("g3_direct"),
        "g2g3_ms": r2("g2g3"),
        "native_ms": r2("native"),
        "cold_overhead": None,
    }
    if "recompute" in results and "g2" in results:
        out["cold_overhead"] = round(
            results["g2"]["round1_median_ms"] / results["recompute"]["round1_median_ms"], 3
        )
    floor = out["floor_ms"]
    if floor:
        for name in ("recompute", "peer", "g2", "g3", "g3_direct", "g2g3", "native"):
            if out[f"{name}_ms"] is not None:
                out[f"{name}_vs_floor"] = round(out[f"{name}_ms"] / floor, 3)
    out["targets"] = {
        "g2_le_1.1x_floor": _le(out["g2_ms"], floor, 1.1),
        "g2_le_peer": _le(out["g2_ms"], out["peer_ms"], 1.0),
        "g2_le_native": _le(out["g2_ms"], out["native_ms"], 1.0),
        "g3_le_1.3x_floor": _le(out["g3_ms"], floor, 1.3),
        "cold_overhead_le_1.03": None
        if out["cold_overhead"] is None
        else out["cold_overhead"] <= 1.03,
    }
    same_engine, same_targets = same.summarize(results)
    if same_engine:
        out["same_engine"] = same_engine
        out["targets"].update(same_targets)
    out["configs"] = results
    out["workload"] = workload
    return out


def _le(value: float | None, reference: float | None, factor: float) -> bool | None:
    if value is None or reference is None:
        return None
    return value <= reference * factor
