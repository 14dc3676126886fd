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

A vLLM that stops answering without exiting (SIGSTOP, a wedged engine) keeps its port open: the
wrapper probes `/health` every `--health-interval` seconds and suspends the registration after
`--unhealthy-after` consecutive failures (each a timeout of `--probe-timeout` or a non-200), and
registers again once `/health` answers. A registration key deleted by someone else while the lease
lives is put back at the next probe.

One of several CPU engines on a host gets its cores (`--cpus`): the wrapper runs itself, and so
all of vLLM, on them (`pin_to`).

Settings (flags or `DYNKV_WORKER_*`, with their defaults): `dynkv.worker.config`.

An advertised deployment (docs/multi-host.md) gives the wrapper `DYNKV_CLIENT_CA`, `DYNKV_CLIENT_CERT`
and `DYNKV_CLIENT_KEY`: it registers over https with that client certificate and probes vLLM's https
`/health` against the CA. vLLM keeps the CA (its KV event publisher verifies NATS with it) but not
the client key, which only the wrapper needs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx

from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.kvbm.event_settings import KvEventsSettings
from dynkv.tls.model import CERT_ENV, KEY_ENV, ClientTLS
from dynkv.worker.config import ENV_PREFIX, parse_args
from dynkv.worker.g1_events import start_g1_events
from dynkv.worker.record import DEPLOYMENT_SECRET_ENV, WorkerRecord, worker_api_key, worker_key
from dynkv.worker.registration import Registrar, _log, register_until_done

ETCD_ENDPOINTS_ENV = ENV_PREFIX + "ETCD_ENDPOINTS"

POLL = 0.2


def exit_code_of(returncode: int) -> int:
    """A child killed by signal N exits the wrapper with 128 + N, as a shell would report it."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    cfg, child_argv = parse_args(sys.argv[1:] if argv is None else argv)
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    secret = os.environ.get(DEPLOYMENT_SECRET_ENV) or None
    g1 = None
    if cfg.g1_events_block_size is not None:  # no KVBM in vLLM: its G1 events are bridged here
        g1 = start_g1_events(cfg.served_model_name, cfg.g1_events_block_size, _events_settings())
    if cfg.cpus:
        pin_to(cfg.cpus)
    child = subprocess.Popen(child_argv, env=child_env(os.environ, secret))
    _log(f"started {child_argv[0]} (pid {child.pid}); waiting for {cfg.url}/health")
    if secret is None:
        _log(f"no {DEPLOYMENT_SECRET_ENV}: the registration is unsigned, vLLM takes any caller")
    tls = ClientTLS.from_env(os.environ)
    client = EtcdClient(cfg.etcd_endpoints, tls=tls)
    record = WorkerRecord(
        id=cfg.worker_id,
        role=cfg.role,
        url=cfg.url,
        model=cfg.served_model_name,
        metrics_url=cfg.metrics_url,
        pid=child.pid,
        started_at=time.time(),
        node=cfg.node,
    )
    registrar = Registrar(
        client,
        worker_key(cfg.deployment, cfg.worker_id),
        record,
        cfg.lease_ttl,
        secret=secret,
    )
    forwarded = False
    watch = HealthWatch(
        cfg.url, cfg.health_interval, cfg.probe_timeout, cfg.unhealthy_after, verify=_verify(tls)
    )
    try:
        if _wait_healthy(child, cfg.url, stop_signal, verify=_verify(tls)):
            register_until_done(registrar, lambda: bool(stop_signal) or child.poll() is not None)
        while child.poll() is None:
            if stop_signal and not forwarded:
                registrar.withdraw()
                _log(f"signal {stop_signal[0]}: stopping vLLM (pid {child.pid})")
                _signal(child, signal.SIGTERM)
                forwarded = True
            if not forwarded:
                watch.step(registrar)
            time.sleep(POLL)
    finally:
        watch.close()
        registrar.withdraw()
        client.close()
        if g1 is not None:
            g1.close()
    code = exit_code_of(child.returncode)
    _log(f"vLLM exited with code {code}")
    if stop_signal and code == 128 + signal.SIGTERM:
        # asked to stop, it stopped: the group's SIGTERM and ours may both reach vLLM, and the
        # second one can land after its handler is gone; that is a requested stop, not a crash
        return 0
    return code


def _events_settings() -> KvEventsSettings:
    try:
        return KvEventsSettings()
    except ValueError as exc:  # bad DYNKV_KV_EVENTS_*: the worker serves on without events
        _log(f"KV events are off: {exc}")
        return KvEventsSettings.model_construct(nats_url=None)


class HealthWatch:
    """vLLM's /health, probed while it runs; the registration follows it (see module doc)."""

    def __init__(
        self,
        url: str,
        interval: float,
        timeout: float,
        unhealthy_after: int,
        *,
        verify: object = True,
    ) -> None:
        self.url, self.interval, self.unhealthy_after = url, interval, unhealthy_after
        self.http = httpx.Client(timeout=timeout, trust_env=False, verify=verify)  # type: ignore[arg-type]
        self.failures = 0
        self.next_at = time.monotonic() + interval

    def probe(self) -> str | None:
        try:
            status = self.http.get(f"{self.url}/health").status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if status == 200 else f"status {status}"

    def step(self, registrar: Registrar) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + self.interval
        problem = self.probe()
        if problem is None:
            if self.failures >= self.unhealthy_after:
                _log(f"{self.url}/health answers again")
            self.failures = 0
            try:
                if registrar.registered:
                    registrar.ensure()
                else:
                    registrar.register()
            except EtcdError as exc:
                _log(f"etcd not reachable ({exc}); retrying")
            return
        self.failures += 1
        if self.failures == self.unhealthy_after and registrar.registered:
            _log(f"{self.url}/health failed {self.failures} times ({problem}); withdrawing")
            registrar.suspend()

    def close(self) -> None:
        self.http.close()


