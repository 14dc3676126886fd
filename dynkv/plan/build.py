"""settings + host facts → Plan. Pure: the same inputs give the same plan, and nothing starts.

Everything that depends on the machine (device, usable cores, interpreter, binaries, model path,
the few inherited variables the plan mentions) arrives in `HostFacts`; `HostFacts.detect` is the
one impure helper that gathers them, so tests build plans for a CUDA host on a CPU box.
"""

from __future__ import annotations

from dynkv.infra.docker import etcd_docker_service, nats_docker_service
from dynkv.infra.embedded import LOOPBACK, etcd_service, nats_service
from dynkv.infra.external import external_probes, nats_host_port, split_endpoints
from dynkv.kvbm.event_settings import KvEventsSettings
from dynkv.kvbm.roles import Role
from dynkv.plan.cpu import cpu_engine_env, split_cores
from dynkv.plan.dtype import default_dtype_argv, dtype_note
from dynkv.plan.engine_args import check_engine_args, engine_notes, role_argv
from dynkv.plan.enroll import ENROLL, enroll_service
from dynkv.plan.errors import PlanError
from dynkv.plan.fleet import assign_gpus, check_counts, per_worker_gpus, worker_slots
from dynkv.plan.frontend import API_KEY_ENV, checked_access, frontend_service
from dynkv.plan.host import HostFacts, find_prometheus
from dynkv.plan.model import Plan, Service, TcpProbe, topological_order
from dynkv.plan.ports import check_port_clashes, worker_port
from dynkv.plan.prometheus import prometheus_service
from dynkv.plan.secure import secure_frontend, secure_worker
from dynkv.plan.worker import (
    PASSTHROUGH_ENV,
    handoff_dir,
    kv_transfer_config,
    metrics_url,
    vllm_argv,
    worker_service,
)
from dynkv.settings.resolve import Resolved
from dynkv.tls.layout import nats_token, transport_security
from dynkv.tls.model import TransportSecurity

__all__ = ["HostFacts", "PlanError", "build_plan", "disagg_transfer", "find_prometheus"]


def build_plan(resolved: Resolved, host: HostFacts) -> Plan:
    dep = resolved.deployment
    ddir = dep.deployment_dir
    check_settings(resolved, host)

    services: list[Service] = []
    external = ()
    tls = _transport_security(resolved, host)
    token = nats_token(host.secret) if tls is not None and host.secret else None
    if tls is not None:  # `up --advertise`: etcd and NATS on that address, over TLS
        endpoints = (f"https://{tls.advertise}:{dep.etcd_port}",)
        nats_url = f"tls://{tls.advertise}:{dep.nats_port}"
        services += [
            etcd_service(
                deployment=dep.name,
                deployment_dir=ddir,
                binary=host.etcd_binary,
                client_port=dep.etcd_port,
                peer_port=dep.etcd_peer_port,
                tls=tls,
            ),
            nats_service(
                deployment_dir=ddir,
                binary=host.nats_binary,
                port=dep.nats_port,
                monitor_port=dep.nats_monitor_port,
                tls=tls,
                token=token,
            ),
        ]
    elif dep.infra == "external":
        endpoints = split_endpoints(dep.etcd_endpoints)
        nats_host_port(dep.nats_url)  # validates the URL
        nats_url = dep.nats_url
        external = external_probes(endpoints, nats_url)
    else:
        endpoints = (f"http://{LOOPBACK}:{dep.etcd_port}",)
        nats_url = f"nats://{LOOPBACK}:{dep.nats_port}"
        if dep.infra == "docker":
            services += [
                etcd_docker_service(
                    deployment=dep.name,
                    client_port=dep.etcd_port,
                    peer_port=dep.etcd_peer_port,
                    image=dep.etcd_image,
                ),
                nats_docker_service(
                    deployment=dep.name,
                    port=dep.nats_port,
                    monitor_port=dep.nats_monitor_port,
                    image=dep.nats_image,
                ),
            ]
        else:
            services += [
                etcd_service(
                    deployment=dep.name,
                    deployment_dir=ddir,
                    binary=host.etcd_binary,
                    client_port=dep.etcd_port,
                    peer_port=dep.etcd_peer_port,
                ),
                nats_service(
                    deployment_dir=ddir,
                    binary=host.nats_binary,
                    port=dep.nats_port,
                    monitor_port=dep.nats_monitor_port,
                ),
            ]
    if tls is not None:  # answers other hosts' `dynkv join` (docs/multi-host.md)
        services.append(
            enroll_service(
                deployment=dep.name,
                deployment_dir=ddir,
                python=host.python,
                etcd_endpoints=endpoints,
                tls=tls,
                env=_pythonpath(host),
                depends_on=("etcd",),
            )
        )
    infra_names = tuple(s.name for s in services if s.name != ENROLL)
    transfer = disagg_transfer(resolved, host)  # workers and frontend must agree on it
    check_counts(resolved, transfer)
    workers = _workers(resolved, host, endpoints, infra_names, transfer, nats_url)
    # with no worker of its own (--workers 0) the frontend waits for the infra instead
    after = tuple(w.name for w in workers) or infra_names
    frontend = _frontend(resolved, host, endpoints, after, transfer)
    if tls is not None:
        workers = [secure_worker(w, tls, token) for w in workers]
        frontend = secure_frontend(frontend, tls, token, user_cert=frontend_user_cert(resolved))
        if not workers:  # its /health says "starting" until a joined node's worker registers
            port = frontend.ports["http"]
            frontend = frontend.replace(probes=(TcpProbe(host=tls.advertise, port=port),))
    services += workers
    services.append(frontend)
    if dep.observability:
        services.append(_prometheus(resolved, host, workers, frontend, tls))

    ordered = topological_order(tuple(services))
    check_port_clashes(ordered)
    return Plan(
        name=dep.name,
        deployment_dir=str(ddir),
        device=host.device,
        topology=str(dep.topology),
        infra=str(dep.infra),
        etcd_endpoints=endpoints,
        nats_url=nats_url,
        services=ordered,
        external=external,
        notes=_notes(host, ordered)
        + engine_notes(resolved.engine_args, host.vllm_args, host.vllm_args_unchecked)
        + dtype_note([svc.argv for svc in ordered]),
        startup_timeout_secs=dep.startup_timeout_secs,
        transport_security=tls,
    )


