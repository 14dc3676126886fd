"""One engine of the W1 benchmark: warm up, send every document (round 1), then every document
again (round 2), one request at a time with max_tokens=1, and print the latencies as JSON.

Run as `python -m dynkv.bench.offload_engine CONFIG.json` (a file: the documents' token ids
outgrow one command-line argument; the result goes to `result_file`). vLLM spawns its workers,
so the engine lives behind a __main__ guard in a process of its own, one per configuration.
With "slow_disk_ms" (the slow-disk variant; the engine then runs in this process,
VLLM_ENABLE_V1_MULTIPROCESSING=0) every G3 read takes that much longer per block
(`dynkv.bench.slow_disk`), and the onboard policy's counters are returned with the latencies.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

# A pause after offloaded requests, so that the disk writes they leave on the pool's threads are
# done before requests that must not pay them. (The kernel's writeback of buffered writes can
# run longer: g3_same's first kept-out documents after an offloaded block were still slower.)
SETTLE_S = 1.0


def main() -> None:
    with open(sys.argv[1]) as fh:
        cfg = json.load(fh)
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

    # a request that stays out of the tiers (docs/kvbm.md): the no-offload baseline in this engine
    private = SamplingParams(
        temperature=0.0,
        max_tokens=1,
        extra_args={"kv_transfer_params": {"dynkv": {"offload": False}}},
    )

    def timed(doc: list[int], offload: bool = True, salt: str | None = None) -> float:
        prompt: dict = {"prompt_token_ids": doc}
        if salt is not None:  # a prefix of its own, for vLLM's cache and dynkv's tiers alike
            prompt["cache_salt"] = salt
        t0 = time.perf_counter()
        llm.generate([prompt], one if offload else private, use_tqdm=False)
        return (time.perf_counter() - t0) * 1000

    if cfg.get("same_engine"):
        out: dict = same_engine(
            llm,
            cfg["docs"],
            cfg["warmup_full"],
            cfg.get("passes", 3),
            timed,
            cold_pairs=cfg.get("cold_pairs", False),
        )
    else:
        out = {"rounds": [[timed(doc) for doc in cfg["docs"]] for _ in range(cfg.get("rounds", 2))]}
    if cfg.get("slow_disk_ms") and transfer is not None:
        out["policy"] = _policy_counters(llm)
    # a file, not stdout: vLLM's processes log to stdout too, and lines can interleave
    with open(cfg["result_file"], "w") as fh:
        json.dump(out, fh)


def same_engine(
    llm,
    docs: list[list[int]],
    warmup: list[int],
    passes: int,
    timed: Callable[..., float],
    settle_s: float = SETTLE_S,
    *,
    cold_pairs: bool = False,
) -> dict:
    """W1 inside one engine whose device KV holds every document (docs/benchmarks.md#w1-in-one-engine).

    Cold: every document is sent offloaded and kept out of the tiers, each time under a
    `cache_salt` of its own (a new prefix for vLLM's cache and the tiers alike), in blocks ordered
    offloaded, kept out, kept out, offloaded: the blocks' order cancels a linear drift of the
    engine, and an offloaded request pays the disk writes the one before it left running on the
    pool's threads, as in serving, while a kept-out request pays none (alternating documents
    one by one charged those writes to the kept-out ones). Then vLLM's prefix cache is reset,
    every document is sent once (offloaded), and `passes` times: a pass served by vLLM's own
    prefix cache (the floor), a reset, and a pass the tier serves back (afterwards G1 holds them
    again, for the next floor pass). The lists pair up by index: a document's two cold times, a
    document's floor and tier times of one pass. `rounds` keeps W1's shape: the cold requests,
    then the tier's passes.

    `cold_pairs`: for a tier that leaves no work behind a request (G2: its copies are done when
    the request answers), the same four sends in that order per document instead, back to back:
    a document's offloaded and kept-out times are then measured seconds apart, not blocks of
    documents apart, and the engine's drift between blocks (5-15% on a 2-core VM) cancels."""
    timed(warmup, offload=False)  # a full-length prompt first: the first cold one is not special
    order = (True, False, False, True)
    if cold_pairs:
        sent = [
            [timed(doc, offload=on, salt=f"cold-{k}") for k, on in enumerate(order)] for doc in docs
        ]
        cold = [[times[k] for times in sent] for k in range(len(order))]
        time.sleep(settle_s)
    else:
        cold = []
        for block, on in enumerate(order):
            cold.append([timed(doc, offload=on, salt=f"cold-{block}") for doc in docs])
            time.sleep(settle_s)
    # a document's offloaded time pairs with its kept-out time in the block beside it
    offloaded, private = cold[0] + cold[3], cold[1] + cold[2]
    _reset(llm)
    first = [timed(doc) for doc in docs]
    time.sleep(settle_s)  # the floor's first documents do not share the cores with these writes
    floor, tier = [], []
    for _ in range(passes):
        floor += [timed(doc) for doc in docs]
        _reset(llm)
        tier += [timed(doc) for doc in docs]
    return {
        "rounds": [offloaded + private + first, tier],
        "same_engine": {
            "cold_offloaded_ms": offloaded,
            "cold_private_ms": private,
            "floor_ms": floor,
            "tier_ms": tier,
        },
    }


def _reset(llm) -> None:
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache (a request still running?)")


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
