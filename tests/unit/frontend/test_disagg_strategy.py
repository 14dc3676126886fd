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
