"""Restart on failure, inside the process that supervises a deployment (a foreground `up`, or the
background supervisor of `up -d`): docs/restart.md.

Each check (about once a second) the supervisor calls `Restarter.step()`, which
- takes a `dynkv restart` request left in the state dir (`StateStore.add_restart_request`),
- notices a service that exited on its own and asks its `RestartHistory` what to do: start it
  again after a back-off, or leave it down ("given up", with a log line saying why and how to
  bring it back),
- starts the services whose back-off has passed: what is left of the old one (vLLM's engine
  processes outlive a SIGKILLed wrapper) is stopped first, then it starts from the same plan
  entry, its log appended to,
- watches a restarted service until its probes pass (a worker's include its etcd registration,
  which the worker wrapper puts back once vLLM answers), recording how long it was away.
Everything it decides is written to the state file (`ServiceRecord.restarts`, `last_exit`,
`restart_phase`, `recovered_after_s`), which `dynkv status` shows. It never stops the rest of
the deployment: a service that stays down leaves the others serving.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dynkv.supervisor import health
from dynkv.supervisor.process import SpawnError
from dynkv.supervisor.restart_policy import GiveUp, RestartHistory, RestartPolicy
from dynkv.supervisor.state import ExitRecord, ServiceRecord
from dynkv.supervisor.units import start_unit

if TYPE_CHECKING:
    from dynkv.supervisor.run import Supervisor, _Handle

# A restart asked for with `dynkv restart` stops the service with this grace first.
REQUESTED_GRACE = 10.0


def say(message: str) -> None:
    """A supervisor log line: the foreground terminal, or the background supervisor's log."""
    print(f"[dynkv] {message}", file=sys.stderr, flush=True)


@dataclass
class _Away:
    """A service between its exit (or a requested stop) and healthy again."""

    since: float  # monotonic: when it went away
    due: float | None  # monotonic: when to start it again; None once started
    spawned_at: float | None = None  # monotonic: when the new one was started


def exit_record(item: _Handle, code: int) -> ExitRecord:
    """How it ended; known only to its parent (a unit without its Popen says -1: unknown)."""
    known = getattr(item.unit, "popen", None) is not None
    return ExitRecord.from_returncode(code if known else None, time.time())


