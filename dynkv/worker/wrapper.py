"""The worker wrapper: vLLM as a child, registered in etcd while (and only while) it is healthy.

Why a wrapper rather than code inside vLLM: vLLM's server must stay unmodified (it is the user's
vLLM), and registration must not happen before the model is loaded, which only the outside can
observe (`GET /health` → 200). The wrapper does not create a new process group: the supervisor
started it as a session leader, so vLLM and its engine processes share its group and a `killpg`
reaches all of them. A SIGTERM/SIGINT/SIGHUP sent to the wrapper alone is passed on to vLLM (as
SIGTERM: a second SIGINT would make uvicorn skip its shutdown), after the registration is withdrawn
so that no client is routed to a worker that is going away. When vLLM exits on its own the wrapper
withdraws and exits with vLLM's code.

Secrets (docs/security.md): the deployment secret arrives in `DYNKV_DEPLOYMENT_SECRET`; the
wrapper signs its registration with it and gives vLLM, instead of the secret, the key derived from
it (`VLLM_API_KEY`), so that vLLM's `/v1` routes answer only the frontend.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx

from dynkv.infra.etcd_client import EtcdClient
from dynkv.worker.record import DEPLOYMENT_SECRET_ENV, WorkerRecord, worker_api_key, worker_key
from dynkv.worker.registration import Registrar, _log, register_until_done

POLL = 0.2


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python -m dynkv.worker [options] -- <vllm command line>")
    split = argv.index("--")
    ours, child = argv[:split], argv[split + 1 :]
    if not child:
        raise SystemExit("dynkv.worker: no command after --")
    p = argparse.ArgumentParser(prog="python -m dynkv.worker")
    p.add_argument("--role", required=True, choices=["agg", "prefill", "decode"])
    p.add_argument("--deployment", required=True)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--url", required=True, help="base URL of the vLLM server")
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--metrics-url", default=None, help="KVBM metrics (absent without KVBM)")
    p.add_argument("--etcd-endpoints", required=True)
    p.add_argument("--lease-ttl", type=int, default=10)
    return p.parse_args(ours), child


def exit_code_of(returncode: int) -> int:
    """A child killed by signal N exits the wrapper with 128 + N, as a shell would report it."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    args, child_argv = parse_args(sys.argv[1:] if argv is None else argv)
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    secret = os.environ.get(DEPLOYMENT_SECRET_ENV) or None
    child = subprocess.Popen(child_argv, env=child_env(os.environ, secret))
    _log(f"started {child_argv[0]} (pid {child.pid}); waiting for {args.url}/health")
    if secret is None:
        _log(f"no {DEPLOYMENT_SECRET_ENV}: the registration is unsigned, vLLM takes any caller")
    client = EtcdClient(args.etcd_endpoints)
    record = WorkerRecord(
        id=args.worker_id,
        role=args.role,
        url=args.url,
        model=args.served_model_name,
        metrics_url=args.metrics_url,
        pid=child.pid,
        started_at=time.time(),
    )
    registrar = Registrar(
        client,
        worker_key(args.deployment, args.worker_id),
        record,
        args.lease_ttl,
        secret=secret,
    )
    forwarded = False
    try:
        if _wait_healthy(child, args.url, stop_signal):
            register_until_done(registrar, lambda: bool(stop_signal) or child.poll() is not None)
        while child.poll() is None:
            if stop_signal and not forwarded:
                registrar.withdraw()
                _log(f"signal {stop_signal[0]}: stopping vLLM (pid {child.pid})")
                _signal(child, signal.SIGTERM)
                forwarded = True
            time.sleep(0.2)
    finally:
        registrar.withdraw()
        client.close()
    code = exit_code_of(child.returncode)
    _log(f"vLLM exited with code {code}")
    if stop_signal and code == 128 + signal.SIGTERM:
        # asked to stop, it stopped: the group's SIGTERM and ours may both reach vLLM, and the
        # second one can land after its handler is gone; that is a requested stop, not a crash
        return 0
    return code


def child_env(environ: dict[str, str] | os._Environ, secret: str | None) -> dict[str, str]:
    """vLLM's environment: ours without the deployment secret, with the derived API key."""
    env = {k: v for k, v in environ.items() if k != DEPLOYMENT_SECRET_ENV}
    if secret:
        env["VLLM_API_KEY"] = worker_api_key(secret)
    return env


def _wait_healthy(child: subprocess.Popen, url: str, stop_signal: list[int]) -> bool:
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while child.poll() is None and not stop_signal:
            try:
                if http.get(f"{url}/health").status_code == 200:
                    _log(f"{url}/health is 200")
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(POLL)
    return False


def _signal(child: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, sig)
