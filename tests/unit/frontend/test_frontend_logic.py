"""The frontend's pure parts: request checks, the worker pool, the routing policies, and
discovery against a scripted etcd (list, watch, errors, compaction) — no sockets."""

from __future__ import annotations

import asyncio
import json

import pytest
from frontend_support import pool_of, registration

from dynkv.frontend.config import parse_args
from dynkv.frontend.discovery import Discovery, workers_prefix
from dynkv.frontend.errors import ApiError
from dynkv.frontend.policy import Choice, LeastOutstanding, RoundRobin, make_policy
from dynkv.frontend.pool import Worker, WorkerPool
from dynkv.frontend.protocol import parse_request
from dynkv.infra.etcd_client import (
    EtcdCompacted,
    EtcdUnavailable,
    KeyValue,
    RangeResult,
    WatchEvent,
)

# ---- protocol ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "raw", "param", "code"),
    [
        ("chat", b"{not json", None, "invalid_json"),
        ("chat", b"[1, 2]", None, "invalid_json"),
        ("chat", b'{"messages": []}', "model", "missing_required_parameter"),
        ("chat", b'{"model": 3, "messages": []}', "model", "invalid_type"),
        ("chat", b'{"model": "m"}', "messages", "missing_required_parameter"),
        ("chat", b'{"model": "m", "messages": "hi"}', "messages", "invalid_type"),
        ("completions", b'{"model": "m"}', "prompt", "missing_required_parameter"),
        ("completions", b'{"model": "m", "prompt": null}', "prompt", "missing_required_parameter"),
    ],
)
def test_malformed_requests_are_400_with_openai_fields(endpoint, raw, param, code):
    with pytest.raises(ApiError) as info:
        parse_request(endpoint, raw)
    err = info.value
    assert err.status == 400 and err.param == param and err.code == code
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["message"]


def test_a_valid_request_keeps_its_bytes_and_reads_stream():
    raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
    req = parse_request("chat", raw, request_id="r1")
    assert (req.model, req.stream, req.raw, req.path) == ("m", True, raw, "/v1/chat/completions")
    assert parse_request("completions", b'{"model":"m","prompt":"x","stream":1}').stream is False
    assert req.forward_body() is raw
    rewritten = json.loads(req.with_body(max_tokens=1, stream=False))
    assert rewritten["max_tokens"] == 1 and rewritten["stream"] is False
    assert rewritten["messages"] == [{"role": "user", "content": "hi"}]


def test_a_clients_kv_transfer_params_never_reach_a_worker():
    raw = b'{"model":"m","prompt":"x","kv_transfer_params":{"dynkv":{"consume":[1]}}}'
    req = parse_request("completions", raw)
    assert json.loads(req.forward_body()) == {"model": "m", "prompt": "x"}
    assert "kv_transfer_params" not in json.loads(req.with_body(max_tokens=1))
    mine = json.loads(req.with_body(kv_transfer_params={"dynkv": {"produce": True}}))
    assert mine["kv_transfer_params"] == {"dynkv": {"produce": True}}


# ---- pool ----------------------------------------------------------------------------------------


def test_registration_records_are_parsed_and_bad_ones_ignored():
    pool = WorkerPool()
    key = "/dynkv/t/workers/agg-0"
    worker = pool.put(key, json.dumps(registration("agg-0", "http://h:1/")).encode())
    assert worker is not None and worker.url == "http://h:1" and worker.role == "agg"
    assert pool.models() == ["m"] and pool.knows("m")
    assert pool.put("/dynkv/t/workers/x", b"not json") is None
    assert pool.put("/dynkv/t/workers/y", {"url": "http://h:2"}) is None  # no model
    assert pool.put("/dynkv/t/workers/z", {**registration("z", "http://h"), "role": "boss"}) is None
    assert [w.id for w in pool.workers()] == ["agg-0"]


def test_a_model_stays_known_after_its_last_worker_leaves():
    pool = pool_of(("agg-0", "http://h:1"))
    pool.expect(["planned"])
    pool.remove("/dynkv/t/workers/agg-0")
    assert pool.models() == [] and pool.knows("m") and pool.knows("planned")
    assert not pool.knows("other")


