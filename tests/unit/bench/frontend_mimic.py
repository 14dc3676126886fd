"""A small real HTTP server standing in for the dynkv frontend at its own boundary, for the router
comparison's tests: OpenAI streaming chat completions, `/v1/models`, and a Prometheus `/metrics`
with the frontend's router families (`dynkv.router_metrics`), written by prometheus-client.

Honest on what the comparison measures: each request is routed by the policy its
`x-dynkv-router` header names over two workers (round robin in turn; least outstanding to the idle
worker; session by a hash of `x-session-id`; kv to a worker that already holds the request's
salted prefix), a worker "holds" a prefix (its cache salt + system prompt) once it served it, and
the cached tokens it reports are that prefix's words. Nothing else is simulated.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dynkv.ports import free_port

WORKERS = ("agg-0", "agg-1")


@dataclass
class Seen:
    router: str | None
    session: str | None
    salt: str | None
    worker: str
    cached: int


@dataclass
class FrontendMimic:
    router_metrics: bool = True  # False: an older frontend without the router families
    predicts: bool = True  # False: no predicted/actual counters
    api_key: str | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.turn = 0
        self.held: dict[str, set[tuple[str | None, str]]] = {w: set() for w in WORKERS}
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "dynkv_frontend_requests", "", ["model", "worker", "endpoint", "status"], registry=r
        )
        if self.router_metrics:
            self.decisions = Counter("dynkv_router_decisions", "", ["policy", "reason"], registry=r)
            self.routed = Counter("dynkv_router_routed", "", ["policy", "worker"], registry=r)
            self.decision_s = Histogram("dynkv_router_decision_seconds", "", ["policy"], registry=r)
            self.blocks = Gauge("dynkv_router_index_blocks", "", registry=r)
            self.bytes = Gauge("dynkv_router_index_bytes", "", registry=r)
            self.fallbacks = Counter("dynkv_router_nats_fallbacks", "", registry=r)
            if self.predicts:
                self.predicted = Counter(
                    "dynkv_router_predicted_cached_tokens", "", ["worker"], registry=r
                )
                self.actual = Counter(
                    "dynkv_router_actual_cached_tokens", "", ["worker"], registry=r
                )

    def route(self, policy: str | None, session: str | None, prefix: tuple) -> tuple[str, str]:
        if policy == "session" and session:
            digest = hashlib.blake2b(session.encode(), digest_size=8).digest()
            return WORKERS[digest[0] % len(WORKERS)], "session"
        if policy == "kv":
            holders = [w for w in WORKERS if prefix in self.held[w]]
            if holders:
                return holders[0], "kv_hit"
        self.turn += 1
        reason = "fewest_outstanding" if policy == "least_outstanding" else "turn"
        return WORKERS[self.turn % len(WORKERS)], reason

    def serve_chat(self, headers, body: dict) -> tuple[str, int]:
        policy = headers.get("x-dynkv-router")
        session = headers.get("x-session-id")
        salt = body.get("cache_salt")
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        prefix = (salt, system)
        with self.lock:
            worker, reason = self.route(policy, session, prefix)
            cached = len(system.split()) if prefix in self.held[worker] else 0
            self.held[worker].add(prefix)
            self.seen.append(Seen(policy, session, salt, worker, cached))
            self.requests.labels("fake-model", worker, "chat", "200").inc()
            if self.router_metrics:
                self.decisions.labels(policy or "round_robin", reason).inc()
                self.routed.labels(policy or "round_robin", worker).inc()
                self.decision_s.labels(policy or "round_robin").observe(0.0004)
                self.blocks.set(sum(len(h) for h in self.held.values()))
                self.bytes.set(64 * sum(len(h) for h in self.held.values()))
                if self.predicts and policy == "kv":  # as the frontend: kv-routed requests only
                    self.actual.labels(worker).inc(cached)
                    self.predicted.labels(worker).inc(cached)
        return worker, cached


def _handler(mimic: FrontendMimic):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if mimic.api_key is None or self.headers.get("authorization") == (
                f"Bearer {mimic.api_key}"
            ):
                return True
            self._send(401, b'{"error": {"message": "Incorrect API key provided."}}')
            return False

        def do_GET(self):
            if not self._authorized():
                return
            if self.path == "/metrics":
                self._send(200, generate_latest(mimic.registry), "text/plain; version=0.0.4")
            elif self.path == "/v1/models":
                self._send(200, json.dumps({"data": [{"id": "fake-model"}]}).encode())
            else:
                self._send(404, b'{"detail": "Not Found"}')

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if not self._authorized():
                return
            worker, cached = mimic.serve_chat(self.headers, body)
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            n = min(2, body["max_tokens"])
            for i in range(n):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"{worker}-{i} "}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            usage = {
                "prompt_tokens": 50,
                "completion_tokens": n,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


class Serving:
    """`with Serving(mimic) as url:` the mimic on a free loopback port; over https with
    `tls=(cert file, key file)`, as an advertised deployment's frontend serves."""

    def __init__(self, mimic: FrontendMimic, tls: tuple[str, str] | None = None) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(mimic))
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
