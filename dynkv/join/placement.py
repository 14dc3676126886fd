"""Placement rules across hosts: where a deployment's workers may run so that no prompt's KV has
to cross a host boundary through a mechanism that cannot cross it (docs/multi-host.md#placement-rules).

Disaggregated serving hands the prompt's KV from a prefill worker to a decode worker. dynkv's
shared-memory handoff (`DYNKV_DISAGG_TRANSFER=handoff`, the default on CPU) is a pool in one
host's /dev/shm: a decode worker on another host cannot read it. The frontend pairs any healthy
prefill worker with any healthy decode worker (docs/disagg.md), so as soon as two hosts run disagg
workers, or one host runs only one half of a pair, some pairs would span hosts. That needs vLLM's
NixlConnector (`DYNKV_DISAGG_TRANSFER=nixl`, CUDA), which moves KV over the network.

Also: the frontend serves one topology, so every host runs the deployment's topology, and every
host moves KV the same way.

Pure: `check_placement` takes what each host runs and raises `PlanError` (exit 2) with the cause
and the fix; `dynkv join` calls it with the first host's workers (from its registrations) and the
joining node's plan.
"""

from __future__ import annotations

from collections.abc import Mapping

from dynkv.kvbm.roles import Role
from dynkv.plan.errors import PlanError

HANDOFF_ONE_HOST = "the shared-memory handoff is one host only"


def check_placement(
    hosts: Mapping[str, Mapping[str, int]],
    *,
    topology: str,
    transfer: str | None,
    joining: str,
    joining_topology: str,
    joining_transfer: str | None,
) -> None:
    """`hosts`: node name → role → worker count, the joining node included (under `joining`).
    `topology`/`transfer`: the deployment's (the first host's plan, which its frontend serves);
    `joining_*`: what the joining node's plan would run."""
    if joining_topology != topology:
        raise PlanError(
            f"deployment runs {topology} workers and its frontend serves {topology} only, and "
            f"this node would run {joining_topology}",
            f"join with --topology {topology} (or without --topology)",
        )
    if topology != "disagg":
        return
    if joining_transfer != transfer:
        raise PlanError(
            f"deployment moves KV from prefill to decode with {transfer}, and this node would "
            f"use {joining_transfer}",
            f"export DYNKV_DISAGG_TRANSFER={transfer} on this node (every host moves KV alike)",
        )
    if transfer == "nixl":
        return  # NIXL moves KV between hosts: any placement
    disagg_hosts = sorted(
        node
        for node, roles in hosts.items()
        if roles.get(Role.PREFILL, 0) or roles.get(Role.DECODE, 0)
    )
    for node in disagg_hosts:
        roles = hosts[node]
        if not (roles.get(Role.PREFILL, 0) and roles.get(Role.DECODE, 0)):
            half = "prefill" if roles.get(Role.PREFILL, 0) else "decode"
            raise PlanError(
                f"{node} would run {half} workers only, so its prompts' KV would be handed to "
                f"another host, and {HANDOFF_ONE_HOST}",
                "export DYNKV_DISAGG_TRANSFER=nixl on every host (CUDA, the nixl package), or "
                "run a complete prefill + decode set on this node",
            )
    if len(disagg_hosts) > 1:
        others = ", ".join(n for n in disagg_hosts if n != joining) or "another host"
        raise PlanError(
            f"{others} already run(s) disagg workers, and the frontend pairs any prefill with "
            f"any decode worker, so KV would be handed between hosts; {HANDOFF_ONE_HOST}",
            "export DYNKV_DISAGG_TRANSFER=nixl on every host (CUDA, the nixl package), or keep "
            "disagg workers on one host (start the first host with --workers 0)",
        )