def test_reregistration_keeps_inflight_and_makes_healthy_again():
    pool = pool_of(("agg-0", "http://h:1"))
    (worker,) = pool.workers()
    lease = pool.acquire(worker)
    pool.mark_unhealthy(worker, "refused")
    assert pool.healthy("m", "agg") == []
    fresh = pool.put(worker.key, {**registration("agg-0", "http://h:1"), "pid": 2})
    assert fresh is not None and fresh.healthy and fresh.outstanding == 1
    lease.release()
    lease.release()  # idempotent
    assert worker.outstanding == 0


def test_replace_is_the_whole_truth():
    pool = pool_of(("a", "http://h:1"), ("b", "http://h:2"))
    (a, b) = pool.workers()
    pool.mark_unhealthy(a, "refused")
    pool.replace({a.key: json.dumps(registration("a", "http://h:1")).encode()})
    assert [w.id for w in pool.workers()] == ["a"]
    assert pool.workers()[0] is a and not a.healthy  # unchanged record: our judgement stays


def test_healthy_excludes_tried_and_filters_role():
    pool = pool_of(("a", "http://h:1"), ("b", "http://h:2"))
    pool.put("/dynkv/t/workers/p", registration("p", "http://h:3", role="prefill"))
    assert [w.id for w in pool.healthy("m", "agg")] == ["a", "b"]
    assert [w.id for w in pool.healthy("m", "agg", exclude=["/dynkv/t/workers/a"])] == ["b"]
    assert [w.id for w in pool.healthy("m", "prefill")] == ["p"]


# ---- policies ------------------------------------------------------------------------------------


def _workers(*ids: str) -> list[Worker]:
    return pool_of(*((i, f"http://h/{i}") for i in ids)).workers()


def test_round_robin_cycles_and_survives_changes():
    rr = RoundRobin()
    a, b, c = _workers("a", "b", "c")
    assert [rr.pick([a, b, c]).worker.id for _ in range(4)] == ["a", "b", "c", "a"]
    assert rr.pick([a, c]).worker.id == "c"  # after a comes the next one present
    assert rr.pick([b]) == Choice(b, "turn")
    assert rr.pick([]) is None


def test_least_outstanding_prefers_idle_and_rotates_ties():
    lo = LeastOutstanding()
    a, b, c = _workers("a", "b", "c")
    a.outstanding, b.outstanding, c.outstanding = 2, 0, 0
    assert [lo.pick([a, b, c]).worker.id for _ in range(3)] == ["b", "c", "b"]
    c.outstanding = 5
    assert lo.pick([a, b, c]) == Choice(b, "fewest_outstanding")


def test_make_policy_names():
    assert make_policy("round_robin").name == "round_robin"
    assert make_policy("least_outstanding").name == "least_outstanding"
    assert make_policy("session").name == "session"
    with pytest.raises(ValueError, match="unknown router"):
        make_policy("random")


def test_frontend_args_and_api_key_from_env_only():
    cfg = parse_args(
        ["--deployment", "d", "--etcd-endpoints", "http://a:1, http://b:2", "--model", "m"],
        {"DYNKV_API_KEY": "s3cret", "DYNKV_ROUTER": "least_outstanding"},
    )
    assert cfg.etcd_endpoints == ("http://a:1", "http://b:2") and cfg.models == ("m",)
    assert cfg.router == "least_outstanding" and cfg.api_key == "s3cret"
    assert "s3cret" not in repr(cfg)
    assert parse_args(["--etcd-endpoints", "http://a:1", "--router", "round_robin"], {}).router == (
        "round_robin"
    )
    with pytest.raises(SystemExit):
        parse_args(["--etcd-endpoints", "http://a:1", "--api-key", "x"], {})
    with pytest.raises(SystemExit):
        parse_args(["--etcd-endpoints", "http://a:1"], {"DYNKV_ROUTER": "random"})


# ---- discovery -----------------------------------------------------------------------------------

PREFIX = workers_prefix("t")


def _kv(worker_id: str, url: str, rev: int) -> KeyValue:
    value = json.dumps(registration(worker_id, url)).encode()
    return KeyValue(PREFIX + worker_id, value, lease=1, mod_revision=rev)


def _event(kind: str, worker_id: str, rev: int, url: str = "http://h") -> WatchEvent:
    kv = _kv(worker_id, url, rev)
    value = kv.value if kind == "PUT" else b""
    return WatchEvent(kind, kv.key, value, rev, kv)


