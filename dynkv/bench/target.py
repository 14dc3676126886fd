"""What `bench serve` loads and scrapes: the server's base URL and its workers' KVBM metrics.

A user passes the URL the openai client takes (`http://host:8000/v1`) as often as the server's
root: both mean the same server, so `/v1` is dropped here and added back per request. Against a
dynkv deployment the workers' metrics URLs are in its state file: `--name` picks the deployment,
and a URL that a local deployment's frontend serves finds it by itself, so the hit rates are
filled in without `--metrics-url`; so is the CA of an advertised deployment's frontend
(`dynkv.bench.trust`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dynkv.kvbm.roles import ROLE_NAMES
from dynkv.supervisor import read_state
from dynkv.supervisor.state import DeploymentState, ServiceRecord

DEFAULT_URL = "http://127.0.0.1:8000"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}


def base_url(url: str) -> str:
    """`url` without a trailing slash or `/v1`: the root the OpenAI paths hang from."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class Target:
    url: str  # base URL, no /v1
    metrics_urls: tuple[str, ...]
    deployment: str | None = None  # the local deployment it belongs to, when found
    ca_cert: str | None = None  # its frontend's CA (`up --advertise`), when it has one


def _frontend_url(rec: ServiceRecord) -> str | None:
    return rec.info.url or None


def _metrics_url(rec: ServiceRecord) -> str | None:
    return rec.info.metrics_url or None


def worker_metrics(state: DeploymentState) -> tuple[str, ...]:
    """The KVBM metrics URL of every worker that has one (a worker without KVBM has none)."""
    return tuple(
        url for rec in state.services if rec.role in ROLE_NAMES if (url := _metrics_url(rec))
    )


def frontend_url(state: DeploymentState) -> str | None:
    rec = next((s for s in state.services if s.role == "frontend"), None)
    return None if rec is None else _frontend_url(rec)


def frontend_ca(state: DeploymentState) -> str | None:
    """The CA file an advertised deployment's frontend certificate is from (docs/multi-host.md)."""
    rec = next((s for s in state.services if s.role == "frontend"), None)
    return None if rec is None else rec.info.ca_cert


def _same_server(a: str, b: str) -> bool:
    """Same port and scheme, and the same host, any loopback name counting as one."""
    pa, pb = urlsplit(a), urlsplit(b)
    if (pa.scheme, pa.port) != (pb.scheme, pb.port):
        return False
    ha, hb = pa.hostname or "", pb.hostname or ""
    return ha == hb or (ha in LOOPBACK_NAMES and hb in LOOPBACK_NAMES)


def _states(state_dir: Path) -> Iterable[DeploymentState]:
    if not state_dir.is_dir():
        return
    for ddir in sorted(p for p in state_dir.iterdir() if p.is_dir()):
        try:
            state = read_state(ddir)
        except Exception:  # noqa: BLE001 - a corrupt or foreign state is not ours to judge here
            continue
        if state is not None:
            yield state


def serving(url: str, state_dir: Path) -> DeploymentState | None:
    """The local deployment whose frontend serves `url`, if one does."""
    for state in _states(state_dir):
        front = frontend_url(state)
        if front and _same_server(front, url):
            return state
    return None


def of_deployment(state: DeploymentState) -> Target:
    """A deployment's frontend and its workers' metrics."""
    return Target(
        base_url(frontend_url(state) or DEFAULT_URL),
        worker_metrics(state),
        state.name,
        frontend_ca(state),
    )
