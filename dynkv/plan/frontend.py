"""The frontend service: `python -m dynkv.frontend`, started after the workers.

It is started last so that its first etcd listing already holds the workers `up` waited for: once
its `/health` is 200 (the listing is applied), a request sent right after `up -d` returns is
served. The API key travels in the environment only (`DYNKV_API_KEY`; the plan's printers mask
it), never in argv, which every user of the machine can read and the state file records.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dynkv.plan.model import HttpProbe, Service, ServiceInfo

FRONTEND_MODULE = "dynkv.frontend"
API_KEY_ENV = "DYNKV_API_KEY"


def connect_host(host: str) -> str:
    """An address a client on this machine can reach for a server bound to `host`."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def frontend_url(host: str, port: int) -> str:
    return f"http://{connect_host(host)}:{port}"


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
    api_key: str | None,
    env: Mapping[str, str],
    depends_on: tuple[str, ...],
    disagg_fallback: bool = False,
    disagg_transfer: str | None = None,
) -> Service:
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
        "--etcd-endpoints",
        ",".join(etcd_endpoints),
        "--router",
        router,
    ]
    for model in models:
        argv += ["--model", model]
    if disagg_fallback:
        argv.append("--disagg-fallback")
    if disagg_transfer == "nixl":
        argv += ["--disagg-transfer", "nixl"]
    service_env = dict(env)
    env_unset: tuple[str, ...] = ()
    if api_key:
        service_env[API_KEY_ENV] = api_key
    else:
        env_unset = (API_KEY_ENV,)  # the frontend gets exactly what the settings say
    url = frontend_url(host, port)
    return Service(
        name="frontend",
        role="frontend",
        argv=tuple(argv),
        env=service_env,
        env_unset=env_unset,
        cwd=str(deployment_dir),
        ports={"http": port},
        probes=(HttpProbe(url=f"{url}/health", expect_json={"status": "ok"}),),
        depends_on=depends_on,
        log_file=str(deployment_dir / "logs" / "frontend.log"),
        info=ServiceInfo(
            url=url,
            openai_url=f"{url}/v1",
            model=models[0] if models else "",
            bind_host=host,
            auth="bearer" if api_key else "none",
        ),
    )
