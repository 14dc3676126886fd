"""The `session` router policy on its own: the session key a request carries (header over the
OpenAI `user` field), stable choices, minimal movement when a worker leaves or joins (rendezvous
hashing), and the least-outstanding fallback for requests without a key."""

from __future__ import annotations

import json

import pytest
from frontend_support import pool_of

from dynkv.frontend.policy import (
    AFFINITY,
    NO_SESSION,
    RouteKey,
    SessionAffinity,
    make_policy,
    rendezvous_score,
)
from dynkv.frontend.pool import Worker
from dynkv.frontend.protocol import parse_request, session_key

SESSIONS = [f"user-{i}" for i in range(400)]


def _workers(*ids: str, role: str = "agg") -> list[Worker]:
    return pool_of(*((i, f"http://h/{i}") for i in ids), role=role).workers()


def _assignment(policy: SessionAffinity, workers: list[Worker]) -> dict[str, str]:
    return {s: policy.pick(workers, RouteKey(s)).worker.id for s in SESSIONS}


# ---- the key ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        ("conv-7", {"user": "alice"}, "conv-7"),  # the header wins over `user`
        (None, {"user": "alice"}, "alice"),
        ("  ", {"user": "alice"}, "alice"),  # a blank header is no header
        (None, {"user": ""}, None),
        (None, {"user": 42}, None),  # not a string: no session (vLLM answers the type error)
        (None, {}, None),
        (" conv-7 ", {}, "conv-7"),
    ],
)
def test_the_session_key_is_the_header_else_the_user_field(header, body, expected):
    assert session_key(header, body) == expected


def test_parse_request_carries_the_key_and_forwards_the_body_unchanged():
    raw = b'{"model":"m","prompt":"x","user":"alice"}'
    req = parse_request("completions", raw, session_header="conv-1")
    assert req.session == "conv-1" and req.forward_body() is raw
    assert parse_request("completions", raw).session == "alice"


# ---- stability and movement --------------------------------------------------------------------


def test_a_session_always_lands_on_the_same_worker_whatever_the_order_or_load():
    a, b, c = _workers("agg-0", "agg-1", "agg-2")
    first = _assignment(SessionAffinity(), [a, b, c])
    a.outstanding, c.outstanding = 7, 3  # load does not move a session
    assert _assignment(SessionAffinity(), [c, a, b]) == first  # a fresh policy: no state
    assert set(first.values()) == {"agg-0", "agg-1", "agg-2"}  # and every worker gets some
    spread = [list(first.values()).count(w) for w in ("agg-0", "agg-1", "agg-2")]
    assert min(spread) > len(SESSIONS) / 3 * 0.7, spread


def test_the_score_is_a_fixed_function_of_session_and_worker():
    """Two frontends (or one restarted) agree: no per-process salt such as hash() has."""
    (w,) = _workers("agg-0")
    assert rendezvous_score("user-1", w) == rendezvous_score("user-1", w)
    assert rendezvous_score("user-1", w) != rendezvous_score("user-2", w)
    assert rendezvous_score("x" * 500, w) != rendezvous_score("x" * 499, w)


def test_only_the_sessions_of_a_worker_that_leaves_move():
    a, b, c = _workers("agg-0", "agg-1", "agg-2")
    policy = SessionAffinity()
    before = _assignment(policy, [a, b, c])
    after = _assignment(policy, [a, c])  # agg-1 left (or is unhealthy)
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved == {s for s in SESSIONS if before[s] == "agg-1"}
    assert all(after[s] in ("agg-0", "agg-2") for s in moved)
    assert _assignment(policy, [a, b, c]) == before  # back when it returns


def test_a_worker_that_joins_takes_only_sessions_it_now_wins():
    a, b, c, d = _workers("agg-0", "agg-1", "agg-2", "agg-3")
    policy = SessionAffinity()
    before = _assignment(policy, [a, b, c])
    after = _assignment(policy, [a, b, c, d])
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved and all(after[s] == "agg-3" for s in moved)
    assert len(moved) < len(SESSIONS) / 4 * 1.4  # about 1/N of them


def test_prefill_and_decode_candidates_are_chosen_the_same_way():
    policy = make_policy("session")
    prefill = _workers("prefill-0", "prefill-1", role="prefill")
    decode = _workers("decode-0", "decode-1", role="decode")
    for s in SESSIONS[:20]:
        key = RouteKey(s)
        assert policy.pick(prefill, key) == policy.pick(list(reversed(prefill)), key)
        assert policy.pick(decode, key).worker.role == "decode"


# ---- without a key ------------------------------------------------------------------------------


def test_requests_without_a_session_go_least_outstanding():
    a, b = _workers("agg-0", "agg-1")
    a.outstanding = 2
    policy = SessionAffinity()
    choice = policy.pick([a, b])
    assert (choice.worker.id, choice.reason) == ("agg-1", NO_SESSION)
    b.outstanding = 5
    assert policy.pick([a, b], RouteKey(None)).worker.id == "agg-0"
    assert policy.pick([a, b], RouteKey("user-1")).reason == AFFINITY
    assert policy.pick([], RouteKey("user-1")) is None


def test_the_session_router_is_a_setting():
    from dynkv.frontend.config import parse_args
    from dynkv.settings.deployment import RouterPolicy

    cfg = parse_args(["--etcd-endpoints", "http://a:1"], {"DYNKV_ROUTER": "session"})
    assert cfg.router == RouterPolicy.SESSION
    assert json.loads(cfg.model_dump_json())["router"] == "session"
