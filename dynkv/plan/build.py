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
from dynkv.plan.checks import check_settings, disagg_transfer
from dynkv.plan.cpu import cpu_engine_env, split_cores
from dynkv.plan.dtype import argv_value, default_dtype_argv, dtype_note
from dynkv.plan.engine_args import engine_notes, role_argv
from dynkv.plan.enroll import ENROLL, enroll_service
from dynkv.plan.errors import PlanError
from dynkv.plan.fleet import assign_gpus, check_counts, per_worker_gpus, worker_slots
from dynkv.plan.frontend import API_KEY_ENV, checked_access, frontend_service
from dynkv.plan.host import HostFacts, find_prometheus
from dynkv.plan.model import Plan, Service, TcpProbe, topological_order
from dynkv.plan.ports import check_port_clashes, worker_port
from dynkv.plan.prometheus import plan_prometheus
from dynkv.plan.secure import (
    frontend_user_cert,
    plan_transport_security,
    secure_frontend,
    secure_worker,
)
from dynkv.plan.worker import (
    PASSTHROUGH_ENV,
    data_parallel,
    handoff_dir,
    kv_events_config,
    kv_events_dir,
    kv_events_endpoint,
    kv_transfer_config,
    metrics_url,
    vllm_argv,
    worker_service,
)
from dynkv.settings.resolve import Resolved
from dynkv.tls.layout import nats_token
from dynkv.tls.model import TransportSecurity

__all__ = ["HostFacts", "PlanError", "build_plan", "disagg_transfer", "find_prometheus"]


def build_plan(resolved: Resolved, host: HostFacts) -> Plan:
    dep = resolved.deployment
    ddir = dep.deployment_dir
    check_settings(resolved, host)

    services: list[Service] = []
    external = ()
    tls = plan_transport_security(resolved, host)
    token = nats_token(host.secret) if tls is not None and host.secret else None
    if tls is not None:  # `up --advertise`: etcd and NATS on that address, over TLS
        endpoints = (f"https://{tls.advertise}:{dep.etcd_port}",)
        nats_url = f"tls://{tls.advertise}:{dep.nats_port}"
    elif dep.infra == "external":
        endpoints = split_endpoints(dep.etcd_endpoints)
        nats_host_port(dep.nats_url)  # validates the URL
        nats_url = dep.nats_url
        external = external_probes(endpoints, nats_url)
    else:
        endpoints = (f"http://{LOOPBACK}:{dep.etcd_port}",)
        nats_url = f"nats://{LOOPBACK}:{dep.nats_port}"
    if tls is not None or dep.infra != "external":
        services += _own_infra(resolved, host, tls, token)
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
    check_counts(resolved)
    workers = _workers(resolved, host, endpoints, infra_names, transfer, nats_url)
    # with no worker of its own (--workers 0) the frontend waits for the infra instead
    after = tuple(w.name for w in workers) or infra_names
    frontend = _frontend(
        resolved,
        host,
        endpoints,
        after,
        transfer,
        nats_url,
        workers[0].argv if workers else (),
    )
    if tls is not None:
        workers = [secure_worker(w, tls, token) for w in workers]
        frontend = secure_frontend(frontend, tls, token, user_cert=frontend_user_cert(resolved))
        if not workers:  # its /health says "starting" until a joined node's worker registers
            port = frontend.ports["http"]
            frontend = frontend.replace(probes=(TcpProbe(host=tls.advertise, port=port),))
    services += workers
    services.append(frontend)
    if dep.observability:
        services.append(plan_prometheus(resolved, host, workers, frontend, tls))

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


