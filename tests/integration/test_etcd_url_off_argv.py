"""An etcd URL with a password reaches the frontend and the worker wrapper by environment, not
argv: the processes the plan describes, started for real against real etcd (the fake vLLM behind
the wrapper), show no password in /proc/PID/cmdline, which every local user can read
(docs/security.md). (This etcd has no users: it answers the credentials with 401, so the test
waits for the processes to serve, not for discovery.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from infra_helpers import FAKES, wait_for

from dynkv.kvbm.roles import Role
from dynkv.plan.frontend import Access, frontend_service
from dynkv.plan.worker import worker_service
from dynkv.ports import free_port

pytestmark = pytest.mark.integration
PASSWORD = "hunter2-" + uuid.uuid4().hex[:8]
MODEL = "fake-model"


def _with_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://root:{PASSWORD}@{rest}"


def _start(argv: tuple[str, ...], env: dict[str, str], log: Path) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DYNKV_", "DYN_KVBM_"))}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(FAKES)) if p)
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, env={**base, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _cmdlines(proc: subprocess.Popen) -> list[str]:
    """The command lines of `proc` and its children, as `ps` shows them to any local user."""
    parent = psutil.Process(proc.pid)
    out = []
    for p in [parent, *parent.children(recursive=True)]:
        try:
            out.append(Path(f"/proc/{p.pid}/cmdline").read_bytes().decode().replace("\0", " "))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def test_started_frontend_and_worker_show_no_etcd_password(etcd_url, tmp_path):
    deployment = f"s{uuid.uuid4().hex[:6]}"
    endpoints = (_with_password(etcd_url),)
    worker_port, fe_port = free_port(), free_port()
    worker = worker_service(
        deployment=deployment, deployment_dir=tmp_path, role=Role.AGG, index=0,
        python=sys.executable,
        vllm=(sys.executable, "-m", "fake_vllm", "--port", str(worker_port),
              "--served-model-name", MODEL),
        port=worker_port, served_name=MODEL, metrics=None, metrics_port=None, env={},
        env_unset=(), etcd_endpoints=endpoints, lease_ttl=3, depends_on=(),
    )  # fmt: skip
    frontend = frontend_service(
        deployment=deployment, deployment_dir=tmp_path, python=sys.executable,
        host="127.0.0.1", port=fe_port, router="round_robin", etcd_endpoints=endpoints,
        models=(MODEL,), access=Access(), env={}, depends_on=(),
    )  # fmt: skip
    procs = [
        _start(worker.argv, dict(worker.env), tmp_path / "worker.log"),
        _start(frontend.argv, dict(frontend.env), tmp_path / "frontend.log"),
    ]
    try:

        def serving(port: int) -> bool:  # answers at all: with no worker the frontend is 503
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code > 0
            except httpx.HTTPError:
                return False

        wait_for(lambda: serving(fe_port) and serving(worker_port), 30)
        # the frontend took its etcd URL from the environment and uses it (etcd answers its
        # discovery, with 401 for the credentials)
        wait_for(lambda: "/v3/kv/range" in (tmp_path / "frontend.log").read_text(), 10)
        assert "root:***@" in (tmp_path / "frontend.log").read_text()
        for log in ("worker.log", "frontend.log"):
            assert PASSWORD not in (tmp_path / log).read_text()
        lines = [line for proc in procs for line in _cmdlines(proc)]
        assert any("dynkv.frontend" in line for line in lines)
        assert any("fake_vllm" in line for line in lines)  # the wrapper's child too
        assert not [line for line in lines if PASSWORD in line]
        # the password is where the plan put it: the frontend's own environment, private to us
        environ = Path(f"/proc/{procs[1].pid}/environ").read_bytes().decode(errors="replace")
        assert PASSWORD in environ
        assert oct(Path(f"/proc/{procs[1].pid}/environ").stat().st_mode & 0o777) == "0o400"
        # vLLM itself never talks to etcd: the wrapper keeps the URL out of its environment
        (vllm,) = psutil.Process(procs[0].pid).children()
        assert PASSWORD not in Path(f"/proc/{vllm.pid}/environ").read_bytes().decode("latin-1")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
