"""The frontend service: `python -m dynkv.frontend`, started after the workers.

It is started last so that its first etcd listing already holds the workers `up` waited for: once
its `/health` is 200 (the listing is applied), a request sent right after `up -d` returns is
served. The API key travels in the environment only (`DYNKV_API_KEY`; the plan's printers mask
it), never in argv, which every user of the machine can read and the state file records.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dynkv.plan.model import HttpProbe, Service, ServiceInfo, TcpProbe
from dynkv.plan.secret import read_or_new, secret_path
from dynkv.settings.deployment import DeploymentSettings
from dynkv.settings.errors import SettingsError
from dynkv.settings.resolve import Resolved
from dynkv.worker.record import DEPLOYMENT_SECRET_ENV

# FrontendSettings' name for `etcd_endpoints` (dynkv/frontend/config.py, which imports this module)
ETCD_ENDPOINTS_ENV = "DYNKV_FRONTEND_ETCD_ENDPOINTS"
# ... and for `nats_url`: the KV router subscribes to the workers' KV events there
NATS_URL_ENV = "DYNKV_FRONTEND_NATS_URL"

# read_or_new: for the plan's build
__all__ = ["Access", "caller_api_key", "checked_access", "frontend_service", "read_or_new"]

FRONTEND_MODULE = "dynkv.frontend"
API_KEY_ENV = "DYNKV_API_KEY"


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(
    *, host: str, api_key: bool, insecure: bool, metrics_host: str | None = None
) -> tuple[str, str] | None:
    """(cause, fix) when the settings would expose the deployment to the network without a
    key (docs/security.md), else None. Checked while planning, before anything starts."""
    if not is_loopback(host) and not api_key and not insecure:
        return (
            f"the frontend would serve anyone who reaches {host} (not loopback) without an API key",
            "set DYNKV_API_KEY (or --api-key-file), bind 127.0.0.1, or pass --insecure",
        )
    if metrics_host is not None and not is_loopback(metrics_host) and not insecure:
        return (
            f"the KVBM metrics would be served on {metrics_host} (not loopback), with no key",
            "unset DYN_KVBM_METRICS_HOST (127.0.0.1), or pass --insecure (DYNKV_INSECURE=true)",
        )
    return None


def read_key_file(path: Path) -> str:
    """The API key in `path` (stripped); ValueError with the reason."""
    try:
        key = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {path}: {exc.strerror}") from None
    if not key:
        raise ValueError(f"the API key file {path} is empty")
    return key


@dataclass(frozen=True)
class Access:
    """Who may call the frontend and how: its API key, TLS (cert, key), --insecure."""

    api_key: str | None = field(default=None, repr=False)
    tls: tuple[str, str] | None = None
    insecure: bool = False


def caller_api_key(dep: DeploymentSettings) -> str | None:
    """The frontend's API key as a caller's settings give it (DYNKV_API_KEY or the file of
    DYNKV_API_KEY_FILE), None without one or with an unreadable file: `status` and `advise` read
    the frontend's /metrics with it."""
    if dep.api_key:
        return dep.api_key.get_secret_value()
    if dep.api_key_file is not None:
        with contextlib.suppress(OSError, ValueError):
            return read_key_file(dep.api_key_file)
    return None


def checked_access(resolved: Resolved) -> Access:
    """The frontend's `Access`, or a SettingsError (exit 2, nothing started) when the settings
    would expose the deployment to the network without a key (docs/security.md)."""
    dep = resolved.deployment
    metrics_host = resolved.kvbm.metrics_host if dep.kvbm else None
    api_key = dep.api_key.get_secret_value() if dep.api_key else None
    if api_key is None and dep.api_key_file is not None:
        try:
            api_key = read_key_file(dep.api_key_file)
        except ValueError as exc:
            raise SettingsError(
                str(exc), "point --api-key-file at a file holding the key"
            ) from None
    if (dep.tls_cert is None) != (dep.tls_key is None):
        raise SettingsError("--tls-cert and --tls-key go together", "give both, or neither")
    problem = exposure_problem(
        host=dep.advertise or dep.frontend_host,  # --advertise: the frontend binds that
        api_key=bool(api_key),
        insecure=dep.insecure,
        metrics_host=metrics_host,
    )
    if problem:
        raise SettingsError(*problem)
    tls = (str(dep.tls_cert), str(dep.tls_key)) if dep.tls_cert and dep.tls_key else None
    return Access(api_key=api_key, tls=tls, insecure=dep.insecure)


