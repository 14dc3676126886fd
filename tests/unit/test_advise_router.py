"""`router_spreads_prefixes`, `dynkv advise`'s fleet-wide finding: the router's index counts the
blocks each worker acquired and those another worker held already (from KV events only), the
frontend exposes the counts, and the rule judges a window of them (triggered, and not triggered on
the window that differs only in what the finding is about)."""

from __future__ import annotations

from dynkv import router_metrics
from dynkv.advise.findings import advise
from dynkv.advise.model import FindingKind, MetricsSnapshot, RouterCounts, WorkerMetrics
from dynkv.advise.router_rule import router_check, router_spreads_prefixes
from dynkv.frontend.metrics import FrontendMetrics
from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.events import EventBatch, KvTier, SnapshotChunk, Stored
from dynkv.router.index import KvIndex
from dynkv.router.sync import IndexSync

G1, G2 = KvTier.DEVICE, KvTier.HOST
PREFIX = list(range(100, 112))  # a 12-block prefix


def stored(tier: KvTier, keys: list[int]) -> Stored:
    return Stored(tier=tier, keys=keys)


# ---- the index's counts -----------------------------------------------------------------------
def test_a_block_acquired_while_another_worker_holds_it_is_a_duplicate_of_the_acquirer():
    index = KvIndex()
    index.apply("agg-0", stored(G1, PREFIX))
    assert index.acquired == {"agg-0": 12} and not index.duplicated  # the first copy
    index.apply("agg-1", stored(G1, PREFIX[:8] + [900, 901]))  # 8 held by agg-0, 2 new
    assert index.acquired == {"agg-0": 12, "agg-1": 10}
    assert index.duplicated == {"agg-1": 8}


def test_write_through_announces_g2_first_and_the_block_counts_once():
    """A computed block reaches G2 in the step that computed it, and the leader's event can
    reach the router before the G1 bridge's: the first copy on a worker counts, in any tier."""
    index = KvIndex()
    index.apply("agg-0", stored(G2, PREFIX))
    index.apply("agg-0", stored(G1, PREFIX))
    index.apply("agg-1", stored(G2, PREFIX))
    index.apply("agg-1", stored(G1, PREFIX))
    assert index.acquired == {"agg-0": 12, "agg-1": 12}
    assert index.duplicated == {"agg-1": 12}


def test_a_block_loaded_from_the_workers_own_lower_tier_is_not_acquired_again():
    index = KvIndex()
    index.apply("agg-0", stored(G1, PREFIX))
    index.apply("agg-1", stored(G2, PREFIX))  # agg-1 computed it once, G1 has dropped it since
    index.apply("agg-1", stored(G1, PREFIX))  # onboarded from its own G2
    assert index.acquired == {"agg-0": 12, "agg-1": 12} and index.duplicated == {"agg-1": 12}
    index.removed("agg-1", G1, PREFIX)
    index.removed("agg-1", G2, PREFIX)  # gone from agg-1 entirely: computing it again counts
    index.apply("agg-1", stored(G1, PREFIX[:3]))
    assert index.acquired["agg-1"] == 15 and index.duplicated == {"agg-1": 15}


def test_snapshots_restate_blocks_and_are_not_counted():
    sync = IndexSync(KvIndex())
    batch = EventBatch(
        worker_id="agg-0",
        instance_id="a",
        seq=1,
        ts=0.0,
        block_size=32,
        events=[stored(G1, PREFIX)],
    )
    sync.on_batch(batch)
    chunk = SnapshotChunk(
        worker_id="agg-1",
        instance_id="b",
        seq=5,
        block_size=32,
        part=0,
        parts=1,
        tier=G1,
        keys=PREFIX,
    )
    sync.on_snapshot([chunk])  # agg-1 held it before the router started
    assert sync.index.acquired == {"agg-0": 12} and not sync.index.duplicated
    assert set(sync.index.tiers_of(PREFIX[0])) == {"agg-0", "agg-1"}


def test_the_frontend_exposes_the_counts_and_the_readers_parse_them():
    index = KvIndex()
    index.apply("agg-0", stored(G1, PREFIX))
    index.apply("agg-1", stored(G1, PREFIX))
    metrics = FrontendMetrics()
    metrics.index.stats = lambda: {
        "acquired_blocks": dict(index.acquired),
        "duplicated_blocks": dict(index.duplicated),
    }
    reading = router_metrics.parse(metrics.exposition().decode())
    assert reading.acquired == {("agg-0",): 12.0, ("agg-1",): 12.0}
    assert reading.duplicated == {("agg-1",): 12.0}
    index.apply("agg-0", stored(G1, [5, 6]))
    later = router_metrics.parse(metrics.exposition().decode())
    window = router_metrics.difference(reading, later)
    assert window.acquired == {("agg-0",): 2.0, ("agg-1",): 0.0}