class Restarter:
    def __init__(
        self,
        supervisor: Supervisor,
        policy: RestartPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] = say,
    ) -> None:
        self.sup, self.policy, self.clock, self.log = supervisor, policy, clock, log
        self.histories: dict[str, RestartHistory] = {}
        self.away: dict[str, _Away] = {}

    def history(self, name: str) -> RestartHistory:
        if name not in self.histories:
            self.histories[name] = RestartHistory(self.policy, self.clock)
        return self.histories[name]

    # ---- one check ---------------------------------------------------------------------------

    def step(self) -> list[_Handle]:
        """One round over the services; returns those that exited and are not restarted
        because restarts are disabled (the foreground `up` then stops everything, as before)."""
        self._take_requests()
        unrestarted = []
        for item in list(self.sup.handles):
            if item.service.kind != "process":
                continue  # containers: docker's own restart policy (docs/restart.md)
            name, record = item.service.name, item.record
            away = self.away.get(name)
            if away is not None and away.due is not None:
                if self.clock() >= away.due:
                    self._start_again(item, away)
                continue
            if record.restart_phase == "given_up":
                continue
            code = item.unit.exit_code()
            if code is None:
                if away is not None:
                    self._check_recovered(item, away)
                continue
            if not self.policy.enabled:
                unrestarted.append(item)
                continue
            self.exited(item, exit_record(item, code))
        return unrestarted

    def exited(self, item: _Handle, exit_: ExitRecord, why: str = "") -> None:
        name = item.service.name
        item.unit.reap()
        decision = self.history(name).on_exit()
        since = self.away[name].since if name in self.away else self.clock()

        def update(rec: ServiceRecord) -> None:
            rec.last_exit = exit_
            rec.restart_phase = "given_up" if isinstance(decision, GiveUp) else "backoff"

        what = why or exit_.describe()
        # the log line first: whoever sees the new phase in the state finds its reason logged
        if isinstance(decision, GiveUp):
            self.away.pop(name, None)
            self.log(
                f"{name} {what}; it stays down: {decision.reason}. The rest keeps serving; "
                f"bring it back with `dynkv restart {name} --name {self.sup.plan.name}`"
            )
            self._update(name, update)
            return
        self.away[name] = _Away(since=since, due=self.clock() + decision.delay)
        self.log(
            f"{name} {what}; restarting it in {decision.delay:g} s "
            f"(restart {decision.nth} of {self.policy.limit} within {self.policy.window:g} s)"
        )
        self._update(name, update)

    def _start_again(self, item: _Handle, away: _Away) -> None:
        """Stop what is left of the old one, start it from the plan, record the new process."""
        name, sup = item.service.name, self.sup
        item.unit.stop(instance=sup.instance, grace=min(sup.grace, REQUESTED_GRACE))
        item.unit.reap()
        old = item.record
        log_path = item.unit.log_path or str(sup.store.log_path(name))
        try:
            unit = start_unit(
                item.service,
                instance=sup.instance,
                log_path=Path(log_path),
                docker=sup.docker,
                append=True,
            )
        except SpawnError as exc:
            away.due = None
            self.exited(item, ExitRecord(at=time.time()), why=f"could not be started: {exc.detail}")
            return
        new = unit.record
        new.restarts = old.restarts + 1
        new.last_exit = old.last_exit
        new.restart_phase = "starting"
        item.unit = unit
        away.due, away.spawned_at = None, self.clock()
        self._update(name, lambda rec: None, replace=new)
        self.log(f"{name} started again (pid {new.pid}, restart {new.restarts})")

    def _check_recovered(self, item: _Handle, away: _Away) -> None:
        name = item.service.name
        ok, detail = health.check_all(item.service.probes, self.sup.probe_timeout)
        if ok:
            took = self.clock() - away.since
            del self.away[name]

            def update(rec: ServiceRecord) -> None:
                rec.restart_phase = ""
                rec.recovered_after_s = round(took, 2)

            self._update(name, update)
            self.log(f"{name} is healthy again, {took:.1f} s after it went down")
            return
        timeout = self.sup.plan.startup_timeout_secs
        if away.spawned_at is not None and self.clock() - away.spawned_at > timeout:
            item.unit.stop(instance=self.sup.instance, grace=self.sup.grace)
            self.exited(
                item,
                ExitRecord(at=time.time()),
                why=f"was not healthy within {timeout:g} s after its restart ({detail})",
            )

    # ---- `dynkv restart` -------------------------------------------------------------------

    def _take_requests(self) -> None:
        store = self.sup.store
        if not store.restart_request_path.exists():
            return
        with store.lock():
            names = store.take_restart_request()
        for name in names:
            item = next((h for h in self.sup.handles if h.service.name == name), None)
            if item is None or item.service.kind != "process":
                self.log(f"restart of {name} asked for: no such process service, ignored")
                continue
            self.history(name).reset()
            self.away[name] = _Away(since=self.clock(), due=self.clock())

            def update(rec: ServiceRecord) -> None:
                rec.restart_phase = "backoff"

            self._update(name, update)
            self.log(f"restart of {name} asked for (dynkv restart)")

    # ---- state ---------------------------------------------------------------------------

    def _update(
        self,
        name: str,
        change: Callable[[ServiceRecord], None],
        *,
        replace: ServiceRecord | None = None,
    ) -> None:
        """Change one service's record in memory and in the state file (if still this run's)."""
        sup = self.sup
        item = next(h for h in sup.handles if h.service.name == name)
        if replace is not None:
            item.unit.record = replace
        change(item.record)
        assert sup.state is not None
        sup.state.services = [
            item.record if rec.name == name else rec for rec in sup.state.services
        ]
        with sup.store.lock():
            on_disk = sup.store.read_or_none()
            if on_disk is None or on_disk.instance != sup.instance:
                return  # `dynkv down` elsewhere: the watch loop ends on its own
            sup.store.write(sup.state)
