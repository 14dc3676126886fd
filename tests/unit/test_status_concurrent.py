"""`dynkv status` probes every service at once: a fleet's status costs one probe round, and one
slow answer does not delay (or time out) the others.

The services are this test process (so each counts as running) with an HTTP probe on a real
local server whose handler answers only once every probe is in flight: probed one after
another, the first would wait for the others until its barrier broke, and report unhealthy.
"""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from dynkv.plan.model import HttpProbe, probe_json
from dynkv.supervisor.state import DeploymentState, ServiceRecord, StateStore
from dynkv.supervisor.status import deployment_status

SERVICES = 4


@pytest.fixture
def barrier_server():
    barrier = threading.Barrier(SERVICES, timeout=2.0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            try:
                barrier.wait()
                status = 200
            except threading.BrokenBarrierError:
                status = 503
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_every_service_is_probed_at_once(tmp_path, barrier_server):
    me = psutil.Process()
    probe = probe_json(HttpProbe(url=barrier_server + "/health"))
    services = [
        ServiceRecord(
            name=f"agg-{i}",
            role="agg",
            pid=os.getpid(),
            pgid=os.getpgid(0),
            create_time=me.create_time(),
            probes=[probe],
        )
        for i in range(SERVICES)
    ]
    store = StateStore(tmp_path / "dep")
    store.ensure()
    with store.lock():
        store.write(
            DeploymentState(
                name="dep", instance="x", infra="embedded", phase="running", services=services
            )
        )
    t0 = time.monotonic()
    report = deployment_status(tmp_path / "dep")
    assert report is not None
    assert [(s.name, s.running, s.healthy, s.detail) for s in report.services] == [
        (f"agg-{i}", True, True, "healthy") for i in range(SERVICES)
    ]
    print(f"status of {SERVICES} services: {time.monotonic() - t0:.2f} s")
