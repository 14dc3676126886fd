"""The frontend's view of the workers: who is registered, who is healthy, how busy each is.

Membership comes only from etcd (`dynkv.frontend.discovery` applies the registrations); health
is the frontend's own judgement on top of it: a registered worker is healthy (the wrapper
registers only once vLLM answers `/health`), a connection failure makes it unhealthy, and it is
healthy again once it answers `/health` (`dynkv.frontend.discovery.HealthChecker`). A worker
whose key is deleted (clean stop, or lease expiry after a crash) leaves at once.

Models the frontend has heard of stay known after their last worker left, so a request for them
is a 503 (no worker now), not a 404 (no such model); the plan names the served model up front.

Single-threaded by design: everything runs on the frontend's event loop, so no locks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dynkv.kvbm.roles import Role
from dynkv.worker.record import BadRegistration, decode

__all__ = ["BadRegistration", "Lease", "Worker", "WorkerPool"]

log = logging.getLogger("dynkv.frontend")


@dataclass
class Worker:
    key: str
    id: str
    role: Role
    url: str
    model: str
    metrics_url: str | None = None
    pid: int | None = None
    started_at: float | None = None
    healthy: bool = True
    reason: str = ""  # why it is unhealthy
    outstanding: int = 0  # requests sent to it and not finished

    @classmethod
    def from_registration(
        cls, key: str, value: bytes | str | Mapping[str, Any], secret: str | None = None
    ) -> Worker:
        """A `dynkv.worker.record.WorkerRecord` read from etcd; with `secret`, only a signed
        one (BadRegistration otherwise)."""
        record = decode(key, value, secret)
        return cls(
            key=key,
            id=record.id or key.rsplit("/", 1)[-1],
            role=record.role,
            url=record.url.rstrip("/"),
            model=record.model,
            metrics_url=record.metrics_url,
            pid=record.pid,
            started_at=record.started_at,
        )

    def describe(self) -> str:
        return f"{self.id} ({self.role}, {self.model}) at {self.url}"


@dataclass
class Lease:
    """One request's claim on a worker: counts towards `outstanding` until released (once,
    however often `release` is called); `on_release` callbacks run then (metrics gauges)."""

    worker: Worker
    on_release: list[Callable[[], None]] = field(default_factory=list)
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.worker.outstanding = max(0, self.worker.outstanding - 1)
        for callback in self.on_release:
            callback()


class WorkerPool:
    """`secret`: the deployment secret; when set, only records signed with it join (see
    `dynkv.worker.record`), and the others are counted in `rejected` by reason and logged once
    per key."""

    def __init__(self, models: Iterable[str] = (), *, secret: str | None = None) -> None:
        self._workers: dict[str, Worker] = {}
        self._known: set[str] = set(models)
        self.synced = False  # the first etcd listing has been applied
        self.secret = secret
        self.rejected: Counter[str] = Counter()  # reason → records ignored
        self._rejected_keys: set[str] = set()
        self.on_leave: list[Callable[[Worker], None]] = []  # a worker left (the KV router)

    # ---- membership (from etcd) --------------------------------------------------------------

    def put(self, key: str, value: bytes | str | Mapping[str, Any]) -> Worker | None:
        """A registration was written: add or replace the worker. A re-registration (lease
        lost and renewed, or a restart on the same URL) keeps the in-flight count and makes the
        worker healthy again: the wrapper registers only a healthy vLLM."""
        try:
            worker = Worker.from_registration(key, value, self.secret)
        except BadRegistration as exc:
            self.rejected[exc.reason] += 1
            logged = key in self._rejected_keys
            self.remove(key)  # a good record replaced by a bad one: the worker leaves
            if not logged:
                log.warning("ignoring a registration that is not a valid worker record: %s", exc)
            self._rejected_keys.add(key)
            return None
        self._rejected_keys.discard(key)
        old = self._workers.get(key)
        if old is not None and old.url == worker.url:
            worker.outstanding = old.outstanding
        self._workers[key] = worker
        self._known.add(worker.model)
        if old is None:
            log.info("worker joined: %s", worker.describe())
        elif old.url != worker.url or old.pid != worker.pid:
            log.info("worker re-registered: %s", worker.describe())
        return worker

    def remove(self, key: str) -> Worker | None:
        self._rejected_keys.discard(key)
        worker = self._workers.pop(key, None)
        if worker is not None:
            log.info("worker left: %s", worker.describe())
            for callback in self.on_leave:
                callback(worker)
        return worker

    def replace(self, registrations: Mapping[str, bytes | str]) -> None:
        """A full listing (start-up, or after the watch was lost): the pool becomes exactly it."""
        for key in list(self._workers):
            if key not in registrations:
                self.remove(key)
        for key, value in registrations.items():
            old = self._workers.get(key)
            if old is None or _changed(old, value, self.secret):
                self.put(key, value)
        self.synced = True

    # ---- health (the frontend's own observations) ------------------------------------------

    def mark_unhealthy(self, worker: Worker, reason: str) -> None:
        current = self._workers.get(worker.key)
        if current is not worker:
            worker.healthy, worker.reason = False, reason
            return  # already replaced or removed: nothing routes to this object any more
        if worker.healthy:
            log.warning("worker %s is unhealthy: %s", worker.id, reason)
        worker.healthy, worker.reason = False, reason

    def mark_healthy(self, worker: Worker) -> None:
        if not worker.healthy:
            log.info("worker %s answers /health again", worker.id)
        worker.healthy, worker.reason = True, ""

    # ---- queries -----------------------------------------------------------------------------

    def workers(self, model: str | None = None, role: str | None = None) -> list[Worker]:
        """Registered workers (healthy or not), sorted by id for a stable order."""
        return sorted(
            (
                w
                for w in self._workers.values()
                if (model is None or w.model == model) and (role is None or w.role == role)
            ),
            key=lambda w: (w.id, w.key),
        )

    def healthy(self, model: str, role: str, exclude: Iterable[str] = ()) -> list[Worker]:
        skip = set(exclude)
        return [w for w in self.workers(model, role) if w.healthy and w.key not in skip]

    def unhealthy(self) -> list[Worker]:
        return [w for w in self.workers() if not w.healthy]

    def expect(self, models: Iterable[str]) -> None:
        """Models to treat as known before any of their workers registers (the plan's)."""
        self._known.update(models)

    def knows(self, model: str) -> bool:
        return model in self._known

    def models(self) -> list[str]:
        """Models with at least one registered worker."""
        return sorted({w.model for w in self._workers.values()})

    def acquire(self, worker: Worker) -> Lease:
        worker.outstanding += 1
        return Lease(worker)

    def __len__(self) -> int:
        return len(self._workers)


def _changed(worker: Worker, value: bytes | str, secret: str | None) -> bool:
    try:
        fresh = Worker.from_registration(worker.key, value, secret)
    except BadRegistration:
        return True
    return (fresh.url, fresh.pid, fresh.model, fresh.role, fresh.started_at) != (
        worker.url,
        worker.pid,
        worker.model,
        worker.role,
        worker.started_at,
    )
