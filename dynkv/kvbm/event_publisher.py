"""The KV event publisher: batches a worker's block changes and sends them over NATS.

It is fed by the KVBM leader (G2/G3) and by the G1 bridge (vLLM's own KV events,
`dynkv.kvbm.g1_bridge`), so that all of a worker's tiers share one stream, one sequence and one
snapshot; a worker without KVBM runs it in its wrapper, fed by the bridge alone.

Runs inside vLLM's EngineCore process, so it must never block or break the engine:
- the engine thread only appends to a list under a lock (and, every `batch_max` events, cuts a
  numbered batch into a bounded queue: when the queue is full the batch is dropped and counted);
- a daemon thread with its own asyncio loop connects to NATS (retrying forever), cuts the pending
  events every `flush_ms`, publishes the queued batches, answers snapshot requests and publishes
  the worker's rates. While NATS is unreachable batches are dropped and counted, never buffered
  without bound; the batch numbers they consumed make the loss visible to the router, which asks
  for a snapshot once NATS is back (docs/kv-events.md).
The publisher keeps its own copy of the key set per tier, so a snapshot never reads the leader's
structures from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable

from dynkv.kvbm.background import Background
from dynkv.kvbm.event_settings import KvEventsSettings, RatesReading, RatesSource
from dynkv.kvbm.events import (
    Cleared,
    EventBatch,
    KvTier,
    Removed,
    SnapshotChunk,
    Stored,
    WorkerRates,
    events_subject,
    reconnecting,
    snapshot_subject,
)
from dynkv.kvbm.ops import Tier

__all__ = ["KvEventPublisher", "KvEventsSettings", "RatesReading", "RatesSource", "start_from_env"]

log = logging.getLogger("dynkv.kvbm")

_TIER = {Tier.HOST: KvTier.HOST, Tier.DISK: KvTier.DISK}
_STORED, _REMOVED, _CLEARED = 0, 1, 2
KEY_WIRE_BYTES = 35  # "<32 hex digits>",


class KvEventPublisher(Background):
    """Feed it with `stored`/`removed` (the leader's `TierSink`), `start()` it, `close()` it
    (which sends what is pending, if NATS is up, and stops)."""

    thread_name = "dynkv-kv-events"

    def __init__(
        self,
        settings: KvEventsSettings,
        *,
        block_size: int,
        fingerprint: str = "",
        rates_source: RatesSource | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings.check()
        self.block_size = block_size
        self.fingerprint = fingerprint
        self.rates_source = rates_source or RatesReading
        self.instance_id = uuid.uuid4().hex
        self.subject = events_subject(settings.deployment, settings.worker_id)
        self._lock = threading.Lock()
        self._pending: list[tuple[int, KvTier | None, int]] = [(_CLEARED, None, 0)]
        # G1's set appears with the first G1 change (a worker without the G1 bridge reports no G1)
        self._held: dict[KvTier, set[int]] = {t: set() for t in _TIER.values()}
        self._seq = 0  # the last batch number handed out
        self._queue: queue.Queue[tuple[int, float, list]] = queue.Queue(settings.queue_max)
        self.connected = threading.Event()
        # counters (read by tests and the rates message)
        self.dropped_batches = 0
        self.published_batches = 0
        self.snapshots_served = 0
        self._handled_seq = 0  # the last batch number published or dropped
        self._lost = False  # a batch was dropped at cut time (queue full)

    # ---- the engine thread (and the G1 bridge's) --------------------------------------------------
    def stored(self, tier: Tier, key: int) -> None:
        t = _TIER.get(tier)
        if t is not None:
            self._record(_STORED, t, (key,))

    def removed(self, tier: Tier, key: int) -> None:
        t = _TIER.get(tier)
        if t is not None:
            self._record(_REMOVED, t, (key,))

    def g1_changed(self, stored: Iterable[int] = (), removed: Iterable[int] = ()) -> None:
        """The device tier's changes, as vLLM's own KV events report them (`dynkv.kvbm.g1_bridge`):
        one stream, one sequence and one snapshot with the worker's G2/G3 changes."""
        self._record(_REMOVED, KvTier.DEVICE, removed)
        self._record(_STORED, KvTier.DEVICE, stored)

    def g1_cleared(self) -> None:
        """Every device block is gone, or the bridge lost track of them (docs/kv-events.md)."""
        with self._lock:
            self._held.setdefault(KvTier.DEVICE, set()).clear()
            self._pending.append((_CLEARED, KvTier.DEVICE, 0))
            if len(self._pending) >= self.settings.batch_max:
                self._cut_locked()

    def _record(self, kind: int, tier: KvTier, keys: Iterable[int]) -> None:
        with self._lock:
            held = self._held.setdefault(tier, set())
            for key in keys:
                if kind == _STORED:
                    held.add(key)
                else:
                    held.discard(key)
                self._pending.append((kind, tier, key))
                if len(self._pending) >= self.settings.batch_max:
                    self._cut_locked()

    def _cut_locked(self) -> None:
        if not self._pending:
            return
        self._seq += 1
        try:
            self._queue.put_nowait((self._seq, time.time(), self._pending))
        except queue.Full:
            self.dropped_batches += 1
            self._lost = True
        self._pending = []

    def flush_pending(self) -> None:
        with self._lock:
            self._cut_locked()

    # ---- the publisher thread ------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import nats  # imported here: an engine without NATS settings never loads it

        s = self.settings
        nc = None
        down_logged = False
        next_rates = 0.0
        resync = False  # batches were lost: announce our seq at once so the router notices
        while not self._stop.is_set():
            if nc is None:
                try:
                    nc = await self._connect(nats)
                    log.info("KVBM: publishing KV events on %s", self.subject)
                    down_logged = False
                except Exception as exc:
                    if not down_logged:
                        log.warning(
                            "KVBM: NATS at %s is unreachable (%s); KV events are dropped and "
                            "counted until it is back",
                            s.nats_url,
                            exc,
                        )
                        down_logged = True
                    nc = None
                    self.flush_pending()
                    resync |= self._drop_queued()
                    await self._sleep(s.reconnect_secs)
                    continue
            if nc.is_closed:  # nats-py gave up (it should not: it retries forever)
                nc = None
                continue
            if nc.is_connected:
                self.connected.set()
            else:
                self.connected.clear()
            self.flush_pending()
            sent, lost = await self._publish_queued(nc)
            with self._lock:
                resync |= lost or self._lost
                self._lost = False
            now = time.monotonic()
            if nc.is_connected and (now >= next_rates or (resync and not lost)):
                with contextlib.suppress(Exception):
                    await nc.publish(self.subject, self._rates().model_dump_json().encode())
                    resync = False
                next_rates = now + s.rates_interval_secs
            await self._sleep(s.flush_ms / 1000)
        if nc is not None:
            self.flush_pending()
            await self._publish_queued(nc)
            with contextlib.suppress(Exception):
                await nc.flush(timeout=1)
            with contextlib.suppress(Exception):
                await nc.close()

    async def _connect(self, nats):
        s = self.settings
        nc = await nats.connect(
            servers=s.nats_url,
            name=f"dynkv-kv-{s.worker_id}",
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            **reconnecting(s.reconnect_secs),
            **s.nats_options(),
        )

        async def serve(msg) -> None:
            await self._serve_snapshot(nc, msg)

        try:
            await nc.subscribe(snapshot_subject(s.deployment, s.worker_id), cb=serve)
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        return nc

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _drop_queued(self) -> bool:
        dropped = False
        while True:
            try:
                seq, _ts, _events = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            self.dropped_batches += 1
            self._handled_seq = seq
            dropped = True

    async def _publish_queued(self, nc) -> tuple[int, bool]:
        sent, lost = 0, False
        while True:
            try:
                seq, ts, raw = self._queue.get_nowait()
            except queue.Empty:
                return sent, lost
            self._handled_seq = seq
            if not nc.is_connected:
                self.dropped_batches += 1
                lost = True
                continue
            try:
                batch = self._batch(seq, ts, raw)
                await nc.publish(self.subject, batch.model_dump_json().encode())
            except Exception:
                self.dropped_batches += 1
                lost = True
                continue
            self.published_batches += 1
            sent += 1

    def _batch(self, seq: int, ts: float, raw: list[tuple[int, KvTier | None, int]]) -> EventBatch:
        """Consecutive changes of one kind and tier become one event."""
        events: list = []
        run_kind, run_tier, run_keys = None, None, []

        def close_run() -> None:
            if run_kind == _STORED:
                events.append(Stored(tier=run_tier, keys=run_keys))
            elif run_kind == _REMOVED:
                events.append(Removed(tier=run_tier, keys=run_keys))

        for kind, tier, key in raw:
            if kind == _CLEARED:
                close_run()
                run_kind, run_tier, run_keys = None, None, []
                events.append(Cleared(tier=tier))
                continue
            if kind != run_kind or tier != run_tier:
                close_run()
                run_kind, run_tier, run_keys = kind, tier, []
            run_keys.append(key)
        close_run()
        return EventBatch(
            worker_id=self.settings.worker_id,
            instance_id=self.instance_id,
            seq=seq,
            ts=ts,
            block_size=self.block_size,
            events=events,
        )

    def _rates(self) -> WorkerRates:
        try:
            reading = self.rates_source()
        except Exception:  # a broken measurement must not stop the events
            log.debug("KVBM: the rates source failed", exc_info=True)
            reading = RatesReading()
        with self._lock:
            held = {t: len(keys) for t, keys in self._held.items()}
            # every batch not waiting in the queue was published (before this message, on the
            # same subject) or dropped
            seq = self._seq if self._queue.empty() else self._handled_seq
        return WorkerRates(
            worker_id=self.settings.worker_id,
            instance_id=self.instance_id,
            seq=seq,
            ts=time.time(),
            block_size=self.block_size,
            fingerprint=self.fingerprint,
            prefill=reading.prefill,
            g2_to_g1_tokens_per_s=reading.g2_to_g1_tokens_per_s,
            g3_to_g1_tokens_per_s=reading.g3_to_g1_tokens_per_s,
            decode_seconds_per_request=reading.decode_seconds_per_request,
            held_blocks=held,
            dropped_batches=self.dropped_batches,
        )

    def snapshot(self, max_keys: int) -> list[SnapshotChunk]:
        """The key set per tier as of the last batch number, in chunks of at most `max_keys`.
        Pending events are cut into a batch first, so events after the snapshot's `seq` are
        exactly those not in it."""
        with self._lock:
            self._cut_locked()
            seq = self._seq
            tiers = [(t, list(keys)) for t, keys in self._held.items() if keys]
        parts = [
            (t, keys[i : i + max_keys]) for t, keys in tiers for i in range(0, len(keys), max_keys)
        ]
        if not parts:
            parts = [(None, [])]
        return [
            SnapshotChunk(
                worker_id=self.settings.worker_id,
                instance_id=self.instance_id,
                seq=seq,
                block_size=self.block_size,
                part=i,
                parts=len(parts),
                tier=t,
                keys=keys,
            )
            for i, (t, keys) in enumerate(parts)
        ]

    async def _serve_snapshot(self, nc, msg) -> None:
        if not msg.reply:
            return
        max_keys = max(1, (nc.max_payload - 1024) // KEY_WIRE_BYTES)
        try:
            for chunk in self.snapshot(max_keys):
                await nc.publish(msg.reply, chunk.model_dump_json().encode())
            self.snapshots_served += 1
        except Exception as exc:  # the router asks again
            log.warning("KVBM: could not send a KV snapshot (%s)", exc)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("KVBM: NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        self.connected.clear()
        if self._stop.is_set():
            return
        log.warning("KVBM: lost NATS; KV events are dropped and counted until it is back")

    async def _on_reconnected(self) -> None:
        log.info("KVBM: NATS is back; publishing KV events again")


def start_from_env(
    leader, block_size: int, fingerprint: str = "", rates_source: RatesSource | None = None
) -> KvEventPublisher | None:
    """The publisher `DYNKV_KV_EVENTS_*` asks for, watching `leader` and started; None when no
    NATS URL is set or the settings are unusable (the engine serves on without events)."""
    try:
        settings = KvEventsSettings()
        if not settings.nats_url:
            return None
        publisher = KvEventPublisher(
            settings, block_size=block_size, fingerprint=fingerprint, rates_source=rates_source
        )
    except Exception as exc:
        log.warning("KVBM: KV events are off: %s", exc)
        return None
    leader.watch(publisher)
    return publisher.start()
