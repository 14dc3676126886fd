"""The fleet-wide finding of `dynkv advise`: requests routed to workers that lack their prefix
while another worker holds it (docs/advise.md#the-findings).

The frontend's KV router keeps an index of every worker's blocks from their KV events whatever
policy routes the requests, and counts the blocks each worker acquired (held in no tier before)
and those of them another worker held already (`dynkv_router_duplicated_blocks_total{worker}`).
In a fleet of agg workers an acquired block was computed, so a duplicate is a prefix the fleet
had, computed again. Round robin, least outstanding and session affinity do not look at
prefixes, so under them that count is the price of routing blind; the KV router makes such copies
only where it prices a second copy of a hot prefix below its holder's queue (`kv_replica`), so a
window routed mostly by `kv` is not judged; nor is disagg, where a decode worker acquires its
prefill worker's blocks by design.

A hot prefix copied once to each worker counts too, and round robin makes that copy as `kv` does
(priced). What tells a prefix-blind policy apart is that it keeps duplicating, every time a
conversation moves: so with a read in the middle of the window the duplicates must be significant
in both halves, and a one-time copy of a new prefix, inside one half, is not judged. Pure, like
`dynkv.advise.findings`.
"""

from __future__ import annotations

from dynkv.advise.model import Finding, FindingKind, RouterCounts, SettingChange
from dynkv.metrics_text import increases

MIN_BLOCKS = 8  # duplicated blocks in the window before the rule judges…
SHARE = 0.05  # …and this share of the blocks the workers acquired
MIN_HALF = MIN_BLOCKS // 2  # with a middle read: duplicated blocks in each half, at that share
KV_SHARE = 0.5  # the kv policy routed at least this share of the window's decisions: not judged

ROUTER_KV = SettingChange(
    env="DYNKV_ROUTER", value="kv", profile_key="[deployment] router", flag="dynkv up --router kv"
)


def _policies(decisions: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, n in decisions.items():
        policy = key.partition("/")[0]
        out[policy] = out.get(policy, 0.0) + n
    return out


def _counts(before: RouterCounts, after: RouterCounts) -> tuple[float, float]:
    """(blocks acquired, of them duplicated) from `before` to `after`, all workers."""
    stored = sum(increases(before.acquired, after.acquired).values())
    return stored, sum(increases(before.duplicated, after.duplicated).values())


def _significant(stored: float, again: float, least: float) -> bool:
    return again >= least and again >= SHARE * stored


def router_spreads_prefixes(
    before: RouterCounts | None, after: RouterCounts, middle: RouterCounts | None = None
) -> Finding | None:
    """A significant share of the blocks the window's workers computed were held by another
    worker already (in each half of the window, given a `middle` read), and a prefix-blind
    policy routed most of the window's requests."""
    prior = before or RouterCounts()
    stored = increases(prior.acquired, after.acquired)
    again = increases(prior.duplicated, after.duplicated)
    total_stored, total_again = sum(stored.values()), sum(again.values())
    if not _significant(total_stored, total_again, MIN_BLOCKS):
        return None
    halves = None
    if middle is not None and middle.error is None and middle.acquired:
        halves = (_counts(prior, middle), _counts(middle, after))
        if not all(_significant(s, a, MIN_HALF) for s, a in halves):
            return None  # a one-time copy (a new prefix reaching each worker), not a habit
    decisions = increases(prior.decisions, after.decisions)
    policies = _policies(decisions)
    routed = sum(policies.values())
    if routed and policies.get("kv", 0.0) >= KV_SHARE * routed:
        return None
    share = total_again / total_stored if total_stored else None
    evidence: dict[str, float | str | None] = {
        "computed_blocks": total_stored,
        "computed_while_held_elsewhere": total_again,
        "share": None if share is None else round(share, 3),
        "decisions_by_policy": ", ".join(f"{p} {n:g}" for p, n in sorted(policies.items())) or None,
        "kv_replica_decisions": decisions.get("kv/kv_replica"),
    }
    if halves is not None:
        for name, (s_half, a_half) in zip(("first_half", "second_half"), halves, strict=True):
            evidence[f"{name}_share"] = round(a_half / s_half, 3) if s_half else None
    for worker, n in sorted(again.items()):
        evidence[f"computed_while_held_elsewhere[{worker}]"] = n
    return Finding(
        kind=FindingKind.ROUTER_SPREADS_PREFIXES,
        worker=None,
        summary=f"the router spreads prefixes: {total_again:g} of the {total_stored:g} blocks the "
        f"workers computed"
        + ("" if share is None else f" ({100 * share:.1f}%)")
        + " were held by another worker already",
        evidence=evidence,
        advice="requests went to workers that lacked their prefix while another worker held it; "
        "route with the KV-aware router, which sends each request where its prefix is cached and "
        "copies a hot prefix to a second worker only where that is priced below its holder's "
        "queue: expect these recomputes to fall to kv's priced replicas (decisions with reason "
        "kv_replica) and the workers' hit rates to rise. Clients can try it first per request "
        "with the header `x-dynkv-router: kv`",
        change=[ROUTER_KV],
    )


def router_check(
    before: RouterCounts | None,
    after: RouterCounts | None,
    roles: list[str],
    middle: RouterCounts | None = None,
) -> tuple[Finding | None, list[str]]:
    """(the finding or None, what could not be judged and why) for a deployment whose workers
    have `roles`: one worker cannot spread anything, and in disagg a duplicate is a handoff, not
    a recompute."""
    if len(roles) < 2:
        return None, []
    name = FindingKind.ROUTER_SPREADS_PREFIXES.value
    if any(role != "agg" for role in roles):
        return None, [
            f"{name}: judged for fleets of agg workers only (a decode worker holds its prefill "
            "worker's blocks by design)"
        ]
    if after is None:
        return None, [f"{name}: the deployment has no running frontend to read"]
    if after.error is not None:
        return None, [f"{name}: the frontend's router counters are unavailable ({after.error})"]
    if not after.acquired:
        return None, [
            f"{name}: the frontend's KV router has seen no block events (a frontend without "
            "NATS, or one older than these counters)"
        ]
    return router_spreads_prefixes(before, after, middle), []
