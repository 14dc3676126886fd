"""What a plan's services become in containers: the translation both exporters share.

A plan describes one host (docs/architecture.md): services bind 127.0.0.1, find each other on
loopback ports, keep pools under the state dir, share the disagg handoff through /dev/shm, and get
GPUs through CUDA_VISIBLE_DEVICES and cores through VLLM_CPU_OMP_THREADS_BIND. In a container each
of those means something else, so `translate` rewrites them once, here:

- vLLM and the frontend bind 0.0.0.0 inside their container; a worker registers the address
  the frontend can reach it at (compose: its service name; Kubernetes: its pod IP), which the
  target chooses through a `Naming`;
- etcd and NATS are reached at the target's service names, on their standard ports;
- GPUs become the target's device reservation (`gpu_ids` for compose, a count for Kubernetes);
  CUDA_VISIBLE_DEVICES, the CPU binding (and the wrapper's `--cpus`), PYTHONPATH and HF_HOME
  (this host's paths) are dropped;
- a G3 pool moves under `G3_MOUNT`, where the target mounts a volume; the handoff pool stays at
  /dev/shm/dynkv-<name>, which the target shares between the prefill and decode containers;
- secrets (the deployment secret, the frontend's API key, Hugging Face tokens) never travel as
  values: a container lists their *names*, and the target reads them from a Secret or env file.

Pure: nothing here reads the host or a secret's value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from dynkv.infra.etcd_argv import ANY_ADDRESS, ETCD_CLIENT_PORT
from dynkv.infra.images import ETCD_IMAGE, NATS_IMAGE
from dynkv.plan.frontend import API_KEY_ENV
from dynkv.plan.frontend import ETCD_ENDPOINTS_ENV as FRONTEND_ETCD_ENV
from dynkv.plan.frontend import NATS_URL_ENV as FRONTEND_NATS_ENV
from dynkv.plan.model import (
    EtcdKeyProbe,
    HttpProbe,
    Plan,
    Probe,
    Service,
    TcpProbe,
    is_secret_name,
    redact_urls,
)
from dynkv.plan.worker import ETCD_ENDPOINTS_ENV as WORKER_ETCD_ENV
from dynkv.plan.worker import PASSTHROUGH_ENV
from dynkv.settings.errors import SettingsError
from dynkv.worker.record import DEPLOYMENT_SECRET_ENV, workers_prefix

CONTAINER_PYTHON = "python3"  # the interpreter of the official vLLM image
G3_MOUNT = "/var/cache/dynkv/g3"
HF_CACHE = "/root/.cache/huggingface"  # the vLLM image runs as root
NATS_PORT, NATS_MONITOR_PORT = 4222, 8222
NATS_URL_ENV = "DYNKV_KV_EVENTS_NATS_URL"
SIDE_CHANNEL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"
SIDE_CHANNEL_PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_PORT"
EVENTS_WORKER_ID_ENV = "DYNKV_KV_EVENTS_WORKER_ID"
G1_ENDPOINT_ENV = "DYNKV_KV_EVENTS_G1_ENDPOINT"
# vLLM's KV events socket (the G1 bridge, docs/kv-events.md): private to the worker's container
CONTAINER_KV_EVENTS = "ipc:///tmp/dynkv-kv-events.sock"
# This host's paths and device choices: meaningless in a container (the target replaces them).
HOST_LOCAL_ENV = ("CUDA_VISIBLE_DEVICES", "VLLM_CPU_OMP_THREADS_BIND", "PYTHONPATH", "HF_HOME")
# Secrets every dynkv container may need; a Hugging Face token is optional (gated models only).
OPTIONAL_SECRETS = tuple(n for n in PASSTHROUGH_ENV if is_secret_name(n))


class ExportError(SettingsError):
    """A plan or an option that cannot become the requested export (exit 2, cause + fix)."""


@dataclass(frozen=True)
class G3Volume:
    """Where a Kubernetes worker's G3 pool lives: `emptyDir` (the pod's life), `pvc` (a
    PersistentVolumeClaim `ref`), `hostPath` (the node's directory `ref`)."""

    kind: Literal["emptyDir", "pvc", "hostPath"] = "emptyDir"
    ref: str = ""


_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def parse_g3_volume(text: str) -> G3Volume:
    """`emptyDir`, `pvc:NAME` or `hostPath:/abs/path` (the `--g3-volume` option)."""
    kind, _, ref = text.partition(":")
    if kind == "emptyDir" and not ref:
        return G3Volume()
    if kind == "pvc" and _DNS_LABEL.match(ref):
        return G3Volume("pvc", ref)
    if kind == "hostPath" and ref.startswith("/"):
        return G3Volume("hostPath", ref)
    raise ExportError(
        f"--g3-volume {text!r} is not a volume dynkv can export",
        "use emptyDir, pvc:NAME (an existing PersistentVolumeClaim) or hostPath:/absolute/path",
    )


@dataclass(frozen=True)
class ExportOptions:
    """What the target needs beyond the plan: images, the G3 volume, GPUs per worker of each
    role (tensor × pipeline parallel size: the plan names GPU ids only when it shares several
    out), the profile file to show in a ConfigMap."""

    image: str
    etcd_image: str = ETCD_IMAGE
    nats_image: str = NATS_IMAGE
    g3_volume: G3Volume = field(default_factory=G3Volume)
    gpus_per_role: Mapping[str, int] = field(default_factory=dict)
    profile_text: str | None = None


@dataclass(frozen=True)
class Naming:
    """How a target names a worker to its peers: the URL it registers, its registration id, the
    host its NIXL side channel advertises. `etcd` and `nats` are where the containers find them."""

    etcd: tuple[str, ...]
    nats: str
    url: Callable[[Service, int], str]
    worker_id: Callable[[Service], str]
    side_channel_host: Callable[[Service], str]


@dataclass(frozen=True)
class ContainerWorker:
    name: str
    role: str
    worker_id: str
    argv: tuple[str, ...]
    env: dict[str, str]  # no secret values: those are `secrets`, read from the target's store
    secrets: tuple[str, ...]
    port: int
    ports: dict[str, int]
    probes: tuple[Probe, ...]
    gpus: int  # 0 on a CPU plan
    gpu_ids: tuple[str, ...] | None  # the plan's own GPU choice, when it made one
    g3_dir: str | None  # the pool directory under G3_MOUNT, when G3 is on
    handoff_dir: str | None  # the disagg shared-memory pool, when the plan uses one
    model_dir: str | None  # a model directory on this host (an HF id needs none)


@dataclass(frozen=True)
class ContainerFrontend:
    argv: tuple[str, ...]
    env: dict[str, str]
    secrets: tuple[str, ...]
    port: int
    publish_host: str  # the address the plan binds: where a compose file publishes the port
    probe: Probe
    insecure: bool


def translate(
    plan: Plan, options: ExportOptions, naming: Naming
) -> tuple[tuple[ContainerWorker, ...], ContainerFrontend]:
    """The plan's workers and frontend as containers (refusing what cannot be exported)."""
    _check_endpoints(naming)
    workers = tuple(_worker(svc, plan, options, naming) for svc in plan.workers)
    frontend = _frontend(plan.service("frontend"), naming)
    return workers, frontend


def _check_endpoints(naming: Naming) -> None:
    """External etcd/NATS URLs travel as plain environment: one carrying credentials would put
    a secret into the export, so it is refused."""
    for url in (*naming.etcd, naming.nats):
        if "@" in urlsplit(url).netloc:
            raise ExportError(
                f"the external endpoint {redact_urls(url)} carries credentials, and an export "
                "writes endpoints in plain text",
                "export with endpoints without user:password@ (put the credentials in your "
                "cluster's own secret mechanism), or with DYNKV_INFRA=embedded",
            )


def infra_in_containers(plan: Plan) -> bool:
    """etcd and NATS run as part of the export unless the plan uses someone else's."""
    return plan.infra != "external"


def infra_endpoints(plan: Plan, *, etcd_host: str, nats_host: str) -> tuple[tuple[str, ...], str]:
    """(etcd endpoints, NATS URL) the containers use: the exported etcd and NATS at the target's
    host names, or the plan's own endpoints when it uses someone else's."""
    if infra_in_containers(plan):
        return (f"http://{etcd_host}:{ETCD_CLIENT_PORT}",), f"nats://{nats_host}:{NATS_PORT}"
    return plan.etcd_endpoints, plan.nats_url


def secret_union(items: Iterable[ContainerWorker | ContainerFrontend]) -> tuple[str, ...]:
    """The secret names the containers read, each once, in first-seen order."""
    names: list[str] = []
    for item in items:
        names += [n for n in item.secrets if n not in names]
    return tuple(names)


def handoff_pool(workers: tuple[ContainerWorker, ...]) -> str | None:
    pools = {w.handoff_dir for w in workers if w.handoff_dir}
    return next(iter(pools)) if pools else None


def skipped(plan: Plan) -> list[str]:
    """Services of the plan an export leaves out, said once on stderr by the CLI."""
    names = [s.name for s in plan.services if s.role == "prometheus"]
    return [f"{n} is not exported (run your own monitoring; docs/export.md)" for n in names]


# ---- workers --------------------------------------------------------------------------------


def _worker(svc: Service, plan: Plan, options: ExportOptions, naming: Naming) -> ContainerWorker:
    port = svc.ports["http"]
    worker_id = naming.worker_id(svc)
    url = naming.url(svc, port)
    env, secrets = _split_env(svc.env)
    env[WORKER_ETCD_ENV] = ",".join(naming.etcd)
    if NATS_URL_ENV in env:
        env[NATS_URL_ENV] = naming.nats
    if EVENTS_WORKER_ID_ENV in env:
        env[EVENTS_WORKER_ID_ENV] = worker_id  # the router joins events to the registration
    if SIDE_CHANNEL_HOST_ENV in env:
        env[SIDE_CHANNEL_HOST_ENV] = naming.side_channel_host(svc)
    if G1_ENDPOINT_ENV in env:
        env[G1_ENDPOINT_ENV] = CONTAINER_KV_EVENTS
    g3_dir = None
    if "DYN_KVBM_DISK_CACHE_DIR" in env:
        pool = env["DYN_KVBM_DISK_CACHE_DIR"].rstrip("/").rsplit("/", 1)[-1]
        g3_dir = f"{G3_MOUNT}/{pool}"
        env["DYN_KVBM_DISK_CACHE_DIR"] = g3_dir
        if not _g3_on(env):
            g3_dir = None
    gpu_ids = None
    if plan.device == "cuda":
        visible = svc.env.get("CUDA_VISIBLE_DEVICES")
        gpu_ids = tuple(g for g in visible.split(",") if g) if visible else None
        gpus = len(gpu_ids) if gpu_ids else int(options.gpus_per_role.get(svc.role, 1))
    else:
        gpus = 0
    argv, model = _worker_argv(svc.argv, url=url, worker_id=worker_id)
    ports = dict(svc.ports)
    if SIDE_CHANNEL_PORT_ENV in env:
        ports["nixl"] = int(env[SIDE_CHANNEL_PORT_ENV])
    key = workers_prefix(plan.name) + _shell_ref(worker_id)
    probes = tuple(
        EtcdKeyProbe(endpoints=naming.etcd, key=key) if isinstance(p, EtcdKeyProbe) else p
        for p in svc.probes
    )
    return ContainerWorker(
        name=svc.name,
        role=svc.role,
        worker_id=worker_id,
        argv=argv,
        env=env,
        secrets=_with_deployment_secret(secrets),
        port=port,
        ports=ports,
        probes=probes,
        gpus=gpus,
        gpu_ids=gpu_ids,
        g3_dir=g3_dir,
        handoff_dir=env.get("DYN_KVBM_HANDOFF_DIR"),
        model_dir=model if model.startswith("/") else None,
    )


def _g3_on(env: Mapping[str, str]) -> bool:
    def number(name: str) -> float:
        try:
            return float(env.get(name) or 0)
        except ValueError:
            return 0.0

    return (
        number("DYN_KVBM_DISK_CACHE_GB") > 0
        or number("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS") > 0
    )


def _worker_argv(argv: tuple[str, ...], *, url: str, worker_id: str) -> tuple[tuple[str, ...], str]:
    """The wrapper's argv with the container's URL and id, vLLM bound to 0.0.0.0, the
    container's interpreter; and the model vLLM loads."""
    split = argv.index("--")
    wrapper = _set_flags(argv[:split], {"--url": url, "--worker-id": worker_id})
    if "--cpus" in wrapper:  # this host's cores: a container gets its own (the target's limits)
        at = wrapper.index("--cpus")
        wrapper = wrapper[:at] + wrapper[at + 2 :]
    vllm = _set_flags(argv[split + 1 :], {"--host": ANY_ADDRESS})
    if "--kv-events-config" in vllm:  # vLLM's KV events socket: in the container, not the state dir
        events = json.loads(vllm[vllm.index("--kv-events-config") + 1])
        events["endpoint"] = CONTAINER_KV_EVENTS
        vllm = _set_flags(vllm, {"--kv-events-config": json.dumps(events, separators=(",", ":"))})
    model = vllm[vllm.index("--model") + 1] if "--model" in vllm else ""
    if model.startswith("<"):  # a catalogue model a dry plan only names
        raise ExportError(
            f"the model {model} lives in this host's model cache, which a container cannot read",
            "pass --model with a Hugging Face id (or a model directory the containers mount)",
        )
    return (CONTAINER_PYTHON, *wrapper[1:], "--", CONTAINER_PYTHON, *vllm[1:]), model


def _set_flags(argv: tuple[str, ...], values: Mapping[str, str]) -> tuple[str, ...]:
    out = list(argv)
    for flag, value in values.items():
        if flag in out:
            out[out.index(flag) + 1] = value
    return tuple(out)


def _shell_ref(text: str) -> str:
    """Kubernetes' `$(VAR)` as the `${VAR}` the healthcheck expands from its own environment."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", r"${\1}", text)


# ---- frontend -------------------------------------------------------------------------------


def _frontend(svc: Service, naming: Naming) -> ContainerFrontend:
    if "--tls-cert" in svc.argv:
        raise ExportError(
            "the frontend's --tls-cert/--tls-key are files on this host, and an export does "
            "not carry them",
            "export without --tls-cert/--tls-key and terminate TLS at your ingress or proxy",
        )
    insecure = "--insecure" in svc.argv
    env, secrets = _split_env(svc.env)
    env[FRONTEND_ETCD_ENV] = ",".join(naming.etcd)
    if FRONTEND_NATS_ENV in env:  # the KV router's events (docs/kv-events.md)
        env[FRONTEND_NATS_ENV] = naming.nats
    # the frontend listens beyond loopback in its container: it takes an API key unless the
    # user chose --insecure (docs/security.md); the key comes from the Secret, not the plan
    if API_KEY_ENV in svc.env or not insecure:
        secrets = (*secrets, API_KEY_ENV) if API_KEY_ENV not in secrets else secrets
    port = svc.ports["http"]
    argv = _set_flags(svc.argv, {"--host": ANY_ADDRESS})
    probe = svc.probes[0] if svc.probes else TcpProbe(host="127.0.0.1", port=port)
    if isinstance(probe, HttpProbe):
        probe = HttpProbe(
            url=f"http://127.0.0.1:{port}/health",
            expect_status=probe.expect_status,
            expect_json=probe.expect_json,
        )
    return ContainerFrontend(
        argv=(CONTAINER_PYTHON, *argv[1:]),
        env=env,
        secrets=_with_deployment_secret(secrets),
        port=port,
        publish_host=svc.info.bind_host or "127.0.0.1",
        probe=probe,
        insecure=insecure,
    )


def _split_env(env: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """(plain variables, names of secret ones): no secret value leaves this function."""
    plain = {k: v for k, v in env.items() if not is_secret_name(k) and k not in HOST_LOCAL_ENV}
    secret = tuple(k for k in env if is_secret_name(k) and k not in OPTIONAL_SECRETS)
    return plain, secret


def _with_deployment_secret(names: tuple[str, ...]) -> tuple[str, ...]:
    """Every dynkv container signs or verifies registrations with the deployment secret (listed
    first, whatever order the plan's environment had)."""
    return (DEPLOYMENT_SECRET_ENV, *(n for n in names if n != DEPLOYMENT_SECRET_ENV))
