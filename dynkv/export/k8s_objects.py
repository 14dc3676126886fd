"""The Kubernetes objects every export has: names, labels, and etcd and NATS as one-replica
StatefulSets behind headless Services (their data on an emptyDir: the workers re-register and
re-publish after a restart). Split from `dynkv.export.kubernetes`, which adds the workers and the
frontend."""

from __future__ import annotations

import re
from typing import Any

from dynkv.export.containers import (
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    NATS_MONITOR_PORT,
    NATS_PORT,
    ExportError,
    ExportOptions,
    etcd_command,
)
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
    container = {
        "name": "etcd",
        "image": options.etcd_image,
        "command": etcd_command(
            member,
            data_dir="/data",
            client_url=f"http://{member}.{name}:{ETCD_CLIENT_PORT}",
            peer_url=peer,
        ),
        "ports": [
            {"name": "client", "containerPort": ETCD_CLIENT_PORT},
            {"name": "peer", "containerPort": ETCD_PEER_PORT},
        ],
        "readinessProbe": http_probe("/health", ETCD_CLIENT_PORT),
    }
    ports = {"client": ETCD_CLIENT_PORT, "peer": ETCD_PEER_PORT}
    return [headless(plan, name, "etcd", ports), stateful(plan, name, "etcd", container)]


def nats(plan: Plan, options: ExportOptions) -> list[dict[str, Any]]:
    name = f"{base_name(plan)}-nats"
    container = {
        "name": "nats",
        "image": options.nats_image,
        "args": ["-js", "-sd", "/data", "-m", str(NATS_MONITOR_PORT)],
        "ports": [
            {"name": "client", "containerPort": NATS_PORT},
            {"name": "monitor", "containerPort": NATS_MONITOR_PORT},
        ],
        "readinessProbe": http_probe("/healthz", NATS_MONITOR_PORT),
    }
    ports = {"client": NATS_PORT, "monitor": NATS_MONITOR_PORT}
    return [headless(plan, name, "nats", ports), stateful(plan, name, "nats", container)]


def http_probe(path: str, port: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, **PROBE_TIMING}
