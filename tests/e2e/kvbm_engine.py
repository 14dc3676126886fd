"""One vLLM engine with the dynkv connector, driven through a scenario; prints a JSON result.

Run as a script (vLLM spawns workers, so its entry point needs a __main__ guard):
    python kvbm_engine.py '<json config>'
Config: {"model": path, "scenario": "tiers"|"roundtrip"|"restart", "prompts": [[ids…], …],
         "device_kv_bytes": int, "inproc": bool, "metrics_port": int}
Optional: "sequential_reference": true (consume: the reference is computed one prompt at a time,
as the handoffs are; batched decoding may round differently on a real model's near-ties).
The DYN_KVBM_* environment configures the tiers, exactly as in production.

Scenarios
- tiers: cold run, a repeat served by vLLM's own prefix cache (the reference), then the device
  prefix cache is reset and the same prompts are served again — their prefixes now come from
  KVBM. Also: the same prompt under two cache salts. Greedy outputs and logprobs are returned.
- roundtrip (in-process engine): the device KV bytes of the onboarded blocks compared with the
  bytes vLLM computed in the cold run (the device cache is zeroed in between).
- restart: a single pass (a fresh engine reusing an existing disk pool).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _metrics(port: int) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    if not port:
        return {}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created") or sample.labels:
                continue
            out[sample.name] = sample.value
    return out


def _outputs(results) -> list[dict]:
    out = []
    for r in results:
        o = r.outputs[0]
        logprobs = [
            {str(k): round(v.logprob, 6) for k, v in sorted(step.items())}
            for step in o.logprobs or []
        ]
        out.append({"ids": list(o.token_ids), "logprobs": logprobs})
    return out


def _worker_device():
    """In-process engines only: the worker connector's view of the KV tensors."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    return connector._worker  # noqa: SLF001 (test introspection)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(
        model=cfg["model"],
        dtype="bfloat16",
        block_size=32,
        max_model_len=cfg.get("max_model_len", 2048),
        kv_cache_memory_bytes=cfg.get("device_kv_bytes", 64 << 20),
        enforce_eager=True,
        enable_prefix_caching=True,
        seed=0,
        kv_transfer_config=KVTransferConfig(
            kv_connector="DynkvConnector",
            kv_connector_module_path="dynkv.kvbm.vllm_connector",
            kv_role="kv_both",
        ),
    )
    greedy = SamplingParams(
        temperature=0.0, max_tokens=cfg.get("max_tokens", 8), logprobs=3, ignore_eos=True
    )
    prompts = [{"prompt_token_ids": p} for p in cfg["prompts"]]
    port = cfg.get("metrics_port", 0)
    result: dict = {}

    def settle() -> None:  # let the worker's report (sent with the next step) and disk writes land
        llm.generate([{"prompt_token_ids": [7, 8, 9]}], SamplingParams(max_tokens=1))
        time.sleep(0.5)

    if cfg["scenario"] == "tiers":
        result["cold"] = _outputs(llm.generate(prompts, greedy))
        result["device_hit"] = _outputs(llm.generate(prompts, greedy))
        settle()
        result["metrics_before"] = _metrics(port)
        llm.reset_prefix_cache()
        result["kvbm_hit"] = _outputs(llm.generate(prompts, greedy))
        settle()
        result["metrics_after"] = _metrics(port)
        # tenants: the same prompt under two salts never shares blocks
        salted = cfg["prompts"][0][:]
        llm.reset_prefix_cache()
        before = _metrics(port)
        llm.generate([{"prompt_token_ids": salted, "cache_salt": "tenant-a"}], greedy)
        settle()
        llm.reset_prefix_cache()
        llm.generate([{"prompt_token_ids": salted, "cache_salt": "tenant-b"}], greedy)
        settle()
        mid = _metrics(port)
        llm.reset_prefix_cache()
        llm.generate([{"prompt_token_ids": salted, "cache_salt": "tenant-a"}], greedy)
        settle()
        result["salt"] = {"before": before, "after_b": mid, "after_a_again": _metrics(port)}
    elif cfg["scenario"] == "roundtrip":
        worker = _worker_device()
        layers = worker.device.layers
        result["cold"] = _outputs(llm.generate(prompts, greedy))
        nonzero = {}
        for b in range(worker.num_blocks):
            data = worker.device.block_bytes(b)
            if any(data):
                nonzero[b] = data
        llm.reset_prefix_cache()
        for layer in layers:
            layer.blocks.zero_()
        loaded: list[int] = []
        original = worker.start_load

        def spy(ops, unloadable):
            loaded.extend(op.device_block for op in ops.loads)
            return original(ops, unloadable)

        worker.start_load = spy
        result["kvbm_hit"] = _outputs(llm.generate(prompts, greedy))
        originals = set(nonzero.values())
        result["loaded_blocks"] = len(loaded)
        result["loaded_identical"] = sum(worker.device.block_bytes(b) in originals for b in loaded)
        result["cold_nonzero_blocks"] = len(nonzero)
    elif cfg["scenario"] == "produce":  # the prefill half of disaggregated serving
        produce = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            extra_args={"kv_transfer_params": {"dynkv": {"produce": True}}},
        )
        outs = llm.generate(prompts, produce)
        result["params"] = [o.kv_transfer_params for o in outs]
        settle()
        result["metrics"] = _metrics(port)
    elif cfg["scenario"] == "consume":  # the decode half: prefix from the handoff, then reference
        handed = []
        for prompt, params in zip(prompts, cfg["params"], strict=True):
            sp = greedy.clone()
            sp.extra_args = {"kv_transfer_params": params}
            handed.append(llm.generate([prompt], sp)[0])
        result["handoff"] = _outputs(handed)
        settle()
        result["metrics"] = _metrics(port)
        llm.reset_prefix_cache()
        if cfg.get("sequential_reference"):  # one prompt at a time, as the handoffs above ran
            result["reference"] = [_outputs(llm.generate([p], greedy))[0] for p in prompts]
        else:
            result["reference"] = _outputs(llm.generate(prompts, greedy))
    elif cfg["scenario"] == "restart":
        result["run"] = _outputs(llm.generate(prompts, greedy))
        settle()
        result["metrics"] = _metrics(port)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS", "0.5")
    main()