def _transport_security(resolved: Resolved, host: HostFacts) -> TransportSecurity | None:
    """`up --advertise ADDR`: the certificates every service and client uses; None: loopback."""
    dep = resolved.deployment
    if dep.advertise is None:
        return None
    if dep.infra != "embedded":
        raise PlanError(
            f"--advertise serves etcd and NATS itself, over TLS, and infra is {dep.infra}",
            "drop --infra (embedded is the default), or drop --advertise",
        )
    if not host.secret:
        raise PlanError(
            "--advertise needs the deployment secret (it derives the NATS token from it)",
            "run `dynkv up` as the user who owns the state dir, so that it can keep one",
        )
    workers = tuple(slot.name for slot in worker_slots(dep))
    return transport_security(
        advertise=dep.advertise,
        deployment_dir=dep.deployment_dir,
        servers=("etcd", "nats", "frontend", *workers),
        clients=("frontend", *workers),
    )


def check_settings(resolved: Resolved, host: HostFacts) -> None:
    """What the settings must agree on before any service is placed (a joined node's plan,
    `dynkv.plan.join`, checks the same)."""
    dep = resolved.deployment
    if dep.topology == "disagg" and host.device == "cpu" and len(host.cpus) < 2:
        raise PlanError(
            "disagg on CPU needs at least 2 cores (prefill and decode each get their own)",
            "use --topology agg, or run on a host with more cores",
        )
    if dep.topology == "disagg" and not dep.kvbm:
        raise PlanError(
            "disagg hands the prompt's KV from prefill to decode through the KVBM connector, "
            "and DYNKV_KVBM=false turns it off",
            "use --topology agg for a deployment without KVBM, or drop --no-kvbm (DYNKV_KVBM)",
        )
    if host.device == "cpu" and dep.block_size % 32:
        raise PlanError(
            f"block size {dep.block_size} does not work with vLLM on CPU (needs a multiple of 32)",
            "export DYNKV_BLOCK_SIZE=32 (or 64, 96, ...)",
        )
    check_engine_args(resolved, host.vllm_args)


def disagg_transfer(resolved: Resolved, host: HostFacts) -> str | None:
    """How a disagg deployment moves the prompt's KV from prefill to decode: "handoff" (dynkv's
    shared-memory pool) or "nixl" (vLLM's NixlConnector); None for agg."""
    dep = resolved.deployment
    if dep.topology != "disagg":
        return None
    nixl_ok = host.device == "cuda" and host.nixl
    if dep.disagg_transfer == "auto":
        return "nixl" if nixl_ok else "handoff"
    if dep.disagg_transfer == "nixl" and not nixl_ok:
        missing = "a CUDA device" if host.device != "cuda" else "the nixl package"
        raise PlanError(
            f"DYNKV_DISAGG_TRANSFER=nixl needs CUDA and the nixl package, and this host lacks "
            f"{missing}",
            "pip install nixl on a CUDA host, or export DYNKV_DISAGG_TRANSFER=handoff "
            "(dynkv's shared-memory handoff, one host)",
        )
    return str(dep.disagg_transfer)


