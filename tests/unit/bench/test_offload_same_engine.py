"""W1 in one engine (`g2_same`, `g3_same`): the engine's procedure, played against a stand-in for
`vllm.LLM` that records what it was asked, and the summary's ratios and targets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dynkv.bench import offload
from dynkv.bench.kvbm_report import OffloadReport
from dynkv.bench.offload_engine import same_engine


class FakeLLM:
    def __init__(self, reset_ok: bool = True) -> None:
        self.calls: list[tuple] = []
        self.reset_ok = reset_ok

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset",))
        return self.reset_ok

    def timed(self, doc, offload=True, salt=None) -> float:
        """The engine's `timed`: records the send; document d takes 10(d+1) ms, +1 kept out."""
        self.calls.append((doc[0], offload, salt))
        return 10.0 * (doc[0] + 1) + (0 if offload else 1)


def test_every_document_is_timed_cold_both_ways_and_the_passes_reset_between_floor_and_tier():
    llm = FakeLLM()
    docs = [[i] for i in range(3)]

    out = same_engine(llm, docs, [99], passes=2, timed=llm.timed, settle_s=0)
    assert llm.calls[0] == (99, False, None)  # the full-length warm-up stays out of the tiers
    # blocks offloaded, kept out, kept out, offloaded; a salt of its own each
    assert llm.calls[1:13] == [
        (d, on, f"cold-{b}") for b, on in enumerate((True, False, False, True)) for d in range(3)
    ]
    every = [(0, True, None), (1, True, None), (2, True, None)]
    assert llm.calls[13:] == [("reset",)] + every + (every + [("reset",)] + every) * 2
    se = out["same_engine"]
    assert se["cold_offloaded_ms"] == [10.0, 20.0, 30.0] * 2  # by document, blocks 1 and 4
    assert se["cold_private_ms"] == [11.0, 21.0, 31.0] * 2  # blocks 2 and 3
    assert len(se["floor_ms"]) == len(se["tier_ms"]) == 6
    assert out["rounds"][1] == se["tier_ms"]


def test_cold_pairs_send_each_documents_four_cold_requests_back_to_back():
    llm = FakeLLM()
    docs = [[i] for i in range(3)]

    out = same_engine(llm, docs, [99], passes=1, timed=llm.timed, settle_s=0, cold_pairs=True)
    order = (True, False, False, True)
    assert llm.calls[1:13] == [(d, on, f"cold-{k}") for d in range(3) for k, on in enumerate(order)]
    se = out["same_engine"]  # the same pairing by index as the blocks give
    assert se["cold_offloaded_ms"] == [10.0, 20.0, 30.0] * 2
    assert se["cold_private_ms"] == [11.0, 21.0, 31.0] * 2


def test_a_prefix_cache_that_does_not_reset_fails_the_run():
    with pytest.raises(RuntimeError, match="reset"):
        same_engine(
            FakeLLM(reset_ok=False), [[1]], [2], passes=1, timed=lambda *a, **k: 1.0, settle_s=0
        )


def run_of(floor, tier, offloaded, private):
    return {
        "round1_ms": [1.0],
        "round2_ms": [1.0],
        "round1_median_ms": 1.0,
        "round2_median_ms": 1.0,
        "same_engine": {
            "floor_ms": floor,
            "tier_ms": tier,
            "cold_offloaded_ms": offloaded,
            "cold_private_ms": private,
        },
    }


def test_the_summary_gives_each_tier_its_own_floor_and_targets():
    out = offload.summarize(
        {
            "g2_same": run_of([60, 62, 100], [65, 66, 104], [3100, 3000], [3000, 2990]),
            "g3_same": run_of([60, 61], [90, 91], [3300], [3000]),
        }
    )
    g2, g3 = out["same_engine"]["g2"], out["same_engine"]["g3"]
    assert (g2["floor_ms"], g2["tier_ms"]) == (62, 66)
    assert g2["tier_vs_floor"] == round(66 / 62, 3)  # the median of the paired ratios
    assert g2["cold_overhead"] == round((3100 / 3000 + 3000 / 2990) / 2, 3)
    assert g3["tier_vs_floor"] == round((90 / 60 + 91 / 61) / 2, 3)
    t = out["targets"]
    assert t["g2_le_1.1x_floor_same_engine"] is True
    assert t["g3_le_1.3x_floor_same_engine"] is False
    assert t["cold_overhead_le_1.03_same_engine"] is True  # G2's engine's, not G3's (1.1)
    report = OffloadReport.model_validate(out)
    assert report.same_engine["g3"].cold_overhead == 1.1
    assert report.model_dump(mode="json")["same_engine"]["g2"]["tier_ms"] == 66
    assert "same_engine" not in offload.summarize({"g2": run_of([1], [1], [1], [1])})


def test_a_drift_within_the_engine_cancels_in_the_paired_ratio():
    # the engine slows down over the run; each document's tier pass is 10% over its floor pass
    floor = [50.0, 50.0, 80.0, 80.0, 80.0]
    tier = [x * 1.1 for x in floor]
    out = offload.summarize({"g2_same": run_of(floor, tier, [1.0], [1.0])})
    assert out["same_engine"]["g2"]["tier_vs_floor"] == 1.1


def test_same_engine_configurations_hold_every_document_and_reach_the_engine(monkeypatch, tmp_path):
    configs = {c.name: c for c in offload.configurations(1 << 20, 1 << 30, 1.0, tmp_path)}
    for name in ("g2_same", "g3_same"):
        assert configs[name].same_engine and configs[name].device_kv_bytes == 1 << 30
        assert not configs[name].opt_in
    assert not configs["g2"].same_engine
    # G2 leaves no work behind a request, so its cold sends pair up per document; G3's disk
    # writes finish after the answer, so its kinds stay in blocks
    assert configs["g2_same"].cold_pairs and not configs["g3_same"].cold_pairs
    seen: dict[str, dict] = {}

    def fake_engine(argv, **kw):  # stands in for the vLLM engine child (no engine here)
        cfg = json.loads(Path(argv[-1]).read_text())
        name = Path(cfg["result_file"]).stem
        seen[name] = cfg
        result = {"rounds": [[1.0], [1.0]]}
        if cfg["same_engine"]:
            result["same_engine"] = run_of([50.0], [55.0], [1.0], [1.0])["same_engine"]
        Path(cfg["result_file"]).write_text(json.dumps(result))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(offload.subprocess, "run", fake_engine)
    report = offload.run(
        model="m", docs=2, doc_tokens=64, directory=str(tmp_path), only=["g2", "g2_same"]
    )
    assert seen["g2_same"]["same_engine"] and not seen["g2"]["same_engine"]
    assert seen["g2_same"]["cold_pairs"] is True
    assert len(seen["g2_same"]["warmup_full"]) == 64
    assert report.same_engine["g2"].tier_vs_floor == 1.1
    assert report.configs["g2_same"].same_engine.tier_ms == [55.0]
