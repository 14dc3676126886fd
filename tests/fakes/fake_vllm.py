"""A stand-in for `python -m vllm.entrypoints.openai.api_server` in fast tests.

Accepts vLLM's flags (ignoring the ones it does not need), serves `/health`, `/v1/models`,
`/v1/chat/completions` and `/v1/completions` (streamed or not; the text names the port, so a test
sees which worker answered; a prompt containing FAIL_400 gets vLLM's 400) on --port, and, like
the KVBM runtime inside a real worker, `kvbm_*` Prometheus metrics on DYN_KVBM_METRICS_PORT. `--exit-after S --exit-code N` makes it die on its own; `--ready-after S`
delays /health (FAKE_VLLM_READY_AFTER sets it through a plan, which passes no such flag);
FAKE_VLLM_SPAWN_ORPHAN=1 starts a grandchild in a new session (a process that escapes the process
group, which teardown must still find). FAKE_VLLM_TOKENS=N streams N chunks and
FAKE_VLLM_TOKEN_DELAY=S waits S seconds before each, so a stream lasts long enough to be cut by
a fault. Like vLLM (its AuthenticationMiddleware), with VLLM_API_KEY set (or --api-key) every
path under /v1, /v2, /inference and /cohere needs `Authorization: Bearer <key>` (else 401
{"error": "Unauthorized"}); /health and /metrics stay open.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--served-model-name", default="fake")
    p.add_argument(
        "--ready-after", type=float, default=float(os.environ.get("FAKE_VLLM_READY_AFTER", "0"))
    )
    p.add_argument("--exit-after", type=float, default=None)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--api-key", default=None)
    # vLLM's HTTPS (an advertised deployment, docs/multi-host.md)
    p.add_argument("--ssl-certfile", default=None)
    p.add_argument("--ssl-keyfile", default=None)
    args, _ = p.parse_known_args()
    api_key = args.api_key or os.environ.get("VLLM_API_KEY") or None
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 with chunked streams, as vLLM's uvicorn answers: a worker that dies mid-stream
        # leaves an incomplete chunked body, which the frontend can tell from a finished one
        # (an HTTP/1.0 body that ends when the connection closes always looks complete).
        protocol_version = "HTTP/1.1"

        def _start(self, status, ctype=None, length=None):
            self.send_response(status)
            if ctype:
                self.send_header("content-type", ctype)
            if length is None:
                self.send_header("transfer-encoding", "chunked")
            else:
                self.send_header("content-length", str(length))
            self.send_header("connection", "close")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _refused(self) -> bool:
            """vLLM's rule: a guarded path without the bearer key is a 401."""
            if not api_key or not self.path.startswith(("/v1", "/v2", "/inference", "/cohere")):
                return False
            scheme, _, token = (self.headers.get("authorization") or "").partition(" ")
            if scheme.lower() == "bearer" and token == api_key:
                return False
            self._json(401, {"error": "Unauthorized"})
            return True

        def do_GET(self):  # noqa: N802
            if self._refused():
                return
            if self.path == "/health":
                ok = time.monotonic() - started >= args.ready_after
                self._start(200 if ok else 503, length=0)
            elif self.path == "/v1/models":
                self._json(200, {"data": [{"id": args.served_model_name}]})
            else:
                self._start(404, length=0)

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("content-length") or 0)
            if self._refused():
                self.rfile.read(length)
                return
            body = json.loads(self.rfile.read(length) or b"{}")
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                self._start(404, length=0)
                return
            if "FAIL_400" in json.dumps(body.get("messages") or body.get("prompt")):
                self._json(400, {"error": {"message": "too long", "type": "BadRequestError",
                                           "param": None, "code": 400}})  # fmt: skip
                return
            text = f"fake answer from {args.port}"
            if not body.get("stream"):
                choice = (
                    {"index": 0, "message": {"role": "assistant", "content": text}}
                    if chat
                    else {"index": 0, "text": text}
                )
                self._json(200, {"id": f"fake-{args.port}", "model": body.get("model"),
                                 "object": "chat.completion" if chat else "text_completion",
                                 "choices": [{**choice, "finish_reason": "stop"}]})  # fmt: skip
                return
            self._start(200, "text/event-stream")
            tokens = int(os.environ.get("FAKE_VLLM_TOKENS", "0")) or len(text.split())
            delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY", "0"))
            words = (text.split() * tokens)[:tokens]
            for word in words:
                time.sleep(delay)
                delta = {"delta": {"content": word + " "}} if chat else {"text": word + " "}
                event = {"id": f"fake-{args.port}", "choices": [{"index": 0, **delta}]}
                self._chunk(f"data: {json.dumps(event)}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

        def _json(self, status, data):
            raw = json.dumps(data).encode()
            self._start(status, "application/json", len(raw))
            self.wfile.write(raw)

        def log_message(self, fmt, *a):
            print("fake_vllm:", fmt % a, flush=True)

    if os.environ.get("DYN_KVBM_METRICS") == "true":
        reg = CollectorRegistry()
        Gauge("kvbm_host_cache_hit_rate", "h", registry=reg).set(0.25)
        Gauge("kvbm_host_blocks_used", "u", registry=reg).set(3)
        Gauge("kvbm_host_blocks_total", "t", registry=reg).set(100)
        Counter("kvbm_matched_tokens", "m", registry=reg).inc(64)
        start_http_server(int(os.environ["DYN_KVBM_METRICS_PORT"]), "127.0.0.1", registry=reg)

    if os.environ.get("FAKE_VLLM_SPAWN_ORPHAN") == "1":
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
        )

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    if args.ssl_certfile:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    if args.exit_after is not None:
        threading.Timer(args.exit_after, lambda: os._exit(args.exit_code)).start()
    print(f"fake_vllm: serving {args.served_model_name} on {args.port}", flush=True)
    server.serve_forever(poll_interval=0.1)
    print("fake_vllm: shut down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