class ScriptedEtcd:
    """Each listing is (kvs, revision) or an exception; each watch yields its events, then
    raises its exception if it has one, else stays quiet (and `done` is set). Records the start
    revision of every watch."""

    def __init__(self, listings, watches) -> None:
        self.listings, self.watches = list(listings), list(watches)
        self.starts: list[int | None] = []
        self.done = asyncio.Event()

    async def get_prefix(self, prefix: str) -> RangeResult:
        assert prefix == PREFIX
        item = self.listings.pop(0)
        if isinstance(item, Exception):
            raise item
        kvs, rev = item
        return RangeResult(kvs, rev)

    async def watch_prefix(self, prefix: str, *, start_revision=None):
        self.starts.append(start_revision)
        script = self.watches.pop(0) if self.watches else []
        for item in script:
            if isinstance(item, Exception):
                raise item
            yield item
        self.done.set()
        await asyncio.Event().wait()  # then quiet, as a healthy watch is


def _run_discovery(etcd: ScriptedEtcd, pool: WorkerPool) -> Discovery:
    async def go() -> Discovery:
        discovery = Discovery(etcd, PREFIX, pool, backoff=0.01, max_backoff=0.02)
        task = asyncio.create_task(discovery.run())
        await asyncio.wait_for(etcd.done.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return discovery

    return asyncio.run(go())


def test_discovery_lists_then_watches_from_the_next_revision():
    etcd = ScriptedEtcd(
        listings=[([_kv("agg-0", "http://h:1", 5)], 7)],
        watches=[[_event("PUT", "agg-1", 8), _event("DELETE", "agg-0", 9)]],
    )
    pool = WorkerPool()
    _run_discovery(etcd, pool)
    assert etcd.starts[0] == 8
    assert [w.id for w in pool.workers()] == ["agg-1"] and pool.synced


def test_discovery_relists_after_errors_and_compaction():
    etcd = ScriptedEtcd(
        listings=[
            ([_kv("agg-0", "http://h:1", 5)], 5),
            EtcdUnavailable("etcd down"),
            ([_kv("agg-2", "http://h:3", 20)], 20),  # agg-0 vanished while we were away
            ([_kv("agg-2", "http://h:3", 20), _kv("agg-3", "http://h:4", 30)], 30),
        ],
        watches=[
            [_event("PUT", "agg-1", 6), EtcdUnavailable("watch lost")],
            [EtcdCompacted(25)],
        ],
    )
    pool = WorkerPool()
    discovery = _run_discovery(etcd, pool)
    assert etcd.starts == [6, 21, 31]
    assert [w.id for w in pool.workers()] == ["agg-2", "agg-3"]
    assert discovery.resyncs == 3


def test_probe_access_lines_are_dropped_from_the_log():
    import logging

    from dynkv.frontend.logs import QuietProbes

    def line(method: str, path: str) -> logging.LogRecord:
        args = ("127.0.0.1:1", method, path, "1.1", 200)
        return logging.LogRecord("uvicorn.access", 20, "", 0, '%s - "%s %s HTTP/%s" %d', args, None)

    quiet = QuietProbes()
    assert not quiet.filter(line("GET", "/health"))
    assert not quiet.filter(line("GET", "/metrics?x=1"))
    assert quiet.filter(line("POST", "/v1/chat/completions"))
    assert quiet.filter(line("GET", "/v1/models"))


def test_the_frontend_docs_document_its_options_and_metrics():
    from pathlib import Path

    from dynkv.frontend.config import parser

    root = Path(__file__).resolve().parents[3]
    readme = "\n".join(p.read_text() for p in [root / "README.md", *root.glob("docs/*.md")])
    options = [o for a in parser()._actions for o in a.option_strings if o.startswith("--")]
    missing = [o for o in options if o != "--help" and o not in readme]
    assert missing == []
    for metric in ("dynkv_frontend_ttft_seconds", "dynkv_frontend_requests_total"):
        assert metric in readme


def test_the_kvbm_runtime_never_imports_the_frontend():
    """dynkv.kvbm runs inside vLLM; the frontend outside it. The dependency goes one way only."""
    import ast
    from pathlib import Path

    import dynkv.kvbm

    offenders = []
    for path in Path(dynkv.kvbm.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("dynkv.frontend")]
    assert offenders == []
