"""One vLLM engine with the dynkv connector, driven through a scenario; prints a JSON result.

Run as a script (vLLM spawns workers, so its entry point needs a __main__ guard):
    python kvbm_engine.py '<json config>'
Config: {"model": path, "scenario": "tiers"|"restart"|"produce"|"consume"|"model" or a list,
         "prompts": [[ids…], …], "device_kv_bytes": int, "metrics_port": int,
         "reference_digests": [sha256 hex, …] (restart, consume), "params": [...] (consume)}
The DYN_KVBM_* environment configures the tiers, exactly as in production. The engine runs in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set below) so that the connector's view of
the device KV tensors can be read: every scenario reports, for the blocks it onboarded, how many
hold exactly the bytes vLLM computed (`*_identical` of `*_loaded`).
Optional: "batched": true (consume: the handoffs are decoded in one batch, as the reference is;
otherwise one at a time).
Optional: "slow_disk_ms": N (tiers): a last phase on a slowed G3 (docs/onboard-policy.md).
Optional: "reference_salt": "s" (consume: the reference runs under that cache salt, so that a
tier of the decode engine holding the prompts cannot serve it: it is recomputed).
A list of scenarios runs them one after the other on the same engine (one engine start instead of
several, where the tests' configurations agree), each from an empty device cache (prefix cache
reset, device KV zeroed) while the tiers keep what they hold; the RESULT maps each name to its
result. An entry may be {"scenario": name, …}: its other keys override the config for that one.

Scenarios
- tiers: cold run (the digests of every block vLLM computed are kept), a repeat served by vLLM's
  own prefix cache, then the device prefix cache is reset and the device KV zeroed and the same
  prompts are served again — their prefixes now come from KVBM — and once more the same way
  (`kvbm_hit_again`: the same bytes loaded into the same batch, so the same computation). Also:
  the same prompt under two cache salts. Greedy token ids and logprobs are returned. With
  "slow_disk_ms", every G3 read then takes N ms longer per block (`dynkv.bench.slow_disk`, in
  this process, which holds the disk pool) and the prompts are served from the prefix caches
  twice more: with the onboard policy `always` (loaded, and the slow disk measured), then `auto`
  (skipped: recomputed); `slow_disk` holds each phase's outputs and metrics.
- restart: a single pass (a fresh engine reusing an existing disk pool); its onboarded blocks are
  checked against the first engine's `computed_digests`.
- produce / consume: the prefill and decode halves of disaggregated serving; the decode engine's
  onboarded blocks are checked against the prefill engine's `computed_digests`.
- model: the model through vLLM's text paths ("text_prompt" decoded greedily twice, a chat): its
  architecture, vLLM's prompt token ids and the outputs.
"""

from __future__ import annotations

import hashlib
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
            if sample.name == "kvbm_onboard_skipped_blocks_total":  # {tier, reason}
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
                key = f"{sample.name}{{{sample.labels['tier']},{sample.labels['reason']}}}"
                out[key] = sample.value
            if sample.name.endswith("_created") or sample.labels:
                continue
            out[sample.name] = sample.value
    return out


def _outputs(results) -> list[dict]:
    """Per request: the greedy token ids, the logprob of each chosen token, and the top-3."""
    out = []
    for r in results:
        o = r.outputs[0]
        steps = o.logprobs or []
        top = [{str(k): v.logprob for k, v in sorted(step.items())} for step in steps]
        chosen = [step[t].logprob for t, step in zip(o.token_ids, steps, strict=True)]
        out.append({"ids": list(o.token_ids), "logprobs": chosen, "top": top})
    return out


def _worker_device():
    """The worker connector's view of the KV tensors (the engine runs in this process)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    return connector._worker  # noqa: SLF001 (test introspection)


def _digest(worker, block: int) -> str:
    return hashlib.sha256(worker.device.block_bytes(block)).hexdigest()


def _computed_digests(worker) -> list[str]:
    """Digests of every device block that holds KV. Blocks no request wrote hash to zeros and are
    left out; a block holding whatever the allocator gave it would only add a digest that no
    onboarded block matches by chance."""
    zero = hashlib.sha256(bytes(worker.layout.bytes_per_block)).hexdigest()
    digests = {_digest(worker, b) for b in range(worker.num_blocks)}
    return sorted(digests - {zero})


def _scheduler_side(llm):
    """The scheduler connector's own half (the engine core runs in this process)."""
    core = llm.llm_engine.engine_core.engine_core  # noqa: SLF001 (test introspection)
    return core.scheduler.get_kv_connector()._scheduler  # noqa: SLF001