def _own_infra(
    resolved: Resolved, host: HostFacts, tls: TransportSecurity | None, token: str | None
) -> list[Service]:
    """The etcd and NATS the deployment runs: containers with --infra docker, else local
    processes (serving --advertise over TLS)."""
    dep = resolved.deployment
    if tls is None and dep.infra == "docker":
        etcd = etcd_docker_service(
            deployment=dep.name,
            client_port=dep.etcd_port,
            peer_port=dep.etcd_peer_port,
            image=dep.etcd_image,
        )
        nats = nats_docker_service(
            deployment=dep.name,
            port=dep.nats_port,
            monitor_port=dep.nats_monitor_port,
            image=dep.nats_image,
        )
        return [etcd, nats]
    etcd = etcd_service(
        deployment=dep.name,
        deployment_dir=dep.deployment_dir,
        binary=host.etcd_binary,
        client_port=dep.etcd_port,
        peer_port=dep.etcd_peer_port,
        tls=tls,
    )
    nats = nats_service(
        deployment_dir=dep.deployment_dir,
        binary=host.nats_binary,
        port=dep.nats_port,
        monitor_port=dep.nats_monitor_port,
        tls=tls,
        token=token,
    )
    return [etcd, nats]


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
    # each prefill worker writes a pool of its own, named by its id; decode workers read those
    prefill_pools = ",".join(s.worker_id for s in slots if s.role == Role.PREFILL)
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
        engine = _engine_argv(resolved, role, host)
        # vLLM's own KV events (G1) for every worker, bridged into the worker's stream by its
        # KVBM connector, or by the wrapper without one (docs/kv-events.md)
        g1_endpoint = (
            None
            if data_parallel(engine)
            else kv_events_endpoint(dep.deployment_dir, slot.worker_id)
        )
        if dynkv or g1_endpoint:  # the worker publishes its changes for the router
            env.update(
                KvEventsSettings.env(
                    nats_url=nats_url,
                    deployment=dep.name,
                    worker_id=worker_id,
                    g1_endpoint=g1_endpoint,
                )
            )
        handoff_unset: tuple[str, ...] = ()
        if handoff is not None:
            env["DYN_KVBM_HANDOFF_DIR"] = str(handoff)
            if role == Role.PREFILL:
                env[HANDOFF_POOL], unset = slot.worker_id, HANDOFF_POOLS
            else:
                env[HANDOFF_POOLS], unset = prefill_pools, HANDOFF_POOL
            env.pop(unset, None)
            handoff_unset = (unset,)  # a reader owns no pool, a writer reads none
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
        env_unset += (*handoff_unset, API_KEY_ENV)  # API key: the frontend's secret
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
            kv_events=kv_events_config(g1_endpoint) if g1_endpoint else None,
            engine=engine,
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
                g1_events_block_size=dep.block_size if g1_endpoint and not dynkv else None,
                worker_id=worker_id,
                bind=bind,
                node=node,
                # engines sharing a host: each one's API server and EngineCore on its own cores
                cpus=cores[index] if host.device == "cpu" and len(slots) > 1 else None,
            )
        )
        if g1_endpoint:
            run_dir = str(kv_events_dir(dep.deployment_dir, slot.worker_id))
            workers[-1] = workers[-1].replace(data_dirs=(*workers[-1].data_dirs, run_dir))
        if handoff is not None and role == Role.PREFILL:
            workers[-1] = workers[-1].replace(data_dirs=(*workers[-1].data_dirs, str(handoff)))
    return workers


def _frontend(
    resolved: Resolved,
    host: HostFacts,
    endpoints: tuple[str, ...],
    workers: tuple[str, ...],
    transfer: str | None,
    nats_url: str,
    worker_argv: tuple[str, ...] = (),
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
        nats_url=nats_url,
        tokenizer=argv_value(worker_argv, "--tokenizer") or host.model.model,
        chat_template=argv_value(worker_argv, "--chat-template"),
        router_temperature=dep.router_temperature,
        router_tier_weights=dep.router_tier_weights,
    )


# a prefill worker names the pool it writes, a decode worker the pools it may read (docs/disagg.md)
HANDOFF_POOL = "DYN_KVBM_HANDOFF_POOL"
HANDOFF_POOLS = "DYN_KVBM_HANDOFF_POOLS"


def _pythonpath(host: HostFacts) -> dict[str, str]:
    return {"PYTHONPATH": host.environ["PYTHONPATH"]} if host.environ.get("PYTHONPATH") else {}


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
        if svc.info.worker_id and "--kv-events-config" not in svc.argv:
            notes.append(
                f"worker {svc.info.worker_id} publishes no G1 KV events: vLLM's data parallelism "
                "gives each rank its own event stream, which dynkv does not bridge"
            )
    for svc in services:
        info = svc.info
        if info.openai_url:
            auth = " with an API key (Authorization: Bearer)" if info.auth == "bearer" else ""
            notes.append(
                f"the OpenAI API will be at {info.openai_url} (model {info.model!r}){auth}"
            )
    return tuple(notes)
