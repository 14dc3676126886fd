"""etcd and NATS as docker containers, the way Dynamo's guide runs them with compose.

Images and flags follow Dynamo's `deploy/docker-compose.yml`: `nats:2.11.4 -js --trace -m 8222`
and etcd 3.6 on 2379/2380. The guide uses `bitnamilegacy/etcd:3.6.1` (Bitnami's images moved to
an unmaintained "legacy" namespace); dynkv runs the upstream `quay.io/coreos/etcd:v3.6.1` instead,
which needs explicit listen flags because its default command listens on the container's loopback.
Ports are published on 127.0.0.1 only, and every container carries the labels
`dynkv.deployment=<name>` and `dynkv.service=<svc>`, by which `down`/`status` find it again even
without a state file, as compose finds its containers by project label.

The container specs are pure data (unit-tested); `DockerBackend` is the thin layer over the SDK.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from dynkv.infra.embedded import LOOPBACK, etcd_health_probe, nats_health_probe
from dynkv.infra.etcd_argv import (
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    container_etcd_argv,
    member_name,
)
from dynkv.infra.images import ETCD_IMAGE, NATS_IMAGE  # noqa: F401 (re-exported)
from dynkv.plan.model import ContainerSpec, HttpProbe, Service, ServiceInfo

LABEL_DEPLOYMENT = "dynkv.deployment"
LABEL_SERVICE = "dynkv.service"
FIX_NO_ENGINE = (
    "start the Docker engine (or point DOCKER_HOST at one), or use --infra embedded, "
    "which needs no Docker"
)


def labels(deployment: str, service: str) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: deployment, LABEL_SERVICE: service}


def container_name(deployment: str, service: str) -> str:
    return f"dynkv-{deployment}-{service}"


def nats_container(
    *, deployment: str, port: int, monitor_port: int, image: str = NATS_IMAGE
) -> ContainerSpec:
    return ContainerSpec(
        image=image,
        name=container_name(deployment, "nats"),
        command=("-js", "--trace", "-m", "8222"),
        ports={"4222/tcp": (LOOPBACK, port), "8222/tcp": (LOOPBACK, monitor_port)},
        labels=labels(deployment, "nats"),
    )


def etcd_container(
    *, deployment: str, client_port: int, peer_port: int, image: str = ETCD_IMAGE
) -> ContainerSpec:
    return ContainerSpec(
        image=image,
        name=container_name(deployment, "etcd"),
        command=container_etcd_argv(
            member_name(deployment),
            data_dir="/etcd-data",
            client_url=f"http://{LOOPBACK}:{client_port}",
            peer_url=f"http://{LOOPBACK}:{ETCD_PEER_PORT}",
        ),
        ports={
            f"{ETCD_CLIENT_PORT}/tcp": (LOOPBACK, client_port),
            f"{ETCD_PEER_PORT}/tcp": (LOOPBACK, peer_port),
        },
        labels=labels(deployment, "etcd"),
    )


def etcd_docker_service(
    *, deployment: str, client_port: int, peer_port: int, image: str = ETCD_IMAGE
) -> Service:
    spec = etcd_container(
        deployment=deployment, client_port=client_port, peer_port=peer_port, image=image
    )
    ports = {"client": client_port, "peer": peer_port}
    return _container_service("etcd", spec, ports, etcd_health_probe(client_port))


def nats_docker_service(
    *, deployment: str, port: int, monitor_port: int, image: str = NATS_IMAGE
) -> Service:
    spec = nats_container(deployment=deployment, port=port, monitor_port=monitor_port, image=image)
    ports = {"client": port, "monitor": monitor_port}
    return _container_service("nats", spec, ports, nats_health_probe(monitor_port))


def _container_service(
    name: str, spec: ContainerSpec, ports: dict[str, int], probe: HttpProbe
) -> Service:
    return Service(
        name=name,
        role=name,
        kind="container",
        container=spec,
        ports=ports,
        probes=(probe,),
        info=ServiceInfo(container=spec.name),
    )


class DockerUnavailable(Exception):
    """No engine to talk to: a user-fixable condition, reported as cause + fix."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"the Docker engine is not reachable: {detail}")
        self.cause = str(self)
        self.fix = FIX_NO_ENGINE


def connect() -> Any:
    """A docker SDK client that has answered a ping, or DockerUnavailable."""
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - docker is a declared dependency
        raise DockerUnavailable(f"the docker Python SDK is not installed ({exc})") from None
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerUnavailable(str(exc)) from None
    return client


class DockerBackend:
    """Run, find, stop and read containers through the docker SDK (any object with the SDK's
    `containers` API works, which is how the unit tests drive it)."""

    def __init__(self, client: Any | None = None) -> None:
        self._client = client
        self._connecting = threading.Lock()  # `status` asks from several threads at once

    @property
    def client(self) -> Any:
        with self._connecting:
            if self._client is None:
                self._client = connect()
        return self._client

    def start(self, spec: ContainerSpec) -> str:
        """Start `spec`, replacing a leftover container of the same name (a crashed run's)."""
        for old in self.client.containers.list(all=True, filters={"name": f"^/{spec.name}$"}):
            old.remove(force=True)
        extra: dict[str, Any] = {}
        if spec.network_mode:
            extra["network_mode"] = spec.network_mode
        if spec.volumes:
            extra["volumes"] = {h: {"bind": c, "mode": "rw"} for h, c in spec.volumes.items()}
        if spec.user:
            extra["user"] = spec.user
        container = self.client.containers.run(
            spec.image,
            list(spec.command),
            name=spec.name,
            labels=dict(spec.labels),
            ports=dict(spec.ports),
            environment=dict(spec.environment),
            detach=True,
            **extra,
        )
        return str(container.id)

    def get(self, container_id: str) -> Any | None:
        import docker

        try:
            return self.client.containers.get(container_id)
        except docker.errors.NotFound:
            return None

    def is_running(self, container_id: str) -> bool:
        container = self.get(container_id)
        if container is None:
            return False
        container.reload()
        return container.status == "running"

    def find(self, deployment: str) -> list[Any]:
        return list(
            self.client.containers.list(
                all=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment}"}
            )
        )

    def stop(self, container_id: str, timeout: float) -> None:
        container = self.get(container_id)
        if container is not None:
            self.remove(container, timeout)

    @staticmethod
    def remove(container: Any, timeout: float) -> None:
        import docker

        with contextlib.suppress(docker.errors.APIError):
            container.stop(timeout=int(max(timeout, 1)))
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)

    def logs(self, container_id: str, *, tail: int | None, follow: bool) -> Iterator[str]:
        container = self.get(container_id)
        if container is None:
            return
        stream = container.logs(stream=True, follow=follow, tail="all" if tail is None else tail)
        buf = b""
        for chunk in stream:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")