def _slow_disk_phases(llm, worker, greedy, prompts, port: int, delay_ms: float) -> dict:
    from vllm import SamplingParams

    from dynkv.bench import slow_disk
    from dynkv.kvbm.onboard_policy import Policy

    policy = _scheduler_side(llm).policy
    slow_disk.install(delay_ms)
    phases: dict = {}
    t0 = time.perf_counter()
    try:
        for mode in (Policy.ALWAYS, Policy.AUTO):  # `always` first: its loads time the slow disk
            policy.policy = mode
            llm.reset_prefix_cache()
            _zero_device(worker)
            before = _metrics(port)
            outputs = _outputs(llm.generate(prompts, greedy))
            llm.generate([{"prompt_token_ids": [7, 8, 9]}], SamplingParams(max_tokens=1))
            est = policy.estimate(len(prompts[0]["prompt_token_ids"]))
            phases[mode.value] = {
                "outputs": outputs,
                "before": before,
                "after": _metrics(port),
                # the policy's view after the phase (seconds per block), to read a failure by
                "estimate": {"recompute": est.recompute, "load": dict(est.load)},
            }
    finally:
        slow_disk.uninstall()
    phases["seconds"] = time.perf_counter() - t0  # what the phase adds to the e2e suite
    return phases


def _zero_device(worker) -> None:
    for layer in worker.device.layers:
        layer.blocks.zero_()


class LoadSpy:
    """Digests of the device blocks the connector onboarded, taken right after each load and
    before the forward pass: vLLM later recomputes every block from the first failed one of a
    request on, so afterwards a block may hold recomputed rather than onboarded bytes. A block
    that failed its check is not onboarded (vLLM recomputes it) and is not recorded."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.digests: list[str] = []
        original = worker.start_load

        def spy(ops, unloadable):
            original(ops, unloadable)
            failed = self.worker._load_errors  # noqa: SLF001 (test introspection)
            for op in ops.loads:
                if op.device_block not in failed:
                    self.digests.append(_digest(self.worker, op.device_block))

        worker.start_load = spy

    def check(self, reference: set[str]) -> tuple[int, int]:
        """(onboarded, identical to one of `reference`) since the last check."""
        digests, self.digests = self.digests, []
        return len(digests), sum(d in reference for d in digests)


class Engine:
    """The engine and what every scenario reads from it."""

    def __init__(self, cfg: dict) -> None:
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig

        self.cfg = cfg
        self.llm = LLM(
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
        self.greedy = SamplingParams(
            temperature=0.0, max_tokens=cfg.get("max_tokens", 8), logprobs=3, ignore_eos=True
        )
        self.prompts = [{"prompt_token_ids": p} for p in cfg["prompts"]]
        self.port = cfg.get("metrics_port", 0)
        self.worker = _worker_device()
        self.spy = LoadSpy(self.worker)
        self.reference = set(cfg.get("reference_digests", ()))

    def generate(self, prompts, params=None) -> list[dict]:
        return _outputs(self.llm.generate(prompts, params or self.greedy))

    def settle(self) -> None:
        """Let the worker's report (sent with the next step) and disk writes land."""
        from vllm import SamplingParams

        self.llm.generate([{"prompt_token_ids": [7, 8, 9]}], SamplingParams(max_tokens=1))
        time.sleep(0.5)

    def onboarded(self, result: dict, name: str) -> None:
        result[f"{name}_loaded"], result[f"{name}_identical"] = self.spy.check(self.reference)

    def fresh_device(self) -> None:
        """An empty device cache between scenarios, as a new engine has; the tiers keep theirs."""
        self.llm.reset_prefix_cache()
        _zero_device(self.worker)
        self.spy.check(self.reference)


