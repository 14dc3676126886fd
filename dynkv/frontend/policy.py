"""Which of several equivalent workers gets a request (`DYNKV_ROUTER`).

A policy only chooses among the healthy candidates it is given; what the candidates are (which
role, which were already tried) is the serving strategy's business (`dynkv.frontend.router`), so
the same policy picks the agg worker, and the prefill and the decode worker of a disaggregated
request. What a policy may know of the request is a `RouteKey`, filled in by the frontend from
the HTTP request (`dynkv.frontend.protocol.session_key`): a policy never parses HTTP.

- `round_robin`: each worker in turn, by id; the turn survives membership changes and exclusions
  (the next worker after the last one picked, wrapping around).
- `least_outstanding`: the worker with the fewest requests in flight from this frontend (ties in
  round-robin order, so an idle pool still spreads).
- `session`: session affinity. A request with a session key (its `x-session-id` header, else the
  OpenAI `user` field) goes to the candidate with the highest rendezvous score
  `blake2b(key, worker key)` (highest-random-weight hashing): the same session lands on the same
  worker for as long as that worker is a candidate, on every frontend and across restarts, and
  when a worker leaves only its own sessions move (each to its next-highest worker); a worker
  that joins takes over only the sessions it now scores highest for (about 1/N of them).
  A request without a session key is served least outstanding.

Every choice carries a reason, counted as `dynkv_router_decisions_total{policy, reason}`
(docs/frontend.md#routing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dynkv.frontend.pool import Worker

# Decision reasons (the `reason` label of dynkv_router_decisions_total).
TURN = "turn"  # round robin: the next worker in turn
FEWEST = "fewest_outstanding"  # least outstanding: the least busy worker
AFFINITY = "session"  # session: the worker the session key hashes to
NO_SESSION = "no_session"  # session policy, request without a key: least outstanding


@dataclass(frozen=True)
class RouteKey:
    """What a policy may know of a request besides its candidates."""

    session: str | None = None  # the affinity key: x-session-id, else the OpenAI `user` field


NO_KEY = RouteKey()


@dataclass(frozen=True)
class Choice:
    worker: Worker
    reason: str


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[Worker], key: RouteKey = NO_KEY) -> Choice | None: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[str, str]] = {}  # (model, role) → last pick

    def pick(self, candidates: Sequence[Worker], key: RouteKey = NO_KEY) -> Choice | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda w: (w.id, w.key))
        group = (ordered[0].model, ordered[0].role)
        last = self._last.get(group)
        chosen = next((w for w in ordered if last is None or (w.id, w.key) > last), ordered[0])
        self._last[group] = (chosen.id, chosen.key)
        return Choice(chosen, TURN)


class LeastOutstanding:
    name = "least_outstanding"

    def __init__(self, reason: str = FEWEST) -> None:
        self._ties = RoundRobin()
        self._reason = reason

    def pick(self, candidates: Sequence[Worker], key: RouteKey = NO_KEY) -> Choice | None:
        if not candidates:
            return None
        fewest = min(w.outstanding for w in candidates)
        tie = self._ties.pick([w for w in candidates if w.outstanding == fewest])
        return None if tie is None else Choice(tie.worker, self._reason)


def rendezvous_score(session: str, worker: Worker) -> int:
    """The session's weight for `worker`: stable across processes and Python versions (a keyed
    hash, not `hash()`), so every frontend sends a session to the same worker."""
    session_bytes = session.encode()
    data = len(session_bytes).to_bytes(8, "big") + session_bytes + worker.key.encode()
    digest = hashlib.blake2b(data, digest_size=8, person=b"dynkv-route")
    return int.from_bytes(digest.digest(), "big")


class SessionAffinity:
    name = "session"

    def __init__(self) -> None:
        self._fallback = LeastOutstanding(reason=NO_SESSION)

    def pick(self, candidates: Sequence[Worker], key: RouteKey = NO_KEY) -> Choice | None:
        if not candidates:
            return None
        if not key.session:
            return self._fallback.pick(candidates)
        session = key.session
        best = max(candidates, key=lambda w: (rendezvous_score(session, w), w.key))
        return Choice(best, AFFINITY)


POLICIES: dict[str, type[RoundRobin] | type[LeastOutstanding] | type[SessionAffinity]] = {
    RoundRobin.name: RoundRobin,
    LeastOutstanding.name: LeastOutstanding,
    SessionAffinity.name: SessionAffinity,
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[str(name)]()
    except KeyError:
        raise ValueError(f"unknown router {name!r} (choose from {', '.join(POLICIES)})") from None
