"""The `dynkv advise` findings engine on staged metric histories: each finding triggered, and not
triggered on the history that differs only in what the finding is about."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from dynkv import metrics_text
from dynkv.advise.findings import advise, findings
from dynkv.advise.model import Advice, FindingKind, MetricsSnapshot, WorkerMetrics
from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.counters import Count

G2G3 = KvbmSettings.model_validate({"cpu_cache_gb": 4, "disk_cache_gb": 8})
G2G3_NOFILTER = KvbmSettings.model_validate(
    {"cpu_cache_gb": 4, "disk_cache_gb": 8, "disable_disk_offload_filter": True}
)
G2 = KvbmSettings.model_validate({"cpu_cache_gb": 4})


def snap(at: float, *, host=1000.0, disk=2000.0, skipped=None, **counts: float):
    values = {metrics_text.TIER_SIZES["host"]: host, metrics_text.TIER_SIZES["disk"]: disk}
    values.update({Count[k].metric: v for k, v in counts.items() if k in Count.__members__})
    values.update({k: v for k, v in counts.items() if k not in Count.__members__})
    w = WorkerMetrics(worker="worker", values=values, skipped=skipped or {})
    return MetricsSnapshot(at=at, workers=[w])


def history(before: dict, after: dict, **kw):
    return snap(0.0, **kw, **before), snap(30.0, **kw, **after)


def kinds(before, after, settings=G2G3):
    return [f.kind for f in findings(before, after, settings)]


# a healthy window: lots of reuse from G2, nothing evicted before reuse
BASE = dict(LOOKUP_BLOCKS=100, HOST_HIT_BLOCKS=50, DISK_HIT_BLOCKS=10, OFFLOAD_D2H=100)
HEALTHY = dict(LOOKUP_BLOCKS=1100, HOST_HIT_BLOCKS=750, DISK_HIT_BLOCKS=110, OFFLOAD_D2H=400)


def test_a_healthy_window_has_no_findings():
    assert kinds(*history(BASE, HEALTHY)) == []


def test_g2_thrash_triggered_with_its_evidence_and_the_g2_size_to_set():
    before, after = history(
        {**BASE, "HOST_EVICTED": 0, "REUSE_AFTER_EVICT_RECOMPUTED": 0},
        {**HEALTHY, "HOST_EVICTED": 3000, "HOST_EVICTED_UNUSED": 2500,
         "REUSE_AFTER_EVICT_RECOMPUTED": 200, "REUSE_AFTER_EVICT_DISK": 100},
    )  # fmt: skip
    (f,) = [f for f in findings(before, after, G2) if f.kind is FindingKind.G2_THRASH]
    assert f.evidence["reuse_after_eviction_recomputed"] == 200
    assert f.evidence["reuse_after_eviction_served_by_g3"] == 100
    assert f.evidence["g2_evicted_blocks"] == 3000 and f.evidence["g2_blocks"] == 1000
    (change,) = f.change
    assert (change.env, change.value) == ("DYN_KVBM_CPU_CACHE_GB", "8")
    assert change.profile_key == "[kvbm] cpu_cache_gb" and "--cpu-cache-gb 8" in change.flag


def test_g2_thrash_not_triggered_by_evictions_nobody_wanted_back():
    before, after = history(
        BASE, {**HEALTHY, "HOST_EVICTED": 3000, "HOST_EVICTED_UNUSED": 3000,
               "REUSE_AFTER_EVICT_RECOMPUTED": 3}
    )  # fmt: skip
    assert FindingKind.G2_THRASH not in kinds(before, after)


def test_g2_thrash_names_the_block_override_when_that_sized_g2():
    settings = KvbmSettings.model_validate({"cpu_cache_override_num_blocks": 1000})
    before, after = history(
        BASE, {**HEALTHY, "HOST_EVICTED": 900, "REUSE_AFTER_EVICT_RECOMPUTED": 300}
    )
    (f,) = findings(before, after, settings)
    assert f.change[0].env == "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"
    assert f.change[0].value == "2000"


STARVED = {
    **HEALTHY,
    "DISK_HIT_BLOCKS": 12,
    "HOST_EVICTED": 2000,
    "REUSE_AFTER_EVICT_RECOMPUTED": 300,
    "FILTER_STARVED": 280,
}


def test_filter_starves_g3_triggered_and_says_turn_the_filter_off():
    before, after = history(BASE, STARVED)
    found = {f.kind: f for f in findings(before, after, G2G3)}
    f = found[FindingKind.FILTER_STARVES_G3]
    assert f.evidence["filter_starved_blocks"] == 280 and f.evidence["g3_hit_blocks"] == 2
    assert f.change[0].env == "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER"
    assert f.change[0].value == "true"
    assert FindingKind.G2_THRASH in found  # the same reuse also says G2 is too small


def test_filter_starves_g3_not_triggered_when_the_filter_is_off_or_nothing_starved():
    before, after = history(BASE, STARVED)
    assert FindingKind.FILTER_STARVES_G3 not in kinds(before, after, G2G3_NOFILTER)
    before, after = history(BASE, {**STARVED, "FILTER_STARVED": 3})
    assert FindingKind.FILTER_STARVES_G3 not in kinds(before, after, G2G3)
    # a runtime that predates the counter: not measured, not a finding
    before, after = history(BASE, {k: v for k, v in STARVED.items() if k != "FILTER_STARVED"})
    assert FindingKind.FILTER_STARVES_G3 not in kinds(before, after, G2G3)


def test_lower_tier_smaller_triggered_by_the_sizes_alone():
    before, after = history(BASE, {**HEALTHY, "DISK_EVICTED": 500}, host=1000, disk=400)
    (f,) = findings(before, after, G2G3)
    assert f.kind is FindingKind.LOWER_TIER_SMALLER
    assert f.evidence == {
        "g2_blocks": 1000,
        "g3_blocks": 400,
        "g3_evicted_blocks": 500,
        "written_to_g3": None,  # not exposed in this history: not measured
        "g3_hit_blocks": 100,
    }
    assert (f.change[0].env, f.change[0].value) == ("DYN_KVBM_DISK_CACHE_GB", "8")


def test_lower_tier_smaller_not_triggered_when_g3_is_larger_or_absent():
    assert kinds(*history(BASE, HEALTHY, host=1000, disk=1000)) == []
    assert kinds(*history(BASE, HEALTHY, host=1000, disk=0), settings=G2) == []


SLOW = "disk/slower_than_recompute"


def test_g3_slower_than_recompute_from_skipped_blocks():
    before = snap(0, **BASE, skipped={SLOW: 10})
    after = snap(30, **HEALTHY, skipped={SLOW: 90, "disk/busy": 400, "host/busy": 3})
    (f,) = findings(before, after, G2G3)
    assert f.kind is FindingKind.G3_SLOWER_THAN_RECOMPUTE
    assert f.evidence["g3_skipped_slower_than_recompute"] == 80
    assert f.change[0].flag == "dynkv up --profile gpu-cpu"


def test_g3_slower_than_recompute_from_read_timeouts():
    before, after = history({**BASE, "DISK_READ_TIMEOUTS": 0}, {**HEALTHY, "DISK_READ_TIMEOUTS": 4})
    assert kinds(before, after) == [FindingKind.G3_SLOWER_THAN_RECOMPUTE]


def test_g3_slower_not_triggered_by_other_reasons_or_an_absent_counter():
    before = snap(0, **BASE, skipped={SLOW: 10})
    after = snap(30, **HEALTHY, skipped={SLOW: 12, "disk/busy": 400})
    assert kinds(before, after) == []
    assert kinds(*history(BASE, HEALTHY)) == []  # no skipped counter at all: not measured


def test_no_reuse_triggered_and_says_run_without_kvbm():
    before, after = history(
        BASE, {**BASE, "LOOKUP_BLOCKS": 1100, "OFFLOAD_D2H": 1100, "HOST_HIT_BLOCKS": 52}
    )
    (f,) = findings(before, after, G2G3)
    assert f.kind is FindingKind.NO_REUSE
    assert f.evidence["lookup_blocks"] == 1000 and f.evidence["hit_blocks"] == 2
    assert f.change[0].flag == "dynkv up --no-kvbm"


def test_no_reuse_not_triggered_on_little_traffic_or_late_reuse():
    quiet = {**BASE, "LOOKUP_BLOCKS": 130, "OFFLOAD_D2H": 130}
    advice = advise("dev", *history(BASE, quiet), G2G3)
    assert advice.findings == [] and "too little traffic" in advice.notes[0]
    late = {**BASE, "LOOKUP_BLOCKS": 1100, "REUSE_AFTER_EVICT_RECOMPUTED": 40}
    assert FindingKind.NO_REUSE not in kinds(*history(BASE, late))


def test_a_restarted_worker_counts_from_zero():
    before, after = history(
        {**HEALTHY, "LOOKUP_BLOCKS": 5000}, {**BASE, "LOOKUP_BLOCKS": 1000, "HOST_HIT_BLOCKS": 0}
    )
    assert kinds(before, after) == [FindingKind.NO_REUSE]  # 1000 asked since the restart


def test_the_report_is_typed_and_counts_savings_per_worker():
    before = snap(0, **BASE, kvbm_prefill_seconds_saved=1.5)
    after = snap(30, **HEALTHY, kvbm_prefill_seconds_saved=4.0)
    advice = advise("dev", before, after, G2G3)
    again = Advice.model_validate_json(advice.model_dump_json())
    assert again == advice and advice.window_s == 30
    (w,) = advice.workers
    assert w.prefill_seconds_saved == 2.5 and w.lookup_blocks == 1000 and w.new_blocks == 300
    assert advice.pending == []  # one worker: nothing for a router to spread
    unmeasured = advise("dev", *history(BASE, HEALTHY), G2G3).workers[0]
    assert unmeasured.prefill_seconds_saved is None


def test_router_check_is_pending_with_several_workers_and_unreadable_workers_are_shown():
    before, after = history(BASE, HEALTHY)
    after.workers.append(WorkerMetrics(worker="decode", error="refused"))
    after.workers.append(after.workers[0].model_copy(update={"worker": "w2"}))
    advice = advise("dev", before, after, G2G3)
    assert "router_spreads_prefixes" in advice.pending[0]
    assert [w.error for w in advice.workers] == [None, "refused", None]


def test_labelled_counter_parse_keeps_the_label_sets_apart():
    reg = CollectorRegistry()
    c = Counter(metrics_text.SKIPPED, "", ["tier", "reason"], registry=reg)
    c.labels("disk", "slower_than_recompute").inc(3)
    c.labels("disk", "busy").inc(2)
    text = generate_latest(reg).decode()
    assert metrics_text.labelled(text, metrics_text.SKIPPED) == {
        (("reason", "slower_than_recompute"), ("tier", "disk")): 3.0,
        (("reason", "busy"), ("tier", "disk")): 2.0,
    }
    assert metrics_text.parse(text)[metrics_text.SKIPPED] == 5.0
    assert metrics_text.labelled("", metrics_text.SKIPPED) == {}


@pytest.mark.parametrize("module", ["findings.py", "model.py", "router_rule.py"])
def test_the_engine_is_pure(module):
    path = Path(__file__).resolve().parents[2] / "dynkv" / "advise" / module
    tree = ast.parse(path.read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    impure = {"httpx", "psutil", "time", "subprocess", "dynkv.supervisor", "dynkv.advise.collect"}
    assert imported & impure == set()
