"""TLS overhead on the frontend→worker path, without vLLM (docs/multi-host.md).

The frontend's upstream client (`dynkv.frontend.upstream.make_client`) posts a small completion
request to two worker-like uvicorn servers on loopback, one plain HTTP and one HTTPS with a
certificate from a fresh deployment CA, interleaving the two so that both see the same machine
load. Prints p50/p90 latency (µs) over kept-alive connections (what the frontend uses) and over a
new connection per request (the handshake), as JSON.

    PYTHONPATH=$PWD .venv/bin/python scripts/tls_overhead.py [REQUESTS]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dynkv.frontend.upstream import make_client
from dynkv.ports import free_port
from dynkv.tls.ca import DeploymentCA
from dynkv.tls.model import ClientTLS

SERVER = r"""
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = b'{"id":"x","choices":[{"text":"hello"}]}'
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tls = dict(ssl_certfile=cert, ssl_keyfile=key) if cert != "-" else {}
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", **tls)
"""
BODY = {"model": "m", "prompt": "hello world " * 20, "max_tokens": 8}
FRESH = 200


def summary(samples: list[float]) -> dict[str, int]:
    q = statistics.quantiles(samples, n=100)
    return {"p50_us": round(q[49] * 1e6), "p90_us": round(q[89] * 1e6), "n": len(samples)}


async def measure(urls: dict[str, str], ca: ClientTLS, requests: int) -> dict[str, dict]:
    tls = {"http": None, "https": ca}
    kept = {
        n: make_client(connect_timeout=3, request_timeout=10, max_connections=8, tls=t)
        for n, t in tls.items()
    }
    fresh = {
        n: httpx.AsyncClient(
            trust_env=False,
            verify=True if t is None else t.ssl_context(),
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        for n, t in tls.items()
    }
    samples: dict[str, list[float]] = {f"{k}_{n}": [] for k in ("keepalive", "new") for n in tls}
    for _ in range(100):  # warm up
        for n in tls:
            await kept[n].post(urls[n] + "/v1/completions", json=BODY)
    for kind, clients, count in (("keepalive", kept, requests), ("new", fresh, FRESH)):
        for i in range(count):
            for n in ("http", "https") if i % 2 else ("https", "http"):
                t = time.perf_counter()
                resp = await clients[n].post(urls[n] + "/v1/completions", json=BODY)
                samples[f"{kind}_{n}"].append(time.perf_counter() - t)
                assert resp.status_code == 200
    for client in (*kept.values(), *fresh.values()):
        await client.aclose()
    return {k: summary(v) for k, v in samples.items()}


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    tmp = Path(tempfile.mkdtemp())
    ca = DeploymentCA.ensure(tmp / "tls", "bench")
    cert, key = ca.issue("worker", ips=["127.0.0.1"], server=True).write(tmp / "tls", "worker")
    procs, urls = [], {}
    for scheme, c, k in (("http", "-", "-"), ("https", str(cert), str(key))):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", SERVER, str(port), c, k]))
        urls[scheme] = f"{scheme}://127.0.0.1:{port}"
    try:
        time.sleep(3)
        client_tls = ClientTLS(ca=str(tmp / "tls" / "ca.crt"))
        print(json.dumps(asyncio.run(measure(urls, client_tls, requests)), indent=1))
    finally:
        for proc in procs:
            proc.terminate()


if __name__ == "__main__":
    main()