def _workers(
    resolved: Resolved,
    host: HostFacts,
    endpoints: tuple[str, ...],
    depends_on: tuple[str, ...],
    transfer: str | None,
    nats_url: str,
    node: str | None = None,
    bind: str = LOOPBACK,
) -> list[Service]:
    """The deployment's workers; `node`/`bind`: a joined node's (`dynkv.plan.join`), whose ids,
    G3 pools and handoff pool carry the node name and whose vLLM listens on its address."""
    dep, kvbm = resolved.deployment, resolved.kvbm
    local = f"{dep.name}-{node}" if node else dep.name  # one box may simulate both hosts
    kv_bytes = None if dep.device_kv_gb is None else int(dep.device_kv_gb * 1e9)
    handoff = handoff_dir(local) if transfer == "handoff" else None
    slots = worker_slots(dep)
    if not slots:  # --workers 0: a control-plane-only first host (docs/multi-host.md)
        return []
    cores = split_cores(host.cpus, len(slots)) if host.device == "cpu" else []
    gpus = {}
    if host.device == "cuda":
        gpus = assign_gpus(slots, per_worker_gpus(resolved, host.vllm_args), dep, host.environ)
    workers = []
    for slot in slots:
        role, index = slot.role, slot.position
        worker_id = f"{node}-{slot.worker_id}" if node else slot.worker_id
        port = worker_port(dep.worker_port, index)
        # over NIXL the decode worker runs vLLM's NixlConnector alone: the profile's tiers
        # serve the prefill worker, and no dynkv handoff pool exists to read
        dynkv = dep.kvbm and not (transfer == "nixl" and role == Role.DECODE)
        metrics_port: int | None = worker_port(kvbm.metrics_port, index) if dynkv else None
        env = kvbm.to_env() if dynkv else {}
        if metrics_port is not None:
            if resolved.settings["DYN_KVBM_METRICS"].source == "default":
                env["DYN_KVBM_METRICS"] = "true"  # `dynkv status` reads the worker's metrics
            env["DYN_KVBM_METRICS_PORT"] = str(metrics_port)
            # one pool per deployment and worker: pools are locked to one engine, and a
            # restarted deployment finds its own blocks again
            env["DYN_KVBM_DISK_CACHE_DIR"] = str(
                kvbm.disk_cache_dir / f"{local}-{slot.pool_suffix}"
            )
        if dynkv:  # the worker's KVBM publishes its G2/G3 changes for the router
            env.update(
                KvEventsSettings.env(nats_url=nats_url, deployment=dep.name, worker_id=worker_id)
            )
        if handoff is not None:
            env["DYN_KVBM_HANDOFF_DIR"] = str(handoff)
        if role == Role.DECODE and dynkv:
            # the profile's tiers belong to the prefill worker, which sees every prompt; the
            # decode worker receives prompts through the handoff pool only
            for name in DECODE_TIERLESS:
                env[name] = "0"
        if transfer == "nixl":
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = bind
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(worker_port(dep.nixl_side_channel_port, index))
        if gpus.get(slot.name) is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot.name])  # disjoint (docs/fleet.md)
        env_unset: tuple[str, ...] = ()
        if host.device == "cpu":
            cpu_env, env_unset = cpu_engine_env(
                cores[index], engines=len(slots), kv_cache_bytes=kv_bytes, user_env=host.environ
            )
            env.update(cpu_env)
        env_unset += (API_KEY_ENV,)  # the frontend's secret; a worker has no use for it
        for name in ("PYTHONPATH", *PASSTHROUGH_ENV):
            if host.environ.get(name):
                env[name] = host.environ[name]
        vllm = vllm_argv(
            python=host.python,
            model=host.model.model,
            served_name=host.model.served_name,
            port=port,
            block_size=dep.block_size,
            max_model_len=dep.max_model_len,
            kv_cache_bytes=kv_bytes,
            kv_transfer=kv_transfer_config(dynkv=dynkv, nixl=transfer == "nixl"),
            engine=_engine_argv(resolved, role, host),
            bind=bind,
        )
        served_metrics = (
            None if metrics_port is None else metrics_url(kvbm.metrics_host, metrics_port)
        )
        workers.append(
            worker_service(
                deployment=dep.name,
                deployment_dir=dep.deployment_dir,
                role=role,
                index=slot.index,
                name=slot.name,
                python=host.python,
                vllm=vllm,
                port=port,
                served_name=host.model.served_name,
                metrics=served_metrics,
                metrics_port=metrics_port,
                env=env,
                env_unset=env_unset,
                etcd_endpoints=endpoints,
                lease_ttl=dep.lease_ttl_secs,
                depends_on=depends_on,
                secret=host.secret,
                worker_id=worker_id,
                bind=bind,
                node=node,
            )
        )
        if handoff is not None and role == Role.PREFILL:
            workers[-1] = workers[-1].replace(data_dirs=(*workers[-1].data_dirs, str(handoff)))
    return workers


