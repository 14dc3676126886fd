"""plan → a compose file (the compose specification, `docker compose up`), as a dict.

One service per plan service: etcd and NATS from their pinned images (DYNKV_ETCD_IMAGE,
DYNKV_NATS_IMAGE), one per worker and the frontend from the dynkv image. Workers find etcd and
NATS at the service names `etcd` and `nats`, and register `http://<service>:<port>`, which the
frontend reaches on the project's network. Only the frontend's port is published, on the address
the plan binds (127.0.0.1 unless `--host` says otherwise).

Secrets never appear in the file: the frontend and the workers read them from env files next to
it (`frontend.env`, `workers.env`, 0600, which `dynkv export -o DIR` writes with fresh values).
The disagg shared-memory handoff needs the prefill and decode workers on one /dev/shm: the decode
containers join the prefill container's IPC namespace (`ipc: service:<prefill>`), whose /dev/shm is
sized for the pool. docs/export.md.
"""

from __future__ import annotations

import json
import math
from typing import Any

from dynkv.export.containers import (
    CONTAINER_PYTHON,
    G3_MOUNT,
    HF_CACHE,
    NATS_MONITOR_PORT,
    ContainerFrontend,
    ContainerWorker,
    ExportOptions,
    Naming,
    infra_endpoints,
    infra_in_containers,
    secret_union,
    translate,
)
from dynkv.infra.etcd_argv import ETCD_CLIENT_PORT, ETCD_PEER_PORT, container_etcd_argv, member_name
from dynkv.plan.model import Plan, Probe, probe_json

WORKERS_ENV_FILE = "workers.env"
FRONTEND_ENV_FILE = "frontend.env"
HEALTHCHECK_MODULE = "dynkv.export.healthcheck"
SHM_GB = 4  # /dev/shm of a vLLM container (its workers and NCCL use shared memory)
RESTART = "on-failure"


def naming(plan: Plan) -> Naming:
    etcd, nats = infra_endpoints(plan, etcd_host="etcd", nats_host="nats")
    return Naming(
        etcd=etcd,
        nats=nats,
        url=lambda svc, port: f"http://{svc.name}:{port}",
        worker_id=lambda svc: svc.info.worker_id or svc.name,
        side_channel_host=lambda svc: svc.name,
    )


def project_name(plan: Plan) -> str:
    return "dynkv-" + plan.name.lower().replace(".", "-")


def compose_file(plan: Plan, options: ExportOptions) -> dict[str, Any]:
    """The compose file of `plan`."""
    workers, frontend = translate(plan, options, naming(plan))
    services: dict[str, Any] = {}
    infra = infra_in_containers(plan)
    if infra:
        services["etcd"] = _etcd(plan, options)
        services["nats"] = _nats(options)
    prefill_ipc = _handoff_producer(workers)
    for worker in workers:
        services[worker.name] = _worker(plan, worker, options, infra=infra, ipc_of=prefill_ipc)
    services["frontend"] = _frontend(plan, frontend, workers, options)
    volumes: dict[str, Any] = {"hf-cache": {}}
    volumes.update({_g3_volume(w): {} for w in workers if w.g3_dir})
    return {"name": project_name(plan), "services": services, "volumes": volumes}


def secret_env_files(plan: Plan, options: ExportOptions) -> dict[str, tuple[str, ...]]:
    """Env file → the secret names it must hold (values are the CLI's business)."""
    workers, frontend = translate(plan, options, naming(plan))
    return {WORKERS_ENV_FILE: secret_union(workers), FRONTEND_ENV_FILE: frontend.secrets}


# ---- services -------------------------------------------------------------------------------


def _etcd(plan: Plan, options: ExportOptions) -> dict[str, Any]:
    return {
        "image": options.etcd_image,
        "command": list(
            container_etcd_argv(
                member_name(plan.name),
                data_dir="/etcd-data",
                client_url=f"http://etcd:{ETCD_CLIENT_PORT}",
                peer_url=f"http://etcd:{ETCD_PEER_PORT}",
            )
        ),
        "restart": RESTART,
        # the plan's probe is GET /health; the etcd image has etcdctl but no HTTP client
        "healthcheck": _timing(
            {
                "test": [
                    "CMD",
                    "etcdctl",
                    f"--endpoints=http://127.0.0.1:{ETCD_CLIENT_PORT}",
                    "endpoint",
                    "health",
                ]
            },
            start_period=60,
        ),
    }