def tiers(e: Engine) -> dict:
    llm, greedy, prompts, port = e.llm, e.greedy, e.prompts, e.port
    result: dict = {"cold": e.generate(prompts)}
    result["computed_digests"] = _computed_digests(e.worker)
    e.reference = set(result["computed_digests"])
    result["device_hit"] = e.generate(prompts)
    e.settle()
    result["metrics_before"] = _metrics(port)
    llm.reset_prefix_cache()
    _zero_device(e.worker)  # what the requests find on the device can only come from KVBM
    e.spy.check(e.reference)
    result["kvbm_hit"] = e.generate(prompts)
    e.onboarded(result, "kvbm_hit")
    e.settle()
    result["metrics_after"] = _metrics(port)
    llm.reset_prefix_cache()
    _zero_device(e.worker)
    result["kvbm_hit_again"] = e.generate(prompts)
    e.onboarded(result, "kvbm_hit_again")
    # tenants: the same prompt under two salts never shares blocks
    salted = e.cfg["prompts"][0][:]
    llm.reset_prefix_cache()
    before = _metrics(port)
    llm.generate([{"prompt_token_ids": salted, "cache_salt": "tenant-a"}], greedy)
    e.settle()
    llm.reset_prefix_cache()
    llm.generate([{"prompt_token_ids": salted, "cache_salt": "tenant-b"}], greedy)
    e.settle()
    mid = _metrics(port)
    llm.reset_prefix_cache()
    llm.generate([{"prompt_token_ids": salted, "cache_salt": "tenant-a"}], greedy)
    e.settle()
    result["salt"] = {"before": before, "after_b": mid, "after_a_again": _metrics(port)}
    if e.cfg.get("slow_disk_ms"):
        result["slow_disk"] = _slow_disk_phases(
            llm, e.worker, greedy, prompts, port, e.cfg["slow_disk_ms"]
        )
    return result


def produce(e: Engine) -> dict:
    """The prefill half of disaggregated serving."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=1,
        extra_args={"kv_transfer_params": {"dynkv": {"produce": True}}},
    )
    outs = e.llm.generate(e.prompts, params)
    result = {"params": [o.kv_transfer_params for o in outs]}
    result["computed_digests"] = _computed_digests(e.worker)
    e.settle()
    result["metrics"] = _metrics(e.port)
    return result


def consume(e: Engine) -> dict:
    """The decode half: the prefix from the handoff, then the reference."""
    handed = []
    per_prompt = []
    for params in e.cfg["params"]:
        sp = e.greedy.clone()
        sp.extra_args = {"kv_transfer_params": params}
        per_prompt.append(sp)
    if e.cfg.get("batched"):  # every handoff in one batch, as the reference's batch
        handed = e.llm.generate(e.prompts, per_prompt)
    else:
        for prompt, sp in zip(e.prompts, per_prompt, strict=True):
            handed.append(e.llm.generate([prompt], sp)[0])
    result: dict = {"handoff": _outputs(handed)}
    e.onboarded(result, "handoff")
    e.settle()
    result["metrics"] = _metrics(e.port)
    e.llm.reset_prefix_cache()
    salt = e.cfg.get("reference_salt")  # keys no tier of this engine holds: recomputed
    prompts = [{**p, "cache_salt": salt} for p in e.prompts] if salt else e.prompts
    result["reference"] = e.generate(prompts)
    return result


def restart(e: Engine) -> dict:
    result: dict = {"run": e.generate(e.prompts)}
    e.onboarded(result, "run")
    e.settle()
    result["metrics"] = _metrics(e.port)
    return result


def model(e: Engine) -> dict:
    """The model itself through vLLM's text paths: its architecture, a text prompt tokenized by
    vLLM and decoded greedily twice (the second from the prefix cache), and a chat (template)."""
    from vllm import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    runs = [e.llm.generate([e.cfg["text_prompt"]], greedy)[0] for _ in range(2)]
    chat = e.llm.chat([{"role": "user", "content": "Hello there"}], greedy)[0]
    return {
        "architectures": e.llm.llm_engine.model_config.hf_config.architectures,
        "prompt_ids": list(runs[0].prompt_token_ids),
        "runs": [list(r.outputs[0].token_ids) for r in runs],
        "chat_prompt_ids": list(chat.prompt_token_ids),
        "chat_ids": list(chat.outputs[0].token_ids),
    }


SCENARIOS = {
    "tiers": tiers,
    "produce": produce,
    "consume": consume,
    "restart": restart,
    "model": model,
}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    engine = Engine(cfg)
    if isinstance(cfg["scenario"], str):
        result = SCENARIOS[cfg["scenario"]](engine)
    else:  # several on one engine (fewer starts), each from an empty device cache
        result = {}
        for i, step in enumerate(cfg["scenario"]):
            name, own = (step, {}) if isinstance(step, str) else (step["scenario"], step)
            if i:
                engine.fresh_device()
            engine.cfg = cfg | own
            engine.reference = set(engine.cfg.get("reference_digests", ()))
            result[name] = SCENARIOS[name](engine)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS", "0.5")
    # the engine in this process: the driver reads the device KV tensors the connector sees
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    main()