def pin_to(cpus: tuple[int, ...]) -> None:
    """Run this thread, and so every process it starts (vLLM and its engine), on `cpus` (of
    those this process may use).

    vLLM binds its model runner's threads to `VLLM_CPU_OMP_THREADS_BIND`, but not its API server
    or EngineCore: on a host split between engines those ran wherever the scheduler put them,
    often on a neighbour's cores, and a prompt computing on one engine slowed down by a quarter to
    a third whenever the other finished one (docs/fleet.md#cpu-engines)."""
    if not hasattr(os, "sched_setaffinity"):  # not Linux: no CPU affinity to set
        _log(f"--cpus {sorted(cpus)}: this system cannot pin processes; not pinned")
        return
    allowed = os.sched_getaffinity(0)
    mine = set(cpus) & allowed
    if not mine:
        _log(
            f"--cpus {sorted(cpus)} has no CPU this process may use ({sorted(allowed)}): not pinned"
        )
        return
    os.sched_setaffinity(0, mine)
    _log(f"vLLM runs on CPUs {sorted(mine)}")


def child_env(environ: dict[str, str] | os._Environ, secret: str | None) -> dict[str, str]:
    """vLLM's environment: ours without the deployment secret, the etcd URLs (which may carry a
    password; vLLM never talks to etcd) and the etcd client certificate, with the derived API
    key."""
    drop = {DEPLOYMENT_SECRET_ENV, ETCD_ENDPOINTS_ENV, CERT_ENV, KEY_ENV}
    env = {k: v for k, v in environ.items() if k not in drop}
    if secret:
        env["VLLM_API_KEY"] = worker_api_key(secret)
    return env


def _verify(tls: ClientTLS | None) -> object:
    return True if tls is None else tls.ssl_context()


def _wait_healthy(
    child: subprocess.Popen, url: str, stop_signal: list[int], *, verify: object = True
) -> bool:
    with httpx.Client(timeout=2.0, trust_env=False, verify=verify) as http:  # type: ignore[arg-type]
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
