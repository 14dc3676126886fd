"""The Kubernetes objects every export has: names, labels, and etcd and NATS as one-replica
StatefulSets behind headless Services (their data on an emptyDir: the workers re-register and
re-publish after a restart). Split from `dynkv.export.kubernetes`, which adds the workers and the
frontend."""

from __future__ import annotations

import re
from typing import Any

from dynkv.export.containers import (
    NATS_MONITOR_PORT,
    NATS_PORT,
    ExportError,
    ExportOptions,
)
from dynkv.infra.etcd_argv import ETCD_CLIENT_PORT, ETCD_PEER_PORT, container_etcd_argv
from dynkv.plan.model import Plan

PROBE_TIMING = {"periodSeconds": 10, "timeoutSeconds": 10, "failureThreshold": 3}


def base_name(plan: Plan) -> str:
    """`dynkv-<deployment>` as a DNS label (the longest suffix, `-frontend`, still fits)."""
    base = "dynkv-" + re.sub(r"[^a-z0-9-]", "-", plan.name.lower())
    if len(base) + len("-frontend") > 63:
        raise ExportError(
            f"deployment name {plan.name!r} is too long for Kubernetes object names",
            "use --name with at most 48 characters",
        )
    return base


def labels(plan: Plan, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dynkv",
        "app.kubernetes.io/instance": plan.name,
        "app.kubernetes.io/component": component,
    }


def resource(
    api: str, kind: str, name: str, plan: Plan, component: str, **body: Any
) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name, "labels": labels(plan, component)},
        **body,
    }


def headless(plan: Plan, name: str, component: str, ports: dict[str, int]) -> dict[str, Any]:
    return resource(
        "v1",
        "Service",
        name,
        plan,
        component,
        spec={
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # a member must resolve its own name to start
            "selector": labels(plan, component),
            "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports.items()],
        },
    )


def stateful(plan: Plan, name: str, component: str, container: dict[str, Any]) -> dict[str, Any]:
    container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    return resource(
        "apps/v1",
        "StatefulSet",
        name,
        plan,
        component,
        spec={
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": labels(plan, component)},
            "template": {
                "metadata": {"labels": labels(plan, component)},
                "spec": {"containers": [container], "volumes": [{"name": "data", "emptyDir": {}}]},
            },
        },
    )


def etcd(plan: Plan, options: ExportOptions) -> list[dict[str, Any]]:
    name = f"{base_name(plan)}-etcd"
    member = f"{name}-0"
    peer = f"http://{member}.{name}:{ETCD_PEER_PORT}"
    command = container_etcd_argv(
        member,
        data_dir="/data",
        client_url=f"http://{member}.{name}:{ETCD_CLIENT_PORT}",
        peer_url=peer,
    )
    ports = {"client": ETCD_CLIENT_PORT, "peer": ETCD_PEER_PORT}
    probe = http_probe("/health", ETCD_CLIENT_PORT)
    return _infra(plan, "etcd", options.etcd_image, {"command": list(command)}, ports, probe)


def nats(plan: Plan, options: ExportOptions) -> list[dict[str, Any]]:
    run = {"args": ["-js", "-sd", "/data", "-m", str(NATS_MONITOR_PORT)]}
    ports = {"client": NATS_PORT, "monitor": NATS_MONITOR_PORT}
    probe = http_probe("/healthz", NATS_MONITOR_PORT)
    return _infra(plan, "nats", options.nats_image, run, ports, probe)


def _infra(
    plan: Plan,
    component: str,
    image: str,
    run: dict[str, Any],
    ports: dict[str, int],
    probe: dict[str, Any],
) -> list[dict[str, Any]]:
    """etcd or NATS: a one-replica StatefulSet running `image` with `run` (its command or
    args), behind a headless Service `<base>-<component>` with the named `ports`."""
    name = f"{base_name(plan)}-{component}"
    container = {
        "name": component,
        "image": image,
        **run,
        "ports": [{"name": port, "containerPort": number} for port, number in ports.items()],
        "readinessProbe": probe,
    }
    return [headless(plan, name, component, ports), stateful(plan, name, component, container)]


def http_probe(path: str, port: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, **PROBE_TIMING}
