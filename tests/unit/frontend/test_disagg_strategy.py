"""The disaggregated strategy against fake prefill and decode workers over real sockets: the two
steps, what each worker receives, and prefill failures (503, fallback, errors passed through)."""

from __future__ import annotations

import contextlib
import json

import httpx
from frontend_support import FakeWorker, ServerThread, dead_url, pool_of, registration

from dynkv.frontend import create_app
from dynkv.frontend.config import FrontendConfig

HANDOFF = {"dynkv": {"fingerprint": "ab", "block_size": 32, "slots": [4, 5], "expires": 9e9}}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def disagg_pool(prefill_url: str, decode_url: str):
    pool = pool_of(("prefill-0", prefill_url), model="m", role="prefill")
    pool.put("/dynkv/t/workers/decode-1", registration("decode-1", decode_url, role="decode"))
    return pool


@contextlib.contextmanager
def disagg(prefill: FakeWorker | None, decode: FakeWorker, **config):
    """A frontend over a prefill worker (None: registered but unreachable) and a decode worker."""
    with contextlib.ExitStack() as stack:
        sp = stack.enter_context(ServerThread(prefill.app())).url if prefill else dead_url()
        sd = stack.enter_context(ServerThread(decode.app())).url
        app = create_app(FrontendConfig(**config), pool=disagg_pool(sp, sd), discover=False)
        yield stack.enter_context(ServerThread(app))


def test_prefill_then_decode_with_the_handoff():
    prefill, decode = FakeWorker("p", transfer_params=HANDOFF), FakeWorker("d")
    with disagg(prefill, decode) as fe:
        body = {
            **CHAT,
            "stream": True,
            "stream_options": {"include_usage": True},
            "kv_transfer_params": {"dynkv": {"slots": [0]}},  # a client's forgery
        }
        with httpx.stream("POST", fe.url + "/v1/chat/completions", json=body, timeout=10) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and r.headers["x-dynkv-worker"] == "decode-1"
        assert "d-0" in lines[0]
        to_prefill = json.loads(prefill.bodies[-1])
        assert to_prefill["max_tokens"] == 1 and to_prefill["stream"] is False
        assert to_prefill["kv_transfer_params"] == {"dynkv": {"produce": True}}
        assert "stream_options" not in to_prefill
        to_decode = json.loads(decode.bodies[-1])
        assert to_decode["kv_transfer_params"] == HANDOFF  # the prefill's, not the client's
        assert to_decode["stream"] is True and to_decode["max_tokens"] == 8


def test_over_nixl_prefill_asks_for_a_remote_decode_and_decode_gets_its_answer():
    nixl_answer = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "e1",
        "remote_block_ids": [3, 4],
        "remote_host": "127.0.0.1",
        "remote_port": 5600,
    }
    prefill, decode = FakeWorker("p", transfer_params=nixl_answer), FakeWorker("d")
    with disagg(prefill, decode, disagg_transfer="nixl") as fe:
        r = httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200 and r.headers["x-dynkv-worker"] == "decode-1"
    to_prefill = json.loads(prefill.bodies[-1])["kv_transfer_params"]
    assert to_prefill["do_remote_decode"] is True and to_prefill["do_remote_prefill"] is False
    assert "dynkv" not in to_prefill
    assert json.loads(decode.bodies[-1])["kv_transfer_params"] == nixl_answer


def test_completions_too():
    prefill, decode = FakeWorker("p", transfer_params=HANDOFF), FakeWorker("d")
    with disagg(prefill, decode) as fe:
        r = httpx.post(fe.url + "/v1/completions", json={"model": "m", "prompt": "x"}, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello from d"
        assert json.loads(decode.bodies[-1])["kv_transfer_params"] == HANDOFF


def test_prefill_down_is_a_503_whose_log_names_the_fallback(caplog):
    decode = FakeWorker("d")
    with disagg(None, decode) as fe:
        r = httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "no_worker_available" and "prefill-0" not in r.text
        logged = [m.getMessage() for m in caplog.records if error["request_id"] in m.getMessage()]
        assert "prefill" in logged[0] and "DYNKV_DISAGG_FALLBACK" in logged[0]
        assert decode.bodies == []


def test_fallback_lets_decode_serve_alone():
    decode = FakeWorker("d")
    with disagg(None, decode, disagg_fallback=True) as fe:
        r = httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200 and r.headers["x-dynkv-worker"] == "decode-1"
        assert "kv_transfer_params" not in json.loads(decode.bodies[-1])


def test_a_prefill_error_is_the_answer():
    too_long = {"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}}
    prefill, decode = FakeWorker("p", fail=(400, too_long)), FakeWorker("d")
    with disagg(prefill, decode) as fe:
        r = httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 400 and r.json() == too_long
        assert decode.bodies == []


def test_no_handoff_in_the_answer_still_decodes():
    prefill, decode = FakeWorker("p"), FakeWorker("d")
    with disagg(prefill, decode) as fe:
        r = httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200
        assert "kv_transfer_params" not in json.loads(decode.bodies[-1])


def _pool_handoff(pool: str) -> dict:
    return {"dynkv": {**HANDOFF["dynkv"], "pool": pool}}


def test_the_policy_picks_among_several_prefill_workers_and_decode_gets_each_ones_pool():
    """Two prefill workers, each with its own handoff pool: round robin takes them in turn,
    and the decode worker receives the pool id of the one that prefilled (docs/disagg.md)."""
    prefills = [FakeWorker(f"p{i}", transfer_params=_pool_handoff(f"prefill-{i}")) for i in (0, 1)]
    decode = FakeWorker("d")
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(ServerThread(p.app())).url for p in prefills]
        pool = pool_of(("prefill-0", urls[0]), ("prefill-1", urls[1]), model="m", role="prefill")
        sd = stack.enter_context(ServerThread(decode.app())).url
        pool.put("/dynkv/t/workers/decode-0", registration("decode-0", sd, role="decode"))
        app = create_app(FrontendConfig(router="round_robin"), pool=pool, discover=False)
        fe = stack.enter_context(ServerThread(app))
        for _ in range(4):
            r = httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10)
            assert r.status_code == 200 and r.headers["x-dynkv-worker"] == "decode-0"
    assert [len(p.bodies) for p in prefills] == [2, 2]
    pools = [json.loads(b)["kv_transfer_params"]["dynkv"]["pool"] for b in decode.bodies]
    assert sorted(pools) == ["prefill-0", "prefill-0", "prefill-1", "prefill-1"]
    assert pools[0] != pools[1]  # in turn


def test_a_prefill_worker_down_leaves_the_other_to_serve():
    prefill, decode = FakeWorker("p1", transfer_params=_pool_handoff("prefill-1")), FakeWorker("d")
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(ServerThread(prefill.app())).url
        pool = pool_of(("prefill-0", dead_url()), ("prefill-1", up), model="m", role="prefill")
        sd = stack.enter_context(ServerThread(decode.app())).url
        pool.put("/dynkv/t/workers/decode-0", registration("decode-0", sd, role="decode"))
        app = create_app(FrontendConfig(), pool=pool, discover=False)
        fe = stack.enter_context(ServerThread(app))
        for _ in range(2):
            r = httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10)
            assert r.status_code == 200
    assert len(prefill.bodies) == 2
    assert all(
        json.loads(b)["kv_transfer_params"]["dynkv"]["pool"] == "prefill-1" for b in decode.bodies
    )
