"""What bounds the frontend and what it tells a stranger: body size (413), concurrency (503 with
Retry-After), the max_tokens ceiling (400), request ids on every error, /health without detail
unless the caller has the key, the worker key sent upstream; and its typed settings (environment,
command line, one set of defaults) with the non-loopback rule."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from frontend_support import FakeWorker, ServerThread, pool_of

from dynkv.frontend import create_app
from dynkv.frontend.config import FrontendConfig, parse_args, plaintext_key_warning
from dynkv.worker.record import worker_api_key

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ETCD = ["--etcd-endpoints", "http://127.0.0.1:2379"]


@pytest.fixture
def worker():
    fake = FakeWorker("w1")
    with ServerThread(fake.app()) as server:
        yield fake, server


def frontend(url: str, **config) -> ServerThread:
    cfg = FrontendConfig(health_interval=0.1, **config)
    return ServerThread(create_app(cfg, pool=pool_of(("agg-0", url)), discover=False))


def test_a_body_over_the_limit_is_413_declared_or_streamed(worker):
    fake, server = worker
    with frontend(server.url, max_body_bytes=1000) as fe:
        url = fe.url + "/v1/chat/completions"
        big = json.dumps({**CHAT, "pad": "x" * 2000}).encode()
        resp = httpx.post(url, content=big, timeout=10)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: chunked, refused while reading
            for _ in range(40):
                yield b" " * 100

        resp = httpx.post(url, content=chunks(), timeout=10)
        assert resp.status_code == 413
        assert fake.bodies == []  # nothing reached the worker
        assert httpx.post(url, json=CHAT, timeout=10).status_code == 200


def test_over_max_concurrency_is_a_503_with_retry_after(worker):
    fake, server = worker
    fake.gates = {0: threading.Event()}
    with frontend(server.url, max_concurrency=1) as fe:
        body = {**CHAT, "stream": True}
        with httpx.Client(timeout=10) as held:
            holder = threading.Thread(
                target=lambda: held.post(fe.url + "/v1/chat/completions", json=body)
            )
            holder.start()
            try:
                for _ in range(100):
                    if fake.bodies:
                        break
                    threading.Event().wait(0.05)
                resp = httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10)
                assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
                assert resp.json()["error"]["code"] == "overloaded"
            finally:
                fake.gates[0].set()
                holder.join(10)
        assert httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200


def test_max_tokens_over_the_ceiling_is_400_naming_it(worker):
    fake, server = worker
    with frontend(server.url, max_tokens_limit=100) as fe:
        for field in ("max_tokens", "max_completion_tokens"):
            resp = httpx.post(
                fe.url + "/v1/chat/completions", json={**CHAT, field: 101}, timeout=10
            )
            err = resp.json()["error"]
            assert resp.status_code == 400 and err["param"] == field
            assert err["code"] == "max_tokens_too_large" and "100" in err["message"]
        ok = httpx.post(fe.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 100})
        assert ok.status_code == 200 and len(fake.bodies) == 1


def test_health_says_only_ok_without_the_key_and_errors_carry_a_request_id(worker):
    _fake, server = worker
    with frontend(server.url, api_key="k") as fe:
        assert httpx.get(fe.url + "/health", timeout=5).json() == {"status": "ok"}
        auth = {"authorization": "Bearer k"}
        full = httpx.get(fe.url + "/health", headers=auth, timeout=5).json()
        assert full["workers"] == 1 and full["models"] == ["m"]
        for resp in (
            httpx.get(fe.url + "/v1/models", timeout=5),  # 401
            httpx.get(fe.url + "/nope", headers=auth, timeout=5),  # 404
            httpx.post(fe.url + "/v1/completions", content=b"{", headers=auth, timeout=5),
        ):
            rid = resp.json()["error"]["request_id"]
            assert len(rid) == 32 and resp.headers["x-request-id"] == rid
        mine = {**auth, "x-request-id": "trace-1"}
        resp = httpx.post(fe.url + "/v1/completions", content=b"{", headers=mine, timeout=5)
        assert resp.json()["error"]["request_id"] == "trace-1"


def test_the_worker_key_is_sent_to_workers_and_the_secret_never(worker):
    fake, server = worker
    with frontend(server.url, deployment_secret="s" * 64) as fe:
        assert httpx.post(fe.url + "/v1/chat/completions", json=CHAT, timeout=10).is_success
    assert fake.headers[-1]["authorization"] == f"Bearer {worker_api_key('s' * 64)}"
    assert "s" * 64 not in json.dumps(fake.headers)


# ---- settings -----------------------------------------------------------------------------------


def test_settings_come_from_env_and_argv_with_one_set_of_defaults(tmp_path):
    defaults = parse_args(ETCD, {})
    assert defaults.max_body_bytes == FrontendConfig().max_body_bytes == 16 * 1024 * 1024
    assert defaults.request_timeout == FrontendConfig.model_fields["request_timeout"].default
    env = {
        "DYNKV_FRONTEND_MAX_CONCURRENCY": "7",
        "DYNKV_FRONTEND_MAX_TOKENS_LIMIT": "64",
        "DYNKV_FRONTEND_PORT": "9001",
        "DYNKV_DEPLOYMENT_SECRET": "s3cr3t-v4lue",
    }
    cfg = parse_args([*ETCD, "--port", "9002"], env)
    assert (cfg.max_concurrency, cfg.max_tokens_limit, cfg.port) == (7, 64, 9002)  # argv wins
    assert cfg.deployment_secret == "s3cr3t-v4lue" and "s3cr3t" not in repr(cfg)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert parse_args([*ETCD, "--api-key-file", str(key_file)], {}).api_key == "from-file"
    for bad in (["--max-body-bytes", "0"], ["--deployment-secret", "x"], ["--api-key", "x"]):
        with pytest.raises(SystemExit):
            parse_args([*ETCD, *bad], {})
    with pytest.raises(SystemExit):
        parse_args(ETCD, {"DYNKV_FRONTEND_MAX_CONCURRENCY": "none"})


def test_a_non_loopback_bind_needs_a_key_or_insecure(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        parse_args([*ETCD, "--host", "0.0.0.0"], {})
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "without an API key" in err and "--insecure" in err and "not loopback" in err
    assert parse_args([*ETCD, "--host", "0.0.0.0", "--insecure"], {}).insecure
    keyed = parse_args([*ETCD, "--host", "0.0.0.0"], {"DYNKV_API_KEY": "k"})
    assert "plaintext" in (plaintext_key_warning(keyed) or "")
    assert parse_args([*ETCD, "--host", "::1"], {}).loopback
    with pytest.raises(SystemExit):
        parse_args([*ETCD, "--tls-cert", str(tmp_path / "c.pem")], {})
    tls = parse_args(
        [*ETCD, "--host", "0.0.0.0", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
        {"DYNKV_API_KEY": "k"},
    )
    assert plaintext_key_warning(tls) is None