def _nats(options: ExportOptions) -> dict[str, Any]:
    # no healthcheck: the NATS image has no shell or HTTP client to run the plan's probe
    # (GET :8222/healthz); dependents wait for it to start (docs/export.md)
    return {
        "image": options.nats_image,
        "command": ["-js", "-sd", "/data", "-m", str(NATS_MONITOR_PORT)],
        "restart": RESTART,
    }


def _handoff_producer(workers: tuple[ContainerWorker, ...]) -> str | None:
    """The prefill service whose /dev/shm the decode workers share (the handoff pool)."""
    producers = [w.name for w in workers if w.handoff_dir and w.role == "prefill"]
    return producers[0] if producers else None


def _worker(
    plan: Plan,
    worker: ContainerWorker,
    options: ExportOptions,
    *,
    infra: bool,
    ipc_of: str | None,
) -> dict[str, Any]:
    depends: dict[str, Any] = {}
    if infra:
        depends = {
            "etcd": {"condition": "service_healthy"},
            "nats": {"condition": "service_started"},
        }
    service: dict[str, Any] = {
        "image": options.image,
        "command": list(worker.argv),
        "environment": dict(worker.env),
        "env_file": [WORKERS_ENV_FILE],
        "restart": RESTART,
        "healthcheck": _probe_check(worker.probes, plan.startup_timeout_secs),
        "volumes": [f"hf-cache:{HF_CACHE}"],
    }
    if worker.g3_dir:
        service["volumes"].append(f"{_g3_volume(worker)}:{G3_MOUNT}")
    if worker.model_dir:
        service["volumes"].append(f"{worker.model_dir}:{worker.model_dir}:ro")
    if worker.handoff_dir and ipc_of and worker.name != ipc_of:
        service["ipc"] = f"service:{ipc_of}"  # the producer's /dev/shm: the handoff pool
        depends[ipc_of] = {"condition": "service_started"}
    else:
        gb = SHM_GB
        if worker.handoff_dir:
            service["ipc"] = "shareable"
            gb += math.ceil(float(worker.env.get("DYN_KVBM_HANDOFF_GB") or 1))
        service["shm_size"] = f"{gb}gb"
    if depends:
        service["depends_on"] = depends
    if worker.gpus:
        device: dict[str, Any] = {"driver": "nvidia", "capabilities": ["gpu"]}
        if worker.gpu_ids:
            device["device_ids"] = list(worker.gpu_ids)
        else:
            device["count"] = worker.gpus
        service["deploy"] = {"resources": {"reservations": {"devices": [device]}}}
    return service


def _frontend(
    plan: Plan,
    frontend: ContainerFrontend,
    workers: tuple[ContainerWorker, ...],
    options: ExportOptions,
) -> dict[str, Any]:
    host = frontend.publish_host
    published = f"[{host}]" if ":" in host else host
    return {
        "image": options.image,
        "command": list(frontend.argv),
        "environment": dict(frontend.env),
        "env_file": [FRONTEND_ENV_FILE],
        "restart": RESTART,
        "ports": [f"{published}:{frontend.port}:{frontend.port}"],
        # started after every worker is registered, as `dynkv up` starts it
        "depends_on": {w.name: {"condition": "service_healthy"} for w in workers},
        "healthcheck": _probe_check((frontend.probe,), 60),
    }


def _g3_volume(worker: ContainerWorker) -> str:
    return f"g3-{worker.name}"


def probe_command(probes: tuple[Probe, ...]) -> list[str]:
    """The plan's probes, run inside the container (`python3 -m dynkv.export.healthcheck`)."""
    data = json.dumps([probe_json(p) for p in probes], separators=(",", ":"))
    return [CONTAINER_PYTHON, "-m", HEALTHCHECK_MODULE, data]


def _probe_check(probes: tuple[Probe, ...], start_period: float) -> dict[str, Any]:
    return _timing({"test": ["CMD", *probe_command(probes)]}, start_period=start_period)


def _timing(check: dict[str, Any], *, start_period: float) -> dict[str, Any]:
    return {
        **check,
        "interval": "10s",
        "timeout": "10s",
        "retries": 3,
        "start_period": f"{math.ceil(start_period)}s",
    }