def connect_host(host: str) -> str:
    """An address a client on this machine can reach for a server bound to `host`."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def frontend_url(host: str, port: int, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{connect_host(host)}:{port}"


def frontend_service(
    *,
    deployment: str,
    deployment_dir: Path,
    python: str,
    host: str,
    port: int,
    router: str,
    etcd_endpoints: tuple[str, ...],
    models: tuple[str, ...],
    access: Access,
    env: Mapping[str, str],
    depends_on: tuple[str, ...],
    disagg_fallback: bool = False,
    disagg_transfer: str | None = None,
    secret: str | None = None,
    nats_url: str | None = None,
    tokenizer: str | None = None,
    chat_template: str | None = None,
    router_temperature: float = 0.0,
    router_tier_weights: str | None = None,
) -> Service:
    api_key, tls = access.api_key, access.tls
    argv = [
        python,
        "-m",
        FRONTEND_MODULE,
        "--host",
        host,
        "--port",
        str(port),
        "--deployment",
        deployment,
        "--router",
        router,
    ]
    for model in models:
        argv += ["--model", model]
    if tokenizer:  # the kv router renders and tokenizes prompts as the workers do
        argv += ["--tokenizer", tokenizer]
    if chat_template:
        argv += ["--chat-template", chat_template]
    if router_temperature:
        argv += ["--router-temperature", f"{router_temperature:g}"]
    if router_tier_weights:
        argv += ["--router-tier-weights", router_tier_weights]
    if disagg_fallback:
        argv.append("--disagg-fallback")
    if disagg_transfer == "nixl":
        argv += ["--disagg-transfer", "nixl"]
    if tls is not None:
        argv += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    if access.insecure:
        argv.append("--insecure")
    # by environment, not argv: an external etcd URL may carry a password, and argv is readable by
    # every local user (/proc/PID/cmdline, ps) while the environment is not (docs/security.md)
    service_env = {**env, ETCD_ENDPOINTS_ENV: ",".join(etcd_endpoints)}
    if nats_url:  # the same goes for an external NATS URL
        service_env[NATS_URL_ENV] = nats_url
    env_unset: tuple[str, ...] = ()
    if api_key:
        service_env[API_KEY_ENV] = api_key
    else:
        env_unset = (API_KEY_ENV,)  # the frontend gets exactly what the settings say
    if secret:
        service_env[DEPLOYMENT_SECRET_ENV] = secret  # verifies registrations, keys the workers
    url = frontend_url(host, port, tls is not None)
    # over TLS the supervisor cannot verify a self-signed certificate: it waits for the port
    ready = (
        HttpProbe(url=f"{url}/health", expect_json={"status": "ok"})
        if tls is None
        else TcpProbe(host=connect_host(host).strip("[]"), port=port)
    )
    return Service(
        name="frontend",
        role="frontend",
        argv=tuple(argv),
        env=service_env,
        env_unset=env_unset,
        cwd=str(deployment_dir),
        ports={"http": port},
        probes=(ready,),
        depends_on=depends_on,
        log_file=str(deployment_dir / "logs" / "frontend.log"),
        files={str(secret_path(deployment_dir)): secret} if secret else {},
        info=ServiceInfo(
            url=url,
            openai_url=f"{url}/v1",
            model=models[0] if models else "",
            bind_host=host,
            auth="bearer" if api_key else "none",
        ),
    )
