"""The Prometheus service of `dynkv up --observability`: one more planned service, after the
frontend, scraping the frontend and every worker's KVBM metrics (and vLLM's own `/metrics`).

Two ways to run it, one argv: the `prometheus` binary when the host has one (Debian's
`apt-get install prometheus` puts it in /usr/bin), else the `prom/prometheus` image through the
docker SDK, like the docker infra backend. The container shares the host's network so that it can
scrape the loopback-only services and bind 127.0.0.1 itself (a published port cannot reach the
host's loopback), runs as the invoking user so it can read the 0700 deployment dir, and mounts
that dir at the same path, so both backends take the same flags.

Everything lives under `<deployment dir>/prometheus/` (0700, removed by `down` like etcd's data):
the generated `prometheus.yml` (`dynkv.observability.prometheus_config`, written by the
supervisor from the plan: the plan stays data) and the TSDB in `data/`. With a frontend API key,
Prometheus reads it from `frontend_api_key` (0600) there, never from the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dynkv.infra.docker import container_name, labels
from dynkv.observability import prometheus_config
from dynkv.plan.model import ContainerSpec, HttpProbe, Service, ServiceInfo

LOOPBACK = "127.0.0.1"
# The version Debian 12 packages, so both backends behave alike.
PROMETHEUS_IMAGE = "prom/prometheus:v2.42.0"
PROMETHEUS_BINARY = "/usr/bin/prometheus"
INSTALL_FIX = (
    "apt-get install -y prometheus   (Debian/Ubuntu: the binary dynkv uses), or start the Docker "
    "engine (dynkv then runs the prom/prometheus image), or drop --observability"
)


def prometheus_dir(deployment_dir: Path) -> Path:
    return deployment_dir / "prometheus"


def prometheus_service(
    *,
    deployment: str,
    deployment_dir: Path,
    binary: str | None,
    port: int,
    frontend: str | None,
    kvbm: Mapping[str, str],
    vllm: Mapping[str, str],
    api_key: str | None,
    user: str | None,
    depends_on: tuple[str, ...],
) -> Service:
    """`binary` None: the docker image. `frontend`, `kvbm` and `vllm` are host:port targets
    (workers keyed by their worker id, the dashboard's `worker` label)."""
    pdir = prometheus_dir(deployment_dir)
    config = pdir / "prometheus.yml"
    files: dict[str, str] = {}
    key_file = None
    if api_key and frontend:
        key_file = str(pdir / "frontend_api_key")
        files[key_file] = api_key
    files[str(config)] = prometheus_config(
        frontend=frontend, kvbm=dict(kvbm), vllm=dict(vllm), frontend_credentials_file=key_file
    )
    flags = (
        f"--config.file={config}",
        f"--storage.tsdb.path={pdir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
    )
    url = f"http://{LOOPBACK}:{port}"
    service = Service(
        name="prometheus",
        role="prometheus",
        argv=(binary or PROMETHEUS_BINARY, *flags),
        cwd=str(deployment_dir),
        ports={"http": port},
        probes=(HttpProbe(url=f"{url}/-/ready"),),
        depends_on=depends_on,
        log_file=str(deployment_dir / "logs" / "prometheus.log"),
        data_dirs=(str(pdir),),
        files=files,
        info=ServiceInfo(url=url, prometheus_url=url, config=str(config)),
    )
    if binary is not None:
        return service
    container = ContainerSpec(
        image=PROMETHEUS_IMAGE,
        name=container_name(deployment, "prometheus"),
        command=flags,
        ports={},
        labels=labels(deployment, "prometheus"),
        network_mode="host",
        volumes={str(pdir): str(pdir)},
        user=user,
    )
    return service.replace(argv=(), kind="container", container=container)
