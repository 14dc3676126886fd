"""A worker's registration: one etcd key under a lease that lives as long as the worker.

Key `/dynkv/<deployment>/workers/<worker_id>` → a signed `dynkv.worker.record.WorkerRecord`,
with lease TTL `DYNKV_LEASE_TTL_SECS`. The frontend discovers workers with a prefix watch on
`/dynkv/<deployment>/workers/`. A worker that dies without withdrawing (SIGKILL, power loss)
disappears when its lease expires; one that stops cleanly revokes the lease at once.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from dynkv.infra.etcd_client import EtcdClient, EtcdError, LeaseKeeper
from dynkv.worker.record import WorkerRecord, signed, worker_key

__all__ = ["Registrar", "WorkerRecord", "worker_key"]


def _log(message: str) -> None:
    print(f"[dynkv.worker] {message}", file=sys.stderr, flush=True)


class Registrar:
    """Registers `record` at `key` under a fresh lease, keeps it alive, re-registers when the
    lease is lost while the worker still runs, and withdraws on request."""

    def __init__(
        self,
        client: EtcdClient,
        key: str,
        record: WorkerRecord,
        ttl: int,
        *,
        secret: str | None = None,
    ) -> None:
        self.client, self.key, self.ttl = client, key, ttl
        self.record: dict[str, Any] = signed(key, record, secret)
        self.lease: int | None = None
        self._keeper: LeaseKeeper | None = None
        self._withdrawn = threading.Event()
        self._lock = threading.Lock()

    def register(self) -> None:
        with self._lock:
            lease = self.client.lease_grant(self.ttl)
            self.client.put(self.key, self.record, lease=lease)
            self.lease = lease
            self._keeper = LeaseKeeper(self.client, lease, self.ttl, on_lost=self._on_lost).start()
        _log(f"registered {self.key} (lease {lease:x}, ttl {self.ttl}s)")

    def _on_lost(self, exc: Exception) -> None:
        _log(f"registration lease lost ({exc}); registering again")
        while not self._withdrawn.is_set():
            try:
                self.register()
                return
            except EtcdError as err:
                _log(f"etcd not reachable to re-register: {err}")
                self._withdrawn.wait(1.0)

    @property
    def registered(self) -> bool:
        return self.lease is not None

    def suspend(self) -> None:
        """Take the registration out (vLLM stopped answering) without giving up: `register`
        brings it back once vLLM is healthy again."""
        self._revoke("suspended {key}: vLLM does not answer /health", "suspend")

    def ensure(self) -> None:
        """Put the record back if someone deleted the key while our lease lives (etcd on
        loopback has no ACLs; docs/security.md)."""
        with self._lock:
            lease = self.lease
            if lease is None or self.client.get(self.key) is not None:
                return
            self.client.put(self.key, self.record, lease=lease)
        _log(f"{self.key} was deleted by someone else; registered again")

    def withdraw(self) -> None:
        """Revoke the lease (etcd deletes the key with it); safe to call twice."""
        self._withdrawn.set()
        self._revoke("withdrew {key}", "withdraw")

    def _revoke(self, done: str, verb: str) -> None:
        """Stop the keep-alive and revoke the lease (etcd deletes the key with it); a lease etcd
        cannot revoke now expires on its own within the TTL."""
        with self._lock:
            keeper, lease = self._keeper, self.lease
            self._keeper = self.lease = None
        if keeper is not None:
            keeper.stop()
        if lease is not None:
            try:
                self.client.lease_revoke(lease)
                _log(done.format(key=self.key))
            except EtcdError as exc:
                _log(f"could not {verb} {self.key} ({exc}); it expires within {self.ttl}s")


def register_until_done(registrar: Registrar, should_give_up) -> bool:
    """Register, retrying while etcd is unreachable, until `should_give_up()` says stop."""
    while not should_give_up():
        try:
            registrar.register()
            return True
        except EtcdError as exc:
            _log(f"etcd not reachable yet ({exc}); retrying")
            time.sleep(1.0)
    return False
