"""Read a running deployment for `dynkv advise`: its workers' KVBM metrics and KVBM settings.

Metrics come straight from each worker's KVBM metrics endpoint (the one `dynkv status` reads),
twice, a window apart: that endpoint exists whenever KVBM runs, while Prometheus runs only with
`--observability`. Parsing is `dynkv.metrics_text`'s, shared with `status` and `bench`.

The frontend's /metrics gives the router's counters (`dynkv.router_metrics`, the reader of
`status`): which policy routed the window's requests, and the blocks each worker computed while
another worker held them, for the fleet-wide `router_spreads_prefixes`.

Settings are the worker's own: the `DYN_KVBM_*` variables of its process (what the runtime
actually read), so advice names the values in force rather than what the current shell would
resolve. Where the process cannot be read (a container, another user) the caller's resolved
settings stand in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from pydantic import ValidationError

from dynkv import metrics_text
from dynkv.advise.model import MetricsSnapshot, RouterCounts, WorkerMetrics
from dynkv.kvbm.config import ENV_PREFIX, KvbmSettings
from dynkv.kvbm.roles import ROLE_NAMES
from dynkv.settings.env_source import read_env
from dynkv.supervisor.process import same_process
from dynkv.supervisor.router_status import read_reading
from dynkv.supervisor.state import ServiceRecord
from dynkv.supervisor.status import read_state


@dataclass(frozen=True)
class Target:
    worker: str
    url: str
    record: ServiceRecord


@dataclass(frozen=True)
class Frontend:
    record: ServiceRecord
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Running:
    """What `advise` reads of a deployment, from one read of its state, each service checked
    alive once."""

    targets: list[Target]  # the live KVBM workers, whose metrics endpoints are read
    roles: list[str]  # every live worker's role, KVBM or not (`up --no-kvbm` has no endpoint)
    frontend: Frontend | None  # the live frontend, whose router counters are read


def running(deployment_dir: Path | str, api_key: str | None = None) -> Running:
    """The deployment's live workers and frontend (none of them without a deployment)."""
    state = read_state(deployment_dir)
    targets: list[Target] = []
    roles: list[str] = []
    front = None
    for rec in state.services if state is not None else []:
        if rec.role in ROLE_NAMES and _alive(rec):
            roles.append(rec.role)
            if rec.info.metrics_url:
                targets.append(Target(rec.name, rec.info.metrics_url, rec))
        elif rec.role == "frontend" and rec.info.url and front is None and _alive(rec):
            front = Frontend(rec, api_key)
    return Running(targets, roles, front)


def _alive(rec: ServiceRecord) -> bool:
    return rec.is_container or same_process(rec.pid, rec.create_time) is not None


def read_router(front: Frontend, timeout: float) -> RouterCounts:
    reading = read_reading(front.record, timeout, front.api_key)
    if reading is None:
        url = f"{(front.record.info.url or '').rstrip('/')}/metrics"
        why = (
            "wants the API key (DYNKV_API_KEY)"
            if front.record.info.auth == "bearer" and not front.api_key
            else "could not be read"
        )
        return RouterCounts(error=f"{url} {why}")
    return RouterCounts(
        decisions={"/".join(k): v for k, v in reading.decisions.items()},
        acquired={k[0]: v for k, v in reading.acquired.items()},
        duplicated={k[0]: v for k, v in reading.duplicated.items()},
    )


def read_worker(target: Target, timeout: float) -> WorkerMetrics:
    try:
        text = metrics_text.fetch_text(target.url, timeout)
        values = metrics_text.parse(text)
        skipped = {
            "/".join((dict(labels).get("tier", "?"), dict(labels).get("reason", "?"))): value
            for labels, value in metrics_text.labelled(text, metrics_text.SKIPPED).items()
        }
    except (httpx.HTTPError, ValueError) as exc:
        return WorkerMetrics(
            worker=target.worker, role=target.record.role, error=f"{target.url}: {exc}"
        )
    return WorkerMetrics(
        worker=target.worker, role=target.record.role, values=values, skipped=skipped
    )


def snapshot(
    found: list[Target],
    timeout: float = 2.0,
    clock: Callable[[], float] = time.time,
    front: Frontend | None = None,
) -> MetricsSnapshot:
    at = clock()
    workers = [read_worker(t, timeout) for t in found]
    router = read_router(front, timeout) if front is not None else None
    return MetricsSnapshot(at=at, workers=workers, router=router)


def worker_settings(target: Target) -> KvbmSettings | None:
    """The KVBM settings in the worker's process environment; None where it cannot be read."""
    proc = same_process(target.record.pid, target.record.create_time)
    if proc is None:
        return None
    try:
        environ = proc.environ()
    except psutil.Error:
        return None
    kvbm = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    try:
        return KvbmSettings.model_validate(read_env(KvbmSettings, kvbm))
    except ValidationError:
        return None
