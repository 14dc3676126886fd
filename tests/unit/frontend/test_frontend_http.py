"""The frontend over real loopback sockets, against in-process fake workers: pass-through of
bodies and streams (chunk by chunk), every error shape, the API key, retry after a connection
failure, health recovery, least-outstanding routing, metrics."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from frontend_support import (
    DroppingServer,
    FakeWorker,
    ServerThread,
    dead_url,
    pool_of,
    registration,
)
from prometheus_client.parser import text_string_to_metric_families

from dynkv.frontend import create_app
from dynkv.frontend.config import FrontendConfig
from dynkv.frontend.pool import WorkerPool

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def frontend(pool: WorkerPool, **config) -> ServerThread:
    cfg = FrontendConfig(health_interval=0.1, **config)
    return ServerThread(create_app(cfg, pool=pool, discover=False))


def post(fe: ServerThread, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(fe.url + path, content=content, timeout=10, **kw)


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {
        "message",
        "type",
        "param",
        "code",
        "request_id",
    }
    return body["error"]


def sample(fe: ServerThread, name: str, **labels) -> float:
    text = httpx.get(fe.url + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture
def worker():
    fake = FakeWorker("w1")
    with ServerThread(fake.app()) as server:
        yield fake, server


def test_chat_and_completions_pass_through_byte_for_byte(worker):
    fake, server = worker
    with frontend(pool_of(("agg-0", server.url))) as fe:
        raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],  "max_tokens":4}'
        resp = post(fe, "/v1/chat/completions", raw, headers={"x-request-id": "abc"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "hello from w1"
        assert resp.headers["x-dynkv-worker"] == "agg-0"
        assert fake.bodies[-1] == raw  # forwarded unchanged
        assert fake.headers[-1]["x-request-id"] == "abc"
        assert "authorization" not in fake.headers[-1]

        resp = post(fe, "/v1/completions", {"model": "m", "prompt": "x"})
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "hello from w1"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streams_are_relayed_chunk_by_chunk(worker, path):
    fake, server = worker
    fake.gates = {1: threading.Event(), 2: threading.Event()}
    body = {**CHAT, "prompt": "x", "stream": True}
    with frontend(pool_of(("agg-0", server.url))) as fe:
        with httpx.stream("POST", fe.url + path, json=body, timeout=10) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = resp.iter_lines()
            first = next(line for line in events if line)
            # chunk 0 arrived while the worker still holds chunk 1 back: nothing is buffered
            assert "w1-0" in first and not fake.gates[1].is_set()
            fake.gates[1].set()
            assert "w1-1" in next(line for line in events if line)
            fake.gates[2].set()
            rest = [line for line in events if line]
        assert "w1-2" in rest[0] and rest[-1] == "data: [DONE]"
        assert sample(fe, "dynkv_frontend_ttft_seconds_count", model="m", worker="agg-0") == 1


def test_error_shapes(worker):
    fake, server = worker
    pool = pool_of(("agg-0", server.url))
    pool.expect(["gone"])
    pool.put("/dynkv/t/workers/p", registration("p", server.url, model="split", role="prefill"))
    with frontend(pool) as fe:
        resp = post(fe, "/v1/chat/completions", b"{oops")
        assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"
        resp = post(fe, "/v1/chat/completions", {"model": "m"})
        assert resp.status_code == 400 and error_of(resp)["param"] == "messages"
        resp = post(fe, "/v1/completions", {"prompt": "x"})
        assert resp.status_code == 400 and error_of(resp)["param"] == "model"

        resp = post(fe, "/v1/chat/completions", {**CHAT, "model": "nope"})
        err = error_of(resp)
        assert resp.status_code == 404 and err["code"] == "model_not_found"
        assert err["type"] == "invalid_request_error" and "nope" in err["message"]

        resp = post(fe, "/v1/chat/completions", {**CHAT, "model": "gone"})
        assert resp.status_code == 503 and error_of(resp)["code"] == "no_worker_available"
        resp = post(fe, "/v1/chat/completions", {**CHAT, "model": "split"})  # disagg only
        assert resp.status_code == 503 and error_of(resp)["code"] == "no_worker_available"

        vllm_400 = {
            "error": {
                "message": "This model's maximum context length is 2048 tokens.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        }
        fake.fail = (400, vllm_400)
        resp = post(fe, "/v1/chat/completions", CHAT)
        assert resp.status_code == 400 and resp.json() == vllm_400  # the worker's own words

        resp = httpx.get(fe.url + "/v2/nothing", timeout=5)
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
        assert sample(fe, "dynkv_frontend_errors_total", kind="model_not_found") == 1
        assert sample(fe, "dynkv_frontend_errors_total", kind="upstream_status") == 1


def test_models_and_health(worker):
    _, server = worker
    pool = pool_of(("agg-0", server.url))
    with frontend(pool) as fe:
        models = httpx.get(fe.url + "/v1/models", timeout=5).json()
        assert models["object"] == "list"
        assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
            ("m", "model", "dynkv")
        ]
        assert httpx.get(fe.url + "/v1/models/m", timeout=5).json()["id"] == "m"
        assert httpx.get(fe.url + "/v1/models/x", timeout=5).status_code == 404
        health = httpx.get(fe.url + "/health", timeout=5)
        assert health.status_code == 200
        assert health.json() == {
            "status": "ok",
            "workers": 1,
            "healthy_workers": 1,
            "models": ["m"],
        }


def test_health_is_503_until_the_first_listing():
    from dynkv.frontend.app import Frontend

    fe = Frontend(FrontendConfig(etcd_endpoints=("http://127.0.0.1:1",)))
    assert fe.health()[0] == 503
    fe.pool.replace({})
    assert fe.health() == (200, {"status": "ok", "workers": 0, "healthy_workers": 0, "models": []})


def test_api_key(worker):
    _, server = worker
    with frontend(pool_of(("agg-0", server.url)), api_key="s3cret") as fe:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
            resp = post(fe, "/v1/chat/completions", CHAT, headers=headers)
            err = error_of(resp)
            assert resp.status_code == 401 and err["code"] == "invalid_api_key"
            assert "s3cret" not in resp.text
        for path in ("/v1/models", "/metrics", "/anything"):
            assert httpx.get(fe.url + path, timeout=5).status_code == 401
        assert httpx.get(fe.url + "/health", timeout=5).status_code == 200
        ok = {"authorization": "Bearer s3cret"}
        assert post(fe, "/v1/chat/completions", CHAT, headers=ok).status_code == 200
        assert httpx.get(fe.url + "/v1/models", headers=ok, timeout=5).status_code == 200
        text = httpx.get(fe.url + "/metrics", headers=ok, timeout=5).text
        assert 'kind="unauthorized"' in text


@pytest.mark.parametrize("broken", ["refused", "dropped"])
def test_connection_failure_is_retried_once_on_another_worker(worker, broken):
    _, server = worker
    with DroppingServer() as dropper:
        bad = dead_url() if broken == "refused" else dropper.url
        pool = pool_of(("agg-0", bad), ("agg-1", server.url))  # round robin starts at agg-0
        with frontend(pool) as fe:
            resp = post(fe, "/v1/chat/completions", CHAT)
            assert resp.status_code == 200 and resp.headers["x-dynkv-worker"] == "agg-1"
            bad_worker = pool.workers()[0]
            assert not bad_worker.healthy and bad_worker.reason
            for _ in range(3):  # the unhealthy worker gets no more traffic
                assert post(fe, "/v1/chat/completions", CHAT).headers["x-dynkv-worker"] == "agg-1"
            assert sample(fe, "dynkv_frontend_retries_total", model="m") == 1
            assert sample(fe, "dynkv_frontend_errors_total", worker="agg-0", kind="connect") == 1
        if broken == "dropped":
            assert dropper.accepted >= 1  # the request, then the health re-probes


ENGINE_DEAD = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError",
                         "param": None, "code": 500}}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_a_worker_whose_engine_died_is_skipped_and_the_request_retried(worker, stream):
    """vLLM answers 500 to every request once its engine died, and /health 503."""
    _, server = worker
    dead = FakeWorker("dead", fail=(500, ENGINE_DEAD), health_status=503)
    with ServerThread(dead.app()) as dead_server:
        pool = pool_of(("agg-0", dead_server.url), ("agg-1", server.url))
        with frontend(pool) as fe:
            resp = post(fe, "/v1/chat/completions", {**CHAT, "stream": stream})
            assert resp.status_code == 200 and resp.headers["x-dynkv-worker"] == "agg-1"
            assert "w1" in resp.text
            bad = pool.workers()[0]
            assert not bad.healthy and "500" in bad.reason and "503" in bad.reason
            assert post(fe, "/v1/chat/completions", CHAT).headers["x-dynkv-worker"] == "agg-1"
            assert len(dead.bodies) == 1  # out of rotation after the first request
            assert sample(fe, "dynkv_frontend_retries_total", model="m") == 1
            dead_errors = sample(fe, "dynkv_frontend_errors_total", kind="engine_dead")
            assert dead_errors == 1


def test_a_5xx_from_a_healthy_worker_is_the_requests_own_and_reaches_the_client(worker):
    _, server = worker
    failing = FakeWorker("failing", fail=(500, ENGINE_DEAD))  # /health answers 200
    with ServerThread(failing.app()) as failing_server:
        pool = pool_of(("agg-0", failing_server.url), ("agg-1", server.url))
        with frontend(pool) as fe:
            resp = post(fe, "/v1/chat/completions", CHAT)
            assert resp.status_code == 500 and resp.json() == ENGINE_DEAD
            assert resp.headers["x-dynkv-worker"] == "agg-0" and pool.workers()[0].healthy
            assert sample(fe, "dynkv_frontend_retries_total", model="m") == 0
            assert sample(fe, "dynkv_frontend_errors_total", kind="upstream_status") == 1


def test_no_reachable_worker_is_503_with_the_failures_in_the_log_only(caplog):
    pool = pool_of(("agg-0", dead_url()), ("agg-1", dead_url()), ("agg-2", dead_url()))
    with frontend(pool) as fe:
        resp = post(fe, "/v1/chat/completions", CHAT)
        err = error_of(resp)
        assert resp.status_code == 503 and err["code"] == "no_worker_available"
        # the client learns nothing of the workers: no ids, no addresses, no transport errors
        assert "agg-" not in resp.text and "127.0.0.1" not in resp.text and "Error" not in resp.text
        assert resp.headers["x-request-id"] == err["request_id"]
        logged = [r.getMessage() for r in caplog.records if err["request_id"] in r.getMessage()]
        assert len(logged) == 1 and "agg-0" in logged[0] and "agg-1" in logged[0]
        # the third was not tried: one retry only
        assert "agg-2" not in logged[0] and pool.workers()[2].healthy
        resp = post(fe, "/v1/chat/completions", CHAT)  # agg-2 now, then nobody left
        assert resp.status_code == 503
        resp = post(fe, "/v1/chat/completions", CHAT)
        rid = error_of(resp)["request_id"]
        assert any("no healthy agg worker" in r.getMessage() and rid in r.getMessage()
                   for r in caplog.records)  # fmt: skip


def test_an_unhealthy_worker_returns_once_health_answers():
    fake = FakeWorker("w1")
    server = ServerThread(fake.app())
    pool = pool_of(("agg-0", server.url))
    with frontend(pool) as fe:
        assert post(fe, "/v1/chat/completions", CHAT).status_code == 503
        assert not pool.workers()[0].healthy
        with server:
            deadline = time.monotonic() + 5
            while not pool.workers()[0].healthy and time.monotonic() < deadline:
                time.sleep(0.05)
            assert post(fe, "/v1/chat/completions", CHAT).status_code == 200


def test_least_outstanding_sends_to_the_idle_worker():
    busy, idle = FakeWorker("busy"), FakeWorker("idle")
    busy.gates = {1: threading.Event()}
    with ServerThread(busy.app()) as s1, ServerThread(idle.app()) as s2:
        pool = pool_of(("agg-0", s1.url), ("agg-1", s2.url))
        with frontend(pool, router="least_outstanding") as fe:
            with httpx.stream(
                "POST", fe.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
            ) as held:
                assert held.headers["x-dynkv-worker"] == "agg-0"
                lines = held.iter_lines()  # kept: a dropped iterator closes the stream
                next(lines)  # in flight on agg-0
                for _ in range(3):
                    r = post(fe, "/v1/chat/completions", CHAT)
                    assert r.headers["x-dynkv-worker"] == "agg-1"
                busy.gates[1].set()
                assert [line for line in lines if line][-1] == "data: [DONE]"
            assert pool.workers()[0].outstanding == 0


def test_a_stream_broken_mid_way_ends_with_an_error_event(worker):
    fake, server = worker
    fake.break_after = 1
    with frontend(pool_of(("agg-0", server.url))) as fe:
        with httpx.stream(
            "POST", fe.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
        ) as resp:
            lines = [line for line in resp.iter_lines() if line]
        assert "w1-0" in lines[0]
        last = json.loads(lines[-1].removeprefix("data: "))
        assert last["error"]["code"] == "stream_broken"
        assert sample(fe, "dynkv_frontend_errors_total", kind="stream_broken") == 1


def test_a_client_that_leaves_cancels_the_worker_request(worker):
    fake, server = worker
    fake.delay = 5.0
    with frontend(pool_of(("agg-0", server.url))) as fe:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=0.5)
        assert fake.disconnected.wait(5)
        deadline = time.monotonic() + 5
        while pool_outstanding(fe) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool_outstanding(fe) == 0


def pool_outstanding(fe: ServerThread) -> int:
    return sum(w.outstanding for w in fe.server.config.app.state.frontend.pool.workers())


def test_a_silent_worker_is_a_504(worker):
    fake, server = worker
    fake.delay = 3.0
    with frontend(pool_of(("agg-0", server.url)), request_timeout=0.3) as fe:
        resp = post(fe, "/v1/chat/completions", CHAT)
        assert resp.status_code == 504 and error_of(resp)["code"] == "upstream_timeout"
        assert pool_outstanding(fe) == 0
        assert "agg-0" not in resp.text
        # a timeout takes it out of rotation until its /health answers again (it does here)
        worker = fe.server.config.app.state.frontend.pool.workers()[0]
        deadline = time.monotonic() + 5
        while not worker.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.healthy
        assert sample(fe, "dynkv_frontend_errors_total", worker="agg-0", kind="timeout") == 1


def test_a_streaming_client_that_leaves_frees_the_worker(worker):
    fake, server = worker
    fake.gates = {1: threading.Event()}
    with frontend(pool_of(("agg-0", server.url))) as fe:
        body = {**CHAT, "stream": True}
        with httpx.stream("POST", fe.url + "/v1/chat/completions", json=body, timeout=10) as resp:
            lines = resp.iter_lines()
            assert "w1-0" in next(lines)
            assert pool_outstanding(fe) == 1
        deadline = time.monotonic() + 5  # closed mid-stream: the frontend lets go at once
        while pool_outstanding(fe) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool_outstanding(fe) == 0
        assert sample(fe, "dynkv_frontend_requests_total", status="499") == 1
    fake.gates[1].set()


def test_a_two_step_strategy_plugs_in_as_disagg_will():
    """The router's extension point, exercised the way the disaggregated strategy will use it:
    a prefill step whose answer is read by the strategy, then a decode step relayed to the
    client with what the prefill returned."""
    from dynkv.frontend.router import Aggregated, RouteContext, Strategy

    class TwoStep(Strategy):
        name = "two-step"

        def can_serve(self, pool, model):
            return bool(pool.workers(model, "prefill")) and bool(pool.workers(model, "decode"))

        async def serve(self, ctx: RouteContext, req):
            first = await ctx.open(req, "prefill", body=req.with_body(max_tokens=1, stream=False))
            params = {"from": json.loads(await first.read())["id"]}
            second = await ctx.open(req, "decode", body=req.with_body(kv_transfer_params=params))
            return ctx.relay(second, req)

    prefill, decode = FakeWorker("p"), FakeWorker("d")
    with ServerThread(prefill.app()) as sp, ServerThread(decode.app()) as sd:
        pool = pool_of(("prefill-0", sp.url), model="m", role="prefill")
        pool.put("/dynkv/t/workers/decode-1", registration("decode-1", sd.url, role="decode"))
        app = create_app(
            FrontendConfig(), pool=pool, discover=False, strategies=(Aggregated(), TwoStep())
        )
        with ServerThread(app) as fe:
            body = {**CHAT, "stream": True, "kv_transfer_params": {"forged": True}}
            with httpx.stream(
                "POST", fe.url + "/v1/chat/completions", json=body, timeout=10
            ) as resp:
                lines = [line for line in resp.iter_lines() if line]
            assert resp.headers["x-dynkv-worker"] == "decode-1" and "d-0" in lines[0]
            sent_to_prefill = json.loads(prefill.bodies[-1])
            assert sent_to_prefill["max_tokens"] == 1 and sent_to_prefill["stream"] is False
            assert "kv_transfer_params" not in sent_to_prefill  # the client's forgery is gone
            assert json.loads(decode.bodies[-1])["kv_transfer_params"] == {"from": "cmpl-p"}
            assert pool_outstanding(fe) == 0


def test_inputs_that_were_500s_are_answered(worker):
    """Found by tests/unit/frontend/test_frontend_fuzz.py: JSON nested deeper than the parser's
    stack was a 500 (RecursionError), a non-ASCII x-request-id was a 500 (httpx refuses non-ASCII
    str headers), and a non-ASCII API key could never match (latin-1 vs UTF-8)."""
    fake, server = worker
    with frontend(pool_of(("agg-0", server.url)), api_key="clé-secrète") as fe:
        auth = {"authorization": "Bearer clé-secrète".encode()}
        deep = post(fe, "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, headers=auth)
        assert deep.status_code == 400 and error_of(deep)["code"] == "invalid_json"
        odd_id = {**auth, "x-request-id": "req-é-1".encode("latin-1")}
        resp = post(fe, "/v1/chat/completions", CHAT, headers=odd_id)
        assert resp.status_code == 200, resp.text
        assert fake.headers[-1]["x-request-id"] == "req-é-1"  # passed on byte for byte
        wrong = post(
            fe, "/v1/chat/completions", CHAT, headers={"authorization": "Bearer clé".encode()}
        )
        assert wrong.status_code == 401
