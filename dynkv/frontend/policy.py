"""Which of several equivalent workers gets a request (`DYNKV_ROUTER`).

A policy only chooses among the healthy candidates it is given; what the candidates are (which
role, which were already tried) is the serving strategy's business (`dynkv.frontend.router`), so
the same policy picks the agg worker today and the prefill and the decode worker of a
disaggregated request later.

- `round_robin`: each worker in turn, by id; the turn survives membership changes and exclusions
  (the next worker after the last one picked, wrapping around).
- `least_outstanding`: the worker with the fewest requests in flight from this frontend (ties in
  round-robin order, so an idle pool still spreads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dynkv.frontend.pool import Worker


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[Worker]) -> Worker | None: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[str, str]] = {}  # (model, role) → last pick

    def pick(self, candidates: Sequence[Worker]) -> Worker | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda w: (w.id, w.key))
        group = (ordered[0].model, ordered[0].role)
        last = self._last.get(group)
        chosen = next((w for w in ordered if last is None or (w.id, w.key) > last), ordered[0])
        self._last[group] = (chosen.id, chosen.key)
        return chosen


class LeastOutstanding:
    name = "least_outstanding"

    def __init__(self) -> None:
        self._ties = RoundRobin()

    def pick(self, candidates: Sequence[Worker]) -> Worker | None:
        if not candidates:
            return None
        fewest = min(w.outstanding for w in candidates)
        return self._ties.pick([w for w in candidates if w.outstanding == fewest])


POLICIES = {RoundRobin.name: RoundRobin, LeastOutstanding.name: LeastOutstanding}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r} (choose from {', '.join(POLICIES)})") from None
