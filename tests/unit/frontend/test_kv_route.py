"""The frontend's kv policy without NATS traffic: which policy a request gets (default, header,
400 for an unknown one), what the KV router is fed (each worker's unprefilled prompt tokens and
requests in flight), the fallbacks (no router, a prompt it cannot tokenize, NATS down) and the
reading of the cached tokens an answer reports."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from frontend_support import pool_of

from dynkv.frontend.errors import ApiError
from dynkv.frontend.kv_route import (
    INLINE_MAX_BODY_BYTES,
    NO_ROUTER,
    TOKENIZE_FAILED,
    KvRouting,
    UsageTap,
    kv_routing,
    policy_override,
)
from dynkv.frontend.metrics import FrontendMetrics
from dynkv.frontend.policy import LeastOutstanding, RoundRobin, make_policy
from dynkv.frontend.prefill_book import PrefillBook, QueueLoad
from dynkv.frontend.prompt_ids import PromptTokenizer
from dynkv.frontend.protocol import parse_request
from dynkv.frontend.router import RouteContext
from dynkv.kvbm.events import KvTier, Stored, WorkerRates
from dynkv.kvbm.keys import BlockHasher
from dynkv.router.router import KvRouter
from dynkv.router.score import ScorerConfig

FP = "cd" * 16


def request(prompt: str = "hello there " * 40, policy: str | None = "kv", **extra):
    body = {"model": "m", "prompt": prompt, **extra}
    return parse_request("completions", json.dumps(body).encode(), policy=policy)


def context(pool, kv: KvRouting | None, default: str = "round_robin") -> RouteContext:
    policies = {n: make_policy(n) for n in ("round_robin", "least_outstanding", "session")}
    return RouteContext(
        pool, policies.get(default, LeastOutstanding()), None, FrontendMetrics(pool),  # type: ignore[arg-type]
        policies=policies, kv=kv, default=default,
    )  # fmt: skip


def fed_router(holder: str, keys: list[int]) -> KvRouter:
    """A KvRouter whose index already holds `keys` on `holder` (as its events would say), and
    that believes NATS is up."""
    router = KvRouter("nats://127.0.0.1:1", "d", ScorerConfig(decode_seconds_per_request=0.01))
    router.subscriber.nc = SimpleNamespace(is_connected=True)
    for w in ("agg-0", "agg-1"):
        router.sync.on_rates(
            WorkerRates(worker_id=w, instance_id="i", seq=0, ts=0, block_size=32, fingerprint=FP)
        )
    if keys:
        router.index.apply(holder, Stored(tier=KvTier.HOST, keys=keys))
    return router


def test_the_router_header_chooses_a_policy_or_is_a_400():
    assert policy_override(None) is None and policy_override(" ") is None
    assert policy_override("KV") == "kv" and policy_override("session") == "session"
    with pytest.raises(ApiError) as exc:
        policy_override("random")
    assert exc.value.status == 400
    assert "round_robin, least_outstanding, session, kv" in exc.value.message


def test_the_default_policy_serves_requests_without_the_header():
    pool = pool_of(("agg-0", "http://a"), ("agg-1", "http://b"))
    ctx = context(pool, KvRouting(None, None))
    req = request(policy=None)
    picks = [asyncio.run(ctx.choose(req, "agg", pool.healthy("m", "agg"))) for _ in range(2)]
    assert [(name, c.worker.id, c.reason) for name, c, _ in picks] == [
        ("round_robin", "agg-0", "turn"),
        ("round_robin", "agg-1", "turn"),
    ]
    assert isinstance(ctx.policies["round_robin"], RoundRobin)


def test_kv_without_a_router_or_tokens_goes_least_outstanding_with_a_reason(tiny):
    pool = pool_of(("agg-0", "http://a"), ("agg-1", "http://b"))
    pool.workers()[0].outstanding = 3
    name, choice, ticket = asyncio.run(
        context(pool, KvRouting(None, None)).choose(request(), "agg", pool.healthy("m", "agg"))
    )
    assert (name, choice.worker.id, choice.reason, ticket) == ("kv", "agg-1", NO_ROUTER, None)
    kv = KvRouting(fed_router("agg-0", []), PromptTokenizer(tiny))
    bad = request(prompt=["two", "prompts"])
    _, choice, ticket = asyncio.run(context(pool, kv).choose(bad, "agg", pool.healthy("m", "agg")))
    assert (choice.worker.id, choice.reason, ticket) == ("agg-1", TOKENIZE_FAILED, None)


def test_kv_picks_the_holder_and_books_its_prefill_until_the_first_byte(tiny):
    pool = pool_of(("agg-0", "http://a"), ("agg-1", "http://b"))
    req = request()
    ids = PromptTokenizer(tiny).token_ids("completions", req.body)
    keys = BlockHasher(bytes.fromhex(FP), 32).keys(ids)
    kv = KvRouting(fed_router("agg-1", keys), PromptTokenizer(tiny))
    ctx = context(pool, kv)
    name, choice, ticket = asyncio.run(ctx.choose(req, "agg", pool.healthy("m", "agg")))
    assert (name, choice.worker.id, choice.reason) == ("kv", "agg-1", "kv")
    assert ticket.predicted_cached == len(keys) * 32
    assert kv.book.tokens("agg-1") == len(ids) - len(keys) * 32
    ticket.prefilled()
    ticket.prefilled()  # once
    assert kv.book.workers() == []
    # a prompt nobody holds goes to the less loaded worker: queued prefill, then requests
    other = request(prompt="something else entirely " * 30)
    queued = kv.book.add("agg-0", 5000)
    _, choice, _ = asyncio.run(ctx.choose(other, "agg", pool.healthy("m", "agg")))
    assert (choice.worker.id, choice.reason) == ("agg-1", "kv_miss")
    kv.book.done(queued)
    pool.workers()[1].outstanding = 4
    _, choice, _ = asyncio.run(
        ctx.choose(request(prompt="x y " * 50), "agg", pool.healthy("m", "agg"))
    )
    assert choice.worker.id == "agg-0"
    # disagg: kv places the prefill; the decode step goes least outstanding
    _, choice, ticket = asyncio.run(ctx.choose(req, "decode", pool.healthy("m", "agg")))
    assert (choice.worker.id, choice.reason, ticket) == ("agg-0", "decode_fewest_outstanding", None)
    text = ctx.metrics.exposition().decode()
    assert 'dynkv_router_routed_total{policy="kv",worker="agg-1"} 2.0' in text
    assert 'dynkv_router_decision_seconds_count{policy="kv"} 4.0' in text


def test_nats_down_routes_by_load_and_is_counted(tiny):
    pool = pool_of(("agg-0", "http://a"), ("agg-1", "http://b"))
    router = fed_router("agg-0", [])
    router.subscriber.nc = SimpleNamespace(is_connected=False)
    ctx = context(pool, KvRouting(router, PromptTokenizer(tiny)), default="kv")
    _, choice, _ = asyncio.run(ctx.choose(request(policy=None), "agg", pool.healthy("m", "agg")))
    assert choice.reason == "nats_down"
    assert "dynkv_router_nats_fallbacks_total 1.0" in ctx.metrics.exposition().decode()


def test_a_worker_that_leaves_the_pool_leaves_the_index():
    pool = pool_of(("agg-0", "http://a"), ("agg-1", "http://b"))
    kv = KvRouting(fed_router("agg-1", [11, 12]), None)
    pool.on_leave.append(kv.remove_worker)
    kv.book.add("agg-1", 9)
    pool.remove("/dynkv/t/workers/agg-1")
    assert len(kv.router.index) == 0 and kv.book.workers() == []


def test_the_book_says_how_long_the_oldest_prompt_has_been_computing():
    now = [10.0]
    book = PrefillBook(clock=lambda: now[0])
    a = book.add("w", 300)
    now[0] = 11.0
    b = book.add("w", 200)
    now[0] = 12.5
    assert book.load("w") == QueueLoad(500, 300, 2.5) and book.load("idle") == QueueLoad()
    now[0] = 13.0
    book.done(a)  # first byte: b is the head, computing from now on (not since it was sent)
    book.done(a)  # once
    now[0] = 13.25
    assert book.load("w") == QueueLoad(200, 200, 0.25)
    book.done(b)
    assert book.workers() == [] and book.tokens("w") == 0
    now[0] = 20.0
    book.add("w", 50)  # after an idle spell: computing since it was sent
    now[0] = 20.5
    assert book.load("w").head_elapsed_s == 0.5


def test_usage_tap_reads_cached_tokens_from_json_and_sse():
    tap = UsageTap()
    body = {
        "choices": [{"text": '"prompt_tokens_details":{"cached_tokens":999}'}],
        "usage": {"prompt_tokens": 70, "prompt_tokens_details": {"cached_tokens": 64}},
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    tap(raw[:20])
    tap(raw[20:])
    assert tap.cached_tokens() == 64
    sse = UsageTap()
    sse(b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n')
    assert sse.cached_tokens() is None  # a stream without include_usage reports nothing
    sse(b'data: {"choices":[],"usage":{"prompt_tokens":9,"prompt_tokens_details":')
    sse(b'{"cached_tokens":0}}}\n\ndata: [DONE]\n\n')
    assert sse.cached_tokens() == 0
    no_details = UsageTap()
    no_details(b'{"usage":{"prompt_tokens":9,"prompt_tokens_details":null}}')
    assert no_details.cached_tokens() is None


def test_the_frontend_reads_the_kv_router_settings():
    from dynkv.frontend.config import parse_args

    cfg = parse_args(
        ["--etcd-endpoints", "http://127.0.0.1:2379", "--router", "kv", "--tokenizer", "/m",
         "--router-tier-weights", "dynamo", "--router-temperature", "0.5",
         "--router-replica-half-life", "0"],
        {"DYNKV_FRONTEND_NATS_URL": "nats://127.0.0.1:4222"},
    )  # fmt: skip
    assert (cfg.router, cfg.nats_url, cfg.tokenizer) == ("kv", "nats://127.0.0.1:4222", "/m")
    assert (cfg.router_tier_weights, cfg.router_temperature) == ("1,0.75,0.25", 0.5)
    assert cfg.router_replica_half_life == 0
    hot = cfg.model_copy(update={"router_tier_weights": None, "router_replica_half_life": 30.0})
    router = kv_routing(hot).router
    assert router is not None and router.heat is not None and router.heat.half_life_s == 30
    router = kv_routing(cfg).router
    assert router is not None and router.heat is None  # no replicas: off, and Dynamo's weights
    with pytest.raises(SystemExit):
        parse_args(["--etcd-endpoints", "http://e", "--router-tier-weights", "2,1,1"], {})


def test_a_prompt_just_sent_counts_as_held_on_its_worker_before_its_events_arrive(tiny):
    """A burst behind one long prefix: once the first request is prefilled there, the next ones
    go to the same worker and are predicted to reuse the prefix, though no event has come yet."""
    pool = pool_of(("agg-0", "http://a"), ("agg-1", "http://b"))
    kv = KvRouting(fed_router("agg-0", []), PromptTokenizer(tiny))
    ctx = context(pool, kv)
    prefix = "a long shared system prompt " * 40
    first = request(prompt=prefix + "question one")
    _, choice, ticket = asyncio.run(ctx.choose(first, "agg", pool.healthy("m", "agg")))
    holder = choice.worker.id
    assert ticket.predicted_cached == 0 and len(kv.router.index) == 0
    ticket.prefilled()
    second = request(prompt=prefix + "question two")
    _, choice, ticket = asyncio.run(ctx.choose(second, "agg", pool.healthy("m", "agg")))
    ids = PromptTokenizer(tiny).token_ids("completions", second.body)
    assert choice.worker.id == holder and choice.reason == "kv"
    assert 0 < ticket.predicted_cached < len(ids)
    # the second is not prefilled yet: a third with the same prefix still goes to the holder (a
    # short question queued there costs less than the whole prefix elsewhere) and reuses it
    third = request(prompt=prefix + "question three")
    _, choice, ticket3 = asyncio.run(ctx.choose(third, "agg", pool.healthy("m", "agg")))
    assert choice.worker.id == holder and ticket3.predicted_cached == ticket.predicted_cached
    assert kv.router.stats()["in_flight_prompts"] == 3


def test_the_tokenizer_loads_at_start_whenever_a_request_may_choose_kv(tiny):
    """Any request may ask for kv with the header, so the frontend loads the tokenizer when it
    starts (in the tokenizing thread), not on the first kv request, whatever the default policy.
    Without a router kv cannot be chosen, and nothing is loaded."""

    async def started(router) -> PromptTokenizer:
        tok = PromptTokenizer(tiny)
        kv = KvRouting(router, tok)
        await kv.start()
        kv._pool.submit(lambda: None).result(timeout=60)  # the warm-up ran before this
        await kv.close()
        return tok

    with_router = KvRouter("nats://127.0.0.1:1", "d", ScorerConfig(), retry_secs=60)
    assert asyncio.run(started(with_router))._tok is not None
    assert asyncio.run(started(None))._tok is None


def test_the_decision_trace_names_the_request_as_its_answers_do(tiny, caplog):
    """A request without `x-request-id` is logged under the id the frontend gives it, the
    `request_id` its error answers carry, not as `None`."""
    pool = pool_of(("agg-0", "http://a"), ("agg-1", "http://b"))
    body = json.dumps({"model": "m", "prompt": "hello there " * 40}).encode()
    req = parse_request("completions", body, policy="kv", log_id="f3a9")
    assert req.request_id is None  # nothing is forwarded to the worker as the client's id
    kv = KvRouting(fed_router("agg-1", []), PromptTokenizer(tiny))
    with caplog.at_level("DEBUG", logger="dynkv.frontend"):
        asyncio.run(context(pool, kv).choose(req, "agg", pool.healthy("m", "agg")))
    assert any("kv router: request f3a9 -> " in r.getMessage() for r in caplog.records)


def test_a_prompt_mostly_seen_before_is_tokenized_on_the_event_loop(tiny):
    """The next round of a conversation (its system prompt in the piece cache) is tokenized
    where the decision runs, without the hop to the tokenizer thread that cost a few ms of
    every decision on a busy host; a new long prompt still goes to that thread."""

    async def run() -> None:
        kv = KvRouting(fed_router("agg-0", []), PromptTokenizer(tiny))
        kv._pool.submit(kv._warm).result(timeout=60)  # what start() does: load it in the thread
        system = "a long system prompt that every round repeats " * 30
        first = request(prompt=system + "question one")
        ids = await kv.token_ids(first)  # unseen: encoded in the tokenizer thread
        assert ids == PromptTokenizer(tiny).token_ids("completions", first.body)
        huge = "x" * INLINE_MAX_BODY_BYTES  # one piece: cached after its first encoding
        assert await kv.token_ids(request(prompt=huge + "a")) is not None
        kv._pool.shutdown()  # from here a hop to the thread would raise
        second = request(prompt=system + "question two")
        assert await kv.token_ids(second) == PromptTokenizer(tiny).token_ids(
            "completions", second.body
        )
        new = request(prompt="an unseen and rather long prompt " * 100)
        assert await kv.token_ids(new) is None  # the thread was needed: routed by load
        # cached, but a body this large is rendered and cut in the thread all the same
        assert await kv.token_ids(request(prompt=huge + "a")) is None
        await kv.close()

    asyncio.run(run())
