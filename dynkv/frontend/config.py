"""`python -m dynkv.frontend` options.

Everything comes from the command line (the plan writes it), except the API key, which comes only
from the environment (`DYNKV_API_KEY`): a command line is visible to every user of the machine
(`ps`, /proc/<pid>/cmdline) and ends up in the state file, an environment is not.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dynkv.frontend.policy import POLICIES

API_KEY_ENV = "DYNKV_API_KEY"
ROUTER_ENV = "DYNKV_ROUTER"


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    deployment: str = "default"
    etcd_endpoints: tuple[str, ...] = ()  # empty: no discovery (tests fill the pool themselves)
    router: str = "round_robin"
    models: tuple[str, ...] = ()  # served model names known before any worker registers
    request_timeout: float = 600.0
    connect_timeout: float = 3.0
    health_interval: float = 1.0
    max_connections: int = 256
    log_level: str = "info"
    disagg_fallback: bool = False  # disagg: decode serves alone while no prefill worker can
    disagg_transfer: str = "handoff"  # disagg: "handoff" (dynkv's pool) or "nixl"
    api_key: str | None = field(default=None, repr=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dynkv.frontend",
        description="OpenAI-compatible frontend of a dynkv deployment: discovers the workers "
        "in etcd and routes /v1/chat/completions and /v1/completions to them. The API key, if "
        f"any, is read from ${API_KEY_ENV} only.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--deployment", default="default", help="etcd namespace /dynkv/<deployment>/")
    p.add_argument("--etcd-endpoints", required=True, help="etcd client URL(s), comma-separated")
    p.add_argument(
        "--router",
        choices=sorted(POLICIES),
        default=None,
        help=f"worker choice (default: ${ROUTER_ENV}, else round_robin)",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        help="a served model name to answer 503 (not 404) for while it has no worker; repeatable",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds of worker silence")
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument(
        "--health-interval", type=float, default=1.0, help="re-probe of unhealthy workers"
    )
    p.add_argument("--max-connections", type=int, default=256, help="to all workers together")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.add_argument(
        "--disagg-fallback",
        action="store_true",
        help="disagg: when no prefill worker can take a request, the decode worker serves it alone",
    )
    p.add_argument(
        "--disagg-transfer",
        choices=["handoff", "nixl"],
        default="handoff",
        help="disagg: the KV transfer protocol the prefill request asks for (the plan's choice)",
    )
    return p


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> FrontendConfig:
    env = os.environ if environ is None else environ
    args = parser().parse_args(list(argv))
    router = args.router or env.get(ROUTER_ENV) or "round_robin"
    if router not in POLICIES:
        parser().error(f"{ROUTER_ENV}={router!r}: choose from {', '.join(sorted(POLICIES))}")
    endpoints = tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip())
    if not endpoints:
        parser().error("--etcd-endpoints: no URL given")
    for name in ("request_timeout", "connect_timeout", "health_interval"):
        if getattr(args, name) <= 0:
            parser().error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_connections < 1:
        parser().error("--max-connections must be ≥ 1")
    return FrontendConfig(
        host=args.host,
        port=args.port,
        deployment=args.deployment,
        etcd_endpoints=endpoints,
        router=router,
        models=tuple(args.models),
        request_timeout=args.request_timeout,
        connect_timeout=args.connect_timeout,
        health_interval=args.health_interval,
        max_connections=args.max_connections,
        log_level=args.log_level,
        disagg_fallback=args.disagg_fallback,
        disagg_transfer=args.disagg_transfer,
        api_key=env.get(API_KEY_ENV) or None,
    )