def _frontend(
    resolved: Resolved,
    host: HostFacts,
    endpoints: tuple[str, ...],
    workers: tuple[str, ...],
    transfer: str | None,
) -> Service:
    dep = resolved.deployment
    env = _pythonpath(host)
    return frontend_service(
        deployment=dep.name,
        deployment_dir=dep.deployment_dir,
        python=host.python,
        host=dep.advertise or dep.frontend_host,  # --advertise: other hosts reach it there
        port=dep.frontend_port,
        router=str(dep.router),
        etcd_endpoints=endpoints,
        models=(host.model.served_name,),
        access=checked_access(resolved),
        env=env,
        depends_on=workers,
        disagg_fallback=dep.topology == "disagg" and dep.disagg_fallback,
        disagg_transfer=transfer,
        secret=host.secret,
    )


def _pythonpath(host: HostFacts) -> dict[str, str]:
    return {"PYTHONPATH": host.environ["PYTHONPATH"]} if host.environ.get("PYTHONPATH") else {}


def _prometheus(
    resolved: Resolved,
    host: HostFacts,
    workers: list[Service],
    frontend: Service,
    tls: TransportSecurity | None = None,
) -> Service:
    """Prometheus after the frontend, with every address the plan just chose as a target."""
    dep = resolved.deployment

    def address(url: str) -> str:
        return url.split("://", 1)[1].split("/", 1)[0]

    kvbm = {
        w.info.worker_id or w.name: address(w.info.metrics_url)
        for w in workers
        if w.info.metrics_url  # None: a worker without KVBM
    }
    return prometheus_service(
        deployment=dep.name,
        deployment_dir=dep.deployment_dir,
        binary=host.prometheus_binary,
        port=dep.prometheus_port,
        frontend=address(frontend.info.url or ""),
        kvbm=kvbm,
        vllm={w.info.worker_id or w.name: address(w.info.url or "") for w in workers},
        api_key=frontend.env.get(API_KEY_ENV),
        user=host.user,
        depends_on=(frontend.name,),
        frontend_tls_cert=_frontend_scrape_ca(resolved, tls),
        image=dep.prometheus_image,
        workers_ca=tls.ca_cert if tls is not None else None,
    )


def _frontend_scrape_ca(resolved: Resolved, tls: TransportSecurity | None) -> str | None:
    """What Prometheus verifies the frontend's certificate against: the user's own certificate,
    else the deployment's CA when advertised, else nothing (plain http)."""
    user = frontend_user_cert(resolved)
    if user is not None:
        return user[0]
    return tls.ca_cert if tls is not None else None


def frontend_user_cert(resolved: Resolved) -> tuple[str, str] | None:
    dep = resolved.deployment
    return (str(dep.tls_cert), str(dep.tls_key)) if dep.tls_cert and dep.tls_key else None


DECODE_TIERLESS = (
    "DYN_KVBM_CPU_CACHE_GB",
    "DYN_KVBM_DISK_CACHE_GB",
    "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS",
    "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS",
)


def _engine_argv(resolved: Resolved, role: str, host: HostFacts) -> tuple[str, ...]:
    engine = role_argv(resolved, role, host.vllm_args)
    return default_dtype_argv(host.device, host.cpu_bf16_native, engine) + engine


def _notes(host: HostFacts, services: tuple[Service, ...]) -> tuple[str, ...]:
    notes = []
    if host.model.random_weights:
        notes.append(
            f"model {host.model.served_name} is a generated tiny model with random weights: "
            "it exercises the KV cache, its text is noise (without --model, CPU hosts serve "
            "smollm2-135m-instruct, a real one)"
        )
    for svc in services:
        info = svc.info
        if info.openai_url:
            auth = " with an API key (Authorization: Bearer)" if info.auth == "bearer" else ""
            notes.append(
                f"the OpenAI API will be at {info.openai_url} (model {info.model!r}){auth}"
            )
    return tuple(notes)
