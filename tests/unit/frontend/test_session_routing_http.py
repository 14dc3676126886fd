"""`--router session` through the real frontend over loopback sockets, against fake workers that
are real HTTP servers: a session sticks to one worker (agg, and both steps of disagg), the
`x-session-id` header wins over the `user` field, only a departed worker's sessions move, requests
without a session are spread least outstanding, and every choice is counted in
`dynkv_router_decisions_total`."""

from __future__ import annotations

import contextlib
import json
from collections import Counter

import httpx
from frontend_support import FakeWorker, ServerThread, dead_url, pool_of, registration
from prometheus_client.parser import text_string_to_metric_families

from dynkv.frontend import create_app
from dynkv.frontend.config import FrontendConfig
from dynkv.frontend.policy import RouteKey, SessionAffinity

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SESSIONS = [f"user-{i}" for i in range(12)]
HANDOFF = {"dynkv": {"fingerprint": "ab", "block_size": 32, "slots": [4], "expires": 9e9}}


def decisions(fe: ServerThread) -> dict[tuple[str, str], float]:
    text = httpx.get(fe.url + "/metrics", timeout=5).text
    return {
        (s.labels["policy"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "dynkv_router_decisions_total"
    }


def chat(fe: ServerThread, user: str | None = None, header: str | None = None) -> str:
    body = {**CHAT, **({"user": user} if user else {})}
    headers = {"x-session-id": header} if header else {}
    resp = httpx.post(fe.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.headers["x-dynkv-worker"]


@contextlib.contextmanager
def servers(*fakes: FakeWorker):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ServerThread(f.app())) for f in fakes]


def test_agg_sessions_stick_move_only_with_their_worker_and_are_counted():
    fakes = [FakeWorker(f"w{i}") for i in range(3)]
    with servers(*fakes) as ss:
        pool = pool_of(*((f"agg-{i}", s.url) for i, s in enumerate(ss)))
        app = create_app(FrontendConfig(router="session"), pool=pool, discover=False)
        with ServerThread(app) as fe:
            first = {s: chat(fe, user=s) for s in SESSIONS}
            assert {s: chat(fe, user=s) for s in SESSIONS} == first  # sticky
            assert len(set(first.values())) > 1  # and spread
            expected = SessionAffinity().pick(pool.healthy("m", "agg"), RouteKey("conv-9"))
            assert chat(fe, user="user-0", header="conv-9") == expected.worker.id  # header wins
            assert decisions(fe) == {("session", "session"): 2 * len(SESSIONS) + 1}

            gone = first[SESSIONS[0]]
            pool.remove(f"/dynkv/t/workers/{gone}")  # the worker leaves (etcd key deleted)
            after = {s: chat(fe, user=s) for s in SESSIONS}
            moved = {s for s in SESSIONS if after[s] != first[s]}
            assert moved == {s for s in SESSIONS if first[s] == gone}
            assert gone not in after.values()

            anonymous = Counter(chat(fe) for _ in range(4))  # no session: least outstanding
            assert len(anonymous) == 2  # idle ties rotate over the two that remain
            assert decisions(fe)[("session", "no_session")] == 4


def test_disagg_prefill_and_decode_both_follow_the_session():
    prefills = [FakeWorker(f"p{i}", transfer_params=HANDOFF) for i in range(2)]
    decodes = [FakeWorker(f"d{i}") for i in range(2)]
    with servers(*prefills, *decodes) as ss:
        pool = pool_of(("prefill-0", ss[0].url), ("prefill-1", ss[1].url), role="prefill")
        for i, s in enumerate(ss[2:]):
            pool.put(
                f"/dynkv/t/workers/decode-{i}", registration(f"decode-{i}", s.url, role="decode")
            )
        app = create_app(FrontendConfig(router="session"), pool=pool, discover=False)
        with ServerThread(app) as fe:
            decode_of = {s: chat(fe, user=s) for s in SESSIONS}
            assert {s: chat(fe, user=s) for s in SESSIONS} == decode_of
            assert len(set(decode_of.values())) == 2
            prefill_of: dict[str, set[str]] = {}  # session → the prefill workers it reached
            for i, fake in enumerate(prefills):
                for raw in fake.bodies:
                    sent = json.loads(raw)
                    assert sent["max_tokens"] == 1  # the prefill step
                    prefill_of.setdefault(sent["user"], set()).add(f"prefill-{i}")
            policy = SessionAffinity()
            for s in SESSIONS:
                key = RouteKey(s)
                assert prefill_of[s] == {policy.pick(pool.healthy("m", "prefill"), key).worker.id}
                assert decode_of[s] == policy.pick(pool.healthy("m", "decode"), key).worker.id
            assert {w for ws in prefill_of.values() for w in ws} == {"prefill-0", "prefill-1"}
            assert decisions(fe) == {("session", "session"): 4 * len(SESSIONS)}


def test_a_session_whose_worker_refuses_is_retried_on_its_next_worker():
    live = FakeWorker("live")
    with servers(live) as (server,):
        pool = pool_of(("agg-0", dead_url()), ("agg-1", server.url))
        policy = SessionAffinity()
        session = next(
            s
            for s in SESSIONS
            if policy.pick(pool.healthy("m", "agg"), RouteKey(s)).worker.id == "agg-0"
        )
        app = create_app(FrontendConfig(router="session"), pool=pool, discover=False)
        with ServerThread(app) as fe:
            assert chat(fe, header=session) == "agg-1"  # agg-0 refused: retried, marked down
            assert chat(fe, header=session) == "agg-1"  # stays there while agg-0 is down
            assert decisions(fe) == {("session", "session"): 3}
