"""One engine of the W1 benchmark: warm up, send every document (round 1), then every document
again (round 2), one request at a time with max_tokens=1, and print the latencies as JSON.

Run as `python -m dynkv.bench.offload_engine '<json>'` (the result goes to `result_file`) — vLLM spawns its workers, so the engine
lives behind a __main__ guard in a process of its own, one per configuration.
With "slow_disk_ms" (the slow-disk variant; the engine then runs in this process,
VLLM_ENABLE_V1_MULTIPROCESSING=0) every G3 read takes that much longer per block
(`dynkv.bench.slow_disk`), and the onboard policy's counters are returned with the latencies.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg.get("slow_disk_ms"):
        from dynkv.bench import slow_disk

        slow_disk.install(cfg["slow_disk_ms"])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    transfer = None
    if cfg.get("connector"):
        transfer = KVTransferConfig(
            kv_connector=cfg["connector"],
            kv_connector_module_path=cfg.get("module_path"),
            kv_role="kv_both",
            kv_connector_extra_config=cfg.get("extra_config", {}),
        )
    llm = LLM(
        model=cfg["model"],
        dtype=cfg.get("dtype", "bfloat16"),
        block_size=cfg.get("block_size", 32),
        max_model_len=cfg.get("max_model_len", 8192),
        kv_cache_memory_bytes=cfg["device_kv_bytes"],
        enable_prefix_caching=True,
        seed=0,
        kv_transfer_config=transfer,
        **cfg.get("engine_kwargs", {}),
    )
    one = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([{"prompt_token_ids": cfg["warmup"]}], one, use_tqdm=False)

    def timed(doc: list[int]) -> float:
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": doc}], one, use_tqdm=False)
        return (time.perf_counter() - t0) * 1000

    rounds = []
    for _ in range(cfg.get("rounds", 2)):
        rounds.append([timed(doc) for doc in cfg["docs"]])
    out: dict = {"rounds": rounds}
    if cfg.get("slow_disk_ms") and transfer is not None:
        out["policy"] = _policy_counters(llm)
    # a file, not stdout: vLLM's processes log to stdout too, and lines can interleave
    with open(cfg["result_file"], "w") as fh:
        json.dump(out, fh)


def _policy_counters(llm) -> dict:
    """The onboard policy's counters, read from the connector in this process."""
    from dynkv.kvbm.counters import Count

    core = llm.llm_engine.engine_core.engine_core
    metrics = core.scheduler.get_kv_connector()._scheduler.metrics
    return {
        "skipped_blocks": metrics.value(Count.ONBOARD_SKIPPED),
        "onboarded_disk_blocks": metrics.value(Count.ONBOARD_D2D),
        "prefill_seconds_saved": round(metrics.value(Count.PREFILL_SECONDS_SAVED), 3),
    }


if __name__ == "__main__":
    main()
