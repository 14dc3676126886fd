"""A joined node's plan: workers only, in the first host's deployment (`dynkv join`).

The same workers `dynkv up` would start on this host (its own profile, G2/G3 tiers, counts and
engine arguments), and nothing else: no etcd, NATS, frontend or Prometheus of its own. What
changes (docs/multi-host.md#joining-hosts-join-token-join):
- etcd and NATS are the first host's (the token's endpoints), reached over TLS with this node's
  certificate (`dynkv.join.enroll`) and the NATS token;
- worker ids are `<node>-<role>-<i>` (`hostb-agg-0`): registrations cannot collide with the
  first host's, and each record carries its node (`status` groups by it);
- vLLM listens on the node's advertised address over https (the first host's frontend calls
  it there), with the node's certificate;
- G3 and handoff pools are named `<name>-<node>-…`, so one box can simulate two hosts.

Pure like `build_plan`: the token and the node's certificate files arrive as arguments.
"""

from __future__ import annotations

from pathlib import Path

from dynkv.plan.build import HostFacts, _workers
from dynkv.plan.checks import check_settings, disagg_transfer
from dynkv.plan.errors import PlanError
from dynkv.plan.fleet import check_counts
from dynkv.plan.model import JoinedNode, Plan, topological_order
from dynkv.plan.ports import check_port_clashes
from dynkv.plan.secure import secure_worker
from dynkv.settings.resolve import Resolved
from dynkv.tls.layout import CLI
from dynkv.tls.model import CertFiles, ServiceTLS, TransportSecurity

NODE_CERT = "node"  # <deployment dir>/tls/node.crt and node.key: server and client use
CA_CERT = "ca.crt"


def node_tls_dir(deployment_dir: Path) -> Path:
    return Path(deployment_dir) / "tls"


def node_security(
    deployment_dir: Path, advertise: str, workers: tuple[str, ...]
) -> TransportSecurity:
    """The node's certificate serves every worker's https and is every client's certificate."""
    directory = node_tls_dir(deployment_dir)
    files = CertFiles(
        cert=str(directory / f"{NODE_CERT}.crt"), key=str(directory / f"{NODE_CERT}.key")
    )
    services = {w: ServiceTLS(server=files, client=files, ips=(advertise,)) for w in workers}
    services[CLI] = ServiceTLS(client=files)
    return TransportSecurity(
        advertise=advertise,
        dir=str(directory),
        ca_cert=str(directory / CA_CERT),
        ca_key="",  # a joined node has no CA key: its certificate was issued by the first host
        services=services,
    )


def build_join_plan(
    resolved: Resolved,
    host: HostFacts,
    *,
    node: str,
    advertise: str,
    etcd_endpoints: tuple[str, ...],
    nats_url: str,
    nats_token: str,
    frontend_url: str,
) -> Plan:
    """`host.secret` must be the deployment's registration secret (from the token)."""
    dep = resolved.deployment
    check_settings(resolved, host)
    transfer = disagg_transfer(resolved, host)
    check_counts(resolved)
    workers = _workers(
        resolved, host, etcd_endpoints, (), transfer, nats_url, node=node, bind=advertise
    )
    if not workers:
        raise PlanError(
            "a joined node with no worker adds nothing to the deployment",
            "join with --workers 1 or more (or --prefill-workers/--decode-workers)",
        )
    security = node_security(dep.deployment_dir, advertise, tuple(w.name for w in workers))
    workers = [secure_worker(w, security, nats_token) for w in workers]
    ordered = topological_order(tuple(workers))
    check_port_clashes(ordered)
    return Plan(
        name=dep.name,
        deployment_dir=str(dep.deployment_dir),
        device=host.device,
        topology=str(dep.topology),
        infra="joined",
        etcd_endpoints=etcd_endpoints,
        nats_url=nats_url,
        services=ordered,
        notes=(f"node {node} joins deployment {dep.name!r}; its frontend is {frontend_url}",),
        startup_timeout_secs=dep.startup_timeout_secs,
        joined=JoinedNode(
            node=node, advertise=advertise, frontend_url=frontend_url, security=security
        ),
    )
