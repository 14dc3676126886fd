"""Event-stream consistency: order, duplicates, gaps, restarts, snapshots, departures."""

from __future__ import annotations

from dynkv.kvbm.events import (
    Cleared,
    EventBatch,
    KvTier,
    Removed,
    SnapshotChunk,
    Stored,
    WorkerRates,
)
from dynkv.router.index import KvIndex, PrefixMatch
from dynkv.router.sync import IndexSync

G2, G3 = KvTier.HOST, KvTier.DISK


def batch(seq: int, *events, instance: str = "i1", worker: str = "w") -> EventBatch:
    return EventBatch(
        worker_id=worker, instance_id=instance, seq=seq, ts=0, block_size=16, events=list(events)
    )


def stored(*keys: int, tier: KvTier = G2) -> Stored:
    return Stored(tier=tier, keys=list(keys))


def snap(seq: int, tiers: dict, instance: str = "i1", worker: str = "w") -> list[SnapshotChunk]:
    parts = [(t, ks) for t, ks in tiers.items()] or [(None, [])]
    return [
        SnapshotChunk(
            worker_id=worker,
            instance_id=instance,
            seq=seq,
            block_size=16,
            part=i,
            parts=len(parts),
            tier=t,
            keys=ks,
        )
        for i, (t, ks) in enumerate(parts)
    ]


def rates(seq: int, instance: str = "i1") -> WorkerRates:
    return WorkerRates(worker_id="w", instance_id=instance, seq=seq, ts=0, block_size=16)


def held(sync: IndexSync, *keys: int) -> int:
    return sync.index.match(list(keys)).get("w", PrefixMatch()).blocks


def test_batches_in_order_are_applied_and_duplicates_ignored():
    s = IndexSync(KvIndex())
    assert s.on_batch(batch(1, Cleared(), stored(1, 2))) is False
    assert s.on_batch(batch(2, Removed(tier=G2, keys=[2]), stored(3, tier=G3))) is False
    assert s.on_batch(batch(2, stored(9))) is False  # a duplicate
    assert held(s, 1, 3) == 2 and held(s, 9) == 0
    assert s.counters.applied_batches == 2 and s.counters.ignored_batches == 1


def test_a_gap_drops_the_workers_entries_and_a_snapshot_restores_them():
    s = IndexSync(KvIndex())
    s.on_batch(batch(1, stored(1, 2)))
    assert s.on_batch(batch(3, stored(5))) is True  # batch 2 was lost
    assert s.needs_snapshot("w") and held(s, 1) == 0 and s.counters.gaps == 1
    assert s.on_batch(batch(4, stored(6))) is False  # kept, no second request
    # the snapshot is as of batch 3; batch 4 applies on top of it
    assert s.on_snapshot(snap(3, {G2: [1, 2, 5], G3: [7]})) is False
    assert s.synced("w") and s.applied("w") == 4
    assert held(s, 1, 2, 5, 6) == 4 and s.index.tiers_of(7) == {"w": G3}


def test_a_snapshot_followed_by_another_gap_asks_again():
    s = IndexSync(KvIndex())
    s.on_batch(batch(1))
    s.on_batch(batch(5, stored(5)))
    s.on_batch(batch(9, stored(9)))
    assert s.on_snapshot(snap(5, {G2: [5]})) is True  # 6..8 are missing too
    assert s.needs_snapshot("w") and held(s, 5) == 0


def test_a_restart_voids_the_old_instance_and_batch_one_needs_no_snapshot():
    s = IndexSync(KvIndex())
    s.on_batch(batch(1, stored(1)))
    s.on_batch(batch(2, stored(2)))
    assert s.on_batch(batch(1, Cleared(), stored(3), instance="i2")) is False
    assert held(s, 1) == 0 and held(s, 3) == 1 and s.counters.new_instances == 1
    # a router joining a running worker late needs its snapshot
    late = IndexSync(KvIndex())
    assert late.on_batch(batch(7, stored(9), instance="i2")) is True


def test_rates_reveal_batches_lost_while_the_worker_is_idle():
    s = IndexSync(KvIndex())
    s.on_batch(batch(1, stored(1)))
    assert s.on_rates(rates(1)) is False
    assert s.on_rates(rates(2)) is True  # batch 2 never arrived
    assert s.on_rates(rates(2)) is False  # already resynchronising
    assert s.on_snapshot(snap(2, {G2: [1, 4]})) is False and held(s, 1, 4) == 2
    fresh = IndexSync(KvIndex())
    assert fresh.on_rates(rates(0, instance="new")) is False  # nothing sent yet: in sync
    assert fresh.on_rates(rates(3, instance="newer")) is True
    assert "w" in fresh.rates


def test_an_empty_snapshot_and_a_departed_worker():
    s = IndexSync(KvIndex())
    s.on_batch(batch(4, stored(1)))
    assert s.on_snapshot(snap(4, {})) is False and held(s, 1) == 0 and s.synced("w")
    s.on_batch(batch(5, stored(2)))
    s.remove_worker("w")
    assert s.index.workers == [] and not s.synced("w") and "w" not in s.rates


def test_a_workers_entries_are_scanned_away_once_per_resync(monkeypatch):
    s = IndexSync(KvIndex())
    s.on_batch(batch(1, stored(1)))
    scans = []
    real = s.index.clear_worker
    monkeypatch.setattr(s.index, "clear_worker", lambda w, t=None: scans.append(w) or real(w, t))
    s.on_batch(batch(3, stored(3)))  # gap: drop (one scan)
    s.on_rates(rates(5))  # already resynchronising: nothing to drop
    s.on_snapshot(snap(5, {G2: [1]}))  # the entries are already gone: no second scan
    assert scans == ["w"]
    s.on_batch(batch(1, stored(2), instance="i2"))  # a restart drops the snapshot's entries
    assert scans == ["w", "w"] and held(s, 1) == 0 and held(s, 2) == 1
