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
Prometheus reads it from `frontend_api_key` (0600) there, never from the config. A frontend that
serves HTTPS is scraped over https, verifying the frontend's own certificate (`tls_server_name`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path

from dynkv.infra.docker import container_name, labels
from dynkv.infra.images import PROMETHEUS_IMAGE
from dynkv.observability import prometheus_config
from dynkv.plan.model import ContainerSpec, HttpProbe, Service, ServiceInfo

LOOPBACK = "127.0.0.1"
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
    frontend_tls_cert: str | None = None,
    image: str = PROMETHEUS_IMAGE,
    workers_ca: str | None = None,
) -> Service:
    """`binary` None: the docker image. `frontend`, `kvbm` and `vllm` are host:port targets
    (workers keyed by their worker id, the dashboard's `worker` label). `frontend_tls_cert`: the
    frontend serves HTTPS with this certificate (scraped over https, verified against it)."""
    pdir = prometheus_dir(deployment_dir)
    config = pdir / "prometheus.yml"
    files: dict[str, str] = {}
    key_file = None
    if api_key and frontend:
        key_file = str(pdir / "frontend_api_key")
        files[key_file] = api_key
    server_name = None
    if frontend_tls_cert and frontend and frontend_tls_cert != workers_ca:
        server_name = tls_server_name(frontend_tls_cert, frontend.rsplit(":", 1)[0].strip("[]"))
    files[str(config)] = prometheus_config(
        frontend=frontend,
        kvbm=dict(kvbm),
        vllm=dict(vllm),
        frontend_credentials_file=key_file,
        frontend_ca_file=frontend_tls_cert if frontend else None,
        frontend_server_name=server_name,
        vllm_ca_file=workers_ca,
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
        image=image,
        name=container_name(deployment, "prometheus"),
        command=flags,
        ports={},
        labels=labels(deployment, "prometheus"),
        network_mode="host",
        # the certificate at its own path too, so both backends read the same config
        volumes={str(pdir): str(pdir)}
        | ({frontend_tls_cert: frontend_tls_cert} if frontend_tls_cert else {})
        | ({workers_ca: workers_ca} if workers_ca else {}),
        user=user,
    )
    return service.replace(argv=(), kind="container", container=container)


def tls_server_name(cert_file: str, address: str) -> str | None:
    """The name Prometheus must verify the frontend's certificate for when the certificate does
    not name `address` (the host it scrapes): its first exact DNS name, else its common name. None when
    the certificate names `address`, or cannot be read here (then the frontend, which loads the
    same file, fails at start with the reason)."""
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (ImportError, OSError, ValueError):
        return None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    try:
        if str(ipaddress.ip_address(address)) in ips:
            return None
    except ValueError:
        if address.lower() in (d.lower() for d in dns):
            return None
    exact = [d for d in dns if not d.startswith("*.")]  # a wildcard is no name to verify
    if exact:
        return exact[0]
    common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(common[0].value) if common else None
