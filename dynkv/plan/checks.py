"""What a deployment's settings must agree on before any service is placed, and how a disagg
deployment moves KV: decided alike for `up`'s plan (dynkv.plan.build) and a joined node's
(dynkv.plan.join)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynkv.plan.engine_args import check_engine_args
from dynkv.plan.errors import PlanError

if TYPE_CHECKING:
    from dynkv.plan.host import HostFacts
    from dynkv.settings.resolve import Resolved


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
