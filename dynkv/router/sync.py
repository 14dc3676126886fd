"""Keeping the index consistent with each worker's event stream (docs/kv-events.md).

Per worker: the instance id and the last batch number applied. A batch is applied when it is the
next one; an older one is ignored (a duplicate). A gap (lost batches), a new instance id that does
not start at batch 1 (a restart the router joined late), or a rates message announcing a batch
the router never saw, drops the worker's entries and asks for a snapshot; batches arriving
meanwhile are kept and those after the snapshot's number are applied on top of it. Pure logic:
the caller (`dynkv.router.subscriber`) fetches the snapshots; the return value says when.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynkv.kvbm.events import EventBatch, SnapshotChunk, WorkerRates
from dynkv.router.index import KvIndex

MAX_BUFFERED = 4096  # batches kept per worker while its snapshot is on its way


@dataclass
class _Worker:
    worker_id: str
    instance_id: str
    applied: int = 0  # the last batch number applied
    syncing: bool = False  # entries dropped, a snapshot is wanted
    empty: bool = True  # it has no entries in the index (dropping them needs no scan)
    buffered: list[EventBatch] = field(default_factory=list)


@dataclass
class SyncCounters:
    applied_batches: int = 0
    ignored_batches: int = 0
    gaps: int = 0
    new_instances: int = 0
    snapshots_applied: int = 0


class IndexSync:
    def __init__(self, index: KvIndex) -> None:
        self.index = index
        self.rates: dict[str, WorkerRates] = {}
        self.counters = SyncCounters()
        self._workers: dict[str, _Worker] = {}

    # ---- queries ---------------------------------------------------------------------------------
    def needs_snapshot(self, worker: str) -> bool:
        w = self._workers.get(worker)
        return w is not None and w.syncing

    def synced(self, worker: str) -> bool:
        w = self._workers.get(worker)
        return w is not None and not w.syncing

    def applied(self, worker: str) -> int:
        w = self._workers.get(worker)
        return w.applied if w is not None else 0

    # ---- messages --------------------------------------------------------------------------------
    def on_batch(self, batch: EventBatch) -> bool:
        """Apply or keep `batch`; True when the worker's snapshot must be requested now."""
        wid = batch.worker_id
        w = self._workers.get(wid)
        if w is None or w.instance_id != batch.instance_id:
            w = self._restart(wid, batch.instance_id)
            if batch.seq == 1:  # the whole history of this instance is ahead: no snapshot
                self._apply(w, batch)
                return False
            return self._resync(w, batch)
        if w.syncing:
            self._buffer(w, batch)
            return False
        if batch.seq <= w.applied:
            self.counters.ignored_batches += 1
            return False
        if batch.seq == w.applied + 1:
            self._apply(w, batch)
            return False
        self.counters.gaps += 1
        return self._resync(w, batch)

    def on_rates(self, rates: WorkerRates) -> bool:
        """Keep the worker's rates; True when they reveal lost batches (snapshot needed)."""
        wid = rates.worker_id
        self.rates[wid] = rates
        w = self._workers.get(wid)
        if w is None or w.instance_id != rates.instance_id:
            w = self._restart(wid, rates.instance_id)
            return self._resync(w, None) if rates.seq > 0 else False
        if w.syncing or rates.seq <= w.applied:
            return False
        self.counters.gaps += 1
        return self._resync(w, None)

    def on_snapshot(self, chunks: list[SnapshotChunk]) -> bool:
        """Replace the worker's entries with a complete snapshot and apply the batches kept
        since; True when those batches have a gap again (another snapshot is needed)."""
        if not chunks:
            return False
        first = chunks[0]
        wid = first.worker_id
        w = self._workers.get(wid)
        if w is None:
            w = self._workers[wid] = _Worker(wid, first.instance_id)
        self._clear(w)
        self.index.add_worker(wid)
        w.empty = False
        for chunk in chunks:
            if chunk.tier is not None:
                self.index.stored(wid, chunk.tier, chunk.keys)
        w.instance_id, w.applied, w.syncing = first.instance_id, first.seq, False
        self.counters.snapshots_applied += 1
        kept, w.buffered = sorted(w.buffered, key=lambda b: b.seq), []
        for batch in kept:
            if batch.instance_id != w.instance_id or batch.seq <= w.applied:
                continue
            if batch.seq != w.applied + 1:
                self.counters.gaps += 1
                return self._resync(w, batch)
            self._apply(w, batch)
        return False

    def remove_worker(self, worker: str) -> None:
        """The worker left (its etcd registration is gone): forget all of it."""
        self._workers.pop(worker, None)
        self.rates.pop(worker, None)
        self.index.remove_worker(worker)

    # ---- internals -------------------------------------------------------------------------------
    def _restart(self, wid: str, instance_id: str) -> _Worker:
        old = self._workers.get(wid)
        if old is not None:
            self.counters.new_instances += 1
            self._clear(old)
        self.index.add_worker(wid)
        w = self._workers[wid] = _Worker(wid, instance_id)
        return w

    def _resync(self, w: _Worker, batch: EventBatch | None) -> bool:
        self._clear(w)  # stale entries would mislead until the snapshot
        w.syncing = True
        w.buffered = []
        if batch is not None:
            self._buffer(w, batch)
        return True

    def _buffer(self, w: _Worker, batch: EventBatch) -> None:
        if len(w.buffered) >= MAX_BUFFERED:
            # the snapshot is slow: what it reports will be older than the oldest kept batch
            # anyway, so start over from a fresh one
            w.buffered = w.buffered[len(w.buffered) // 2 :]
        w.buffered.append(batch)

    def _clear(self, w: _Worker) -> None:
        """Drop the worker's entries (a scan of the whole index, so only when it has some)."""
        if not w.empty:
            self.index.clear_worker(w.worker_id)
            w.empty = True

    def _apply(self, w: _Worker, batch: EventBatch) -> None:
        w.empty = False
        for event in batch.events:
            self.index.apply(batch.worker_id, event)
        w.applied = batch.seq
        self.counters.applied_batches += 1