# ---- the rule -------------------------------------------------------------------------------------
def counts(rr: float, kv: float, stored: float, again: float) -> RouterCounts:
    decisions = {"round_robin/turn": rr, "kv/kv": kv, "kv/kv_replica": 0.0}
    half = stored / 2
    return RouterCounts(
        decisions=decisions,
        acquired={"agg-0": half, "agg-1": stored - half},
        duplicated={"agg-0": 0.0, "agg-1": again},
    )


BEFORE = counts(rr=10, kv=0, stored=100, again=5)


def test_round_robin_recomputing_held_prefixes_is_found_with_its_evidence_and_the_change():
    f = router_spreads_prefixes(BEFORE, counts(rr=110, kv=0, stored=1100, again=405))
    assert f is not None and f.kind is FindingKind.ROUTER_SPREADS_PREFIXES and f.worker is None
    assert f.evidence["computed_while_held_elsewhere"] == 400
    assert f.evidence["computed_blocks"] == 1000 and f.evidence["share"] == 0.4
    assert f.evidence["computed_while_held_elsewhere[agg-1]"] == 400
    assert f.evidence["decisions_by_policy"] == "kv 0, round_robin 100"
    (change,) = f.change
    assert change.describe() == "DYNKV_ROUTER=kv | [deployment] router = kv | dynkv up --router kv"
    assert "40.0%" in f.summary


def test_not_found_when_the_recomputes_are_few_or_a_small_share():
    assert router_spreads_prefixes(BEFORE, counts(rr=110, kv=0, stored=1100, again=12)) is None
    assert router_spreads_prefixes(BEFORE, counts(rr=110, kv=0, stored=105, again=10)) is None


def test_not_found_when_the_kv_router_routed_the_window():
    """kv makes a second copy only where it priced one: its replicas are a decision, not blindness."""
    assert router_spreads_prefixes(BEFORE, counts(rr=20, kv=90, stored=1100, again=405)) is None
    assert router_spreads_prefixes(BEFORE, counts(rr=70, kv=40, stored=1100, again=405))


def test_with_a_middle_read_the_duplicates_must_recur_in_both_halves():
    """A new hot prefix copied once to each worker lands in one half; moving conversations do not
    stop duplicating."""
    after = counts(rr=110, kv=0, stored=1100, again=405)
    habit = counts(rr=60, kv=0, stored=600, again=205)  # 200 of the 400 in each half
    f = router_spreads_prefixes(BEFORE, after, habit)
    assert f is not None
    assert f.evidence["first_half_share"] == 0.4 and f.evidence["second_half_share"] == 0.4
    once = counts(rr=60, kv=0, stored=600, again=405)  # every duplicate in the first half
    assert router_spreads_prefixes(BEFORE, after, once) is None
    unreadable = RouterCounts(error="refused")  # no middle read: judged on the whole window
    assert router_spreads_prefixes(BEFORE, after, unreadable) is not None


def test_a_restarted_frontend_counts_from_zero():
    f = router_spreads_prefixes(
        counts(500, 0, 9000, 3000), counts(rr=100, kv=0, stored=1000, again=400)
    )
    assert f is not None and f.evidence["computed_while_held_elsewhere"] == 400


def test_what_cannot_be_judged_is_pending_and_one_worker_is_not_judged():
    after = counts(rr=110, kv=0, stored=1100, again=405)
    agg2 = ["agg", "agg"]
    assert router_check(BEFORE, after, ["agg"]) == (None, [])
    assert "no running frontend" in router_check(None, None, agg2)[1][0]
    broken = RouterCounts(error="http://127.0.0.1:8000/metrics could not be read")
    assert "could not be read" in router_check(None, broken, agg2)[1][0]
    assert "no block events" in router_check(None, RouterCounts(), agg2)[1][0]
    # disagg: a decode worker acquires what its prefill worker computed, by design
    finding, pending = router_check(BEFORE, after, ["prefill", "decode"])
    assert finding is None and "agg workers only" in pending[0]
    finding, pending = router_check(BEFORE, after, agg2)
    assert finding is not None and pending == []


def test_the_report_carries_the_fleet_finding_beside_the_workers():
    def snap(at: float, router: RouterCounts) -> MetricsSnapshot:
        workers = [WorkerMetrics(worker=w, values={}) for w in ("worker-0", "worker-1")]
        return MetricsSnapshot(at=at, workers=workers, router=router)

    settings = KvbmSettings.model_validate({"cpu_cache_gb": 4})
    after = counts(rr=110, kv=0, stored=1100, again=405)
    advice = advise("dev", snap(0, BEFORE), snap(30, after), settings)
    assert [f.kind for f in advice.findings] == [FindingKind.ROUTER_SPREADS_PREFIXES]
    assert advice.pending == []
    assert advise("dev", snap(0, BEFORE), snap(30, BEFORE), settings).findings == []
