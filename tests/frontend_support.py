"""In-process servers for the frontend tests: a scriptable fake worker (an OpenAI server in the
shape vLLM answers), a socket that drops every connection, and a thread that runs any ASGI app
under uvicorn on a real loopback port (streaming cannot be observed through an in-memory
transport, which buffers whole responses)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dynkv.frontend.pool import WorkerPool
from dynkv.ports import free_port


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:`port` from a daemon thread (its own event loop)."""

    def __init__(self, app, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.server.should_exit = False
        self.server.started = False
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
            self.thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class FakeWorker:
    """An OpenAI-compatible worker. Answers carry its name; `gates[i]` (a threading.Event)
    holds back streamed chunk i until set; `fail` = (status, body) answers every completion
    request with that error; `break_after` = n cuts a stream off after n chunks; `delay`
    holds a non-streamed answer back (watching for the client to disconnect)."""

    name: str
    chunks: int = 3
    gates: dict[int, threading.Event] = field(default_factory=dict)
    fail: tuple[int, dict] | None = None
    break_after: int | None = None
    delay: float = 0.0
    health_status: int = 200
    transfer_params: dict | None = None  # returned as kv_transfer_params (a prefill's handoff)
    cached_tokens: int | None = None  # reported as usage.prompt_tokens_details.cached_tokens
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/chat/completions", self._complete, methods=["POST"]),
                Route("/v1/completions", self._complete, methods=["POST"]),
            ]
        )

    async def _health(self, request: Request) -> Response:
        return Response(status_code=self.health_status)

    async def _complete(self, request: Request) -> Response:
        raw = await request.body()
        self.bodies.append(raw)
        self.headers.append(dict(request.headers))
        if self.fail is not None:
            status, body = self.fail
            return JSONResponse(body, status_code=status)
        body = json.loads(raw)
        chat = request.url.path.endswith("/chat/completions")
        if body.get("stream"):
            return StreamingResponse(self._events(chat), media_type="text/event-stream")
        waited = 0.0
        while waited < self.delay:
            if await request.is_disconnected():
                self.disconnected.set()
                return Response(status_code=499)
            await asyncio.sleep(0.05)
            waited += 0.05
        text = f"hello from {self.name}"
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": text, "finish_reason": "stop"}
        )
        answer = {
            "id": f"cmpl-{self.name}",
            "object": "chat.completion" if chat else "text_completion",
            "created": 1,
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }
        if self.cached_tokens is not None:
            answer["usage"]["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.transfer_params is not None:
            answer["kv_transfer_params"] = self.transfer_params
        return JSONResponse(answer)

    async def _events(self, chat: bool):
        for i in range(self.chunks):
            if self.break_after is not None and i >= self.break_after:
                raise RuntimeError("fake worker breaks the stream")
            gate = self.gates.get(i)
            if gate is not None:
                while not gate.is_set():
                    await asyncio.sleep(0.01)
            piece = f"{self.name}-{i} "
            delta = {"delta": {"content": piece}} if chat else {"text": piece}
            event = {
                "id": f"cmpl-{self.name}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "model": "m",
                "choices": [{"index": 0, **delta, "finish_reason": None}],
            }
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"


class DroppingServer:
    """Accepts every connection, reads the request, closes without a byte: a worker that dies
    mid-request before answering."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.settimeout(1)
            with contextlib.suppress(OSError):
                conn.recv(65536)
            conn.close()

    def __enter__(self) -> DroppingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def registration(worker_id: str, url: str, model: str = "m", role: str = "agg") -> dict:
    return {
        "id": worker_id,
        "role": role,
        "url": url,
        "model": model,
        "metrics_url": "http://127.0.0.1:1/metrics",
        "pid": 1,
        "started_at": 1700000000.0,
    }


def pool_of(*workers: tuple[str, str], model: str = "m", role: str = "agg") -> WorkerPool:
    """A pool holding (id, url) workers of one model."""
    pool = WorkerPool()
    for worker_id, url in workers:
        pool.put(f"/dynkv/t/workers/{worker_id}", registration(worker_id, url, model, role))
    pool.synced = True
    return pool


def dead_url() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"
