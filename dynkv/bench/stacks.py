"""Real stacks for `dynkv bench compare`: `dynkv up -d` under a private deployment name,
ports and state dir, and `dynkv down` afterwards.

Why a child `dynkv up -d --json` rather than the supervisor in this process: it is exactly what a
user runs (preflight included), its Ctrl-C handling and teardown are its own, and its JSON state
says where the frontend and every worker's KVBM metrics are.

Isolation, so that one configuration cannot help or hurt the next:
- the stacks do not inherit the caller's `DYNKV_*`/`DYN_KVBM_*` variables (an exported
  `DYN_KVBM_DISK_CACHE_GB` would otherwise give every profile a disk tier): what they get is the
  configuration, the pass-through options, and `--stack-env KEY=VALUE`;
- every port is a fresh free one, and the state dir and the G3 pools live under the comparison's
  own directory; the pools are deleted after each stack (a journaled pool would give the next run
  of the same name disk hits it did not earn);
- tier sizes resize only the tiers a profile has (`--disk-cache-gb` gives `gpu-cpu` no disk tier).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynkv.bench.compare import (
    DEFAULT_ADVERTISE,
    CompareError,
    RunningStack,
    StackConfig,
    StackFailed,
)
from dynkv.bench.trust import Trust
from dynkv.kvbm.roles import ROLE_NAMES
from dynkv.private_deployment import (
    WORKERS_PER_STACK,
    NoFreePorts,
    fresh_ports,
    without_settings,
)
from dynkv.settings import SettingsError, load_profile, resolve
from dynkv.tls.model import ClientTLS

_TAIL_LINES = 25


@dataclass(frozen=True)
class StackOptions:
    """What every stack of a comparison shares (the same model and G1 size, or it is no
    comparison)."""

    model: str | None = None
    device_kv_gb: float | None = None
    cpu_cache_gb: float | None = None
    disk_cache_gb: float | None = None
    max_model_len: int | None = None
    workers: int | None = None  # agg workers (`DYNKV_WORKERS`); None: dynkv's default
    advertise: str | None = None  # the `tls` transport's address (`DYNKV_ADVERTISE`); None: default
    startup_timeout_s: float = 900.0
    env: Mapping[str, str] = field(default_factory=dict)  # --stack-env, wins over the rest


def parse_env_pairs(pairs: list[str] | None) -> dict[str, str]:
    """`["K=V", …]` → {K: V}; CompareError for a pair without `=` or a bad name."""
    out = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise CompareError(
                f"--stack-env {pair!r} is not NAME=VALUE",
                "pass --stack-env DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER=true (one per variable)",
            )
        out[key] = value
    return out


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "stack"


class UpLauncher:
    """Starts stacks with `python -m dynkv.cli.main up -d --json` under `root` (0700)."""

    def __init__(
        self,
        options: StackOptions,
        root: Path,
        *,
        python: str = sys.executable,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.options = options
        self.root = root
        self.python = python
        self.base_env = without_settings(os.environ if environ is None else environ)
        self.warnings: list[str] = []  # teardown problems, for the caller to show
        self._count = 0

    # ---- settings --------------------------------------------------------------------------

    def settings_env(self, config: StackConfig) -> dict[str, str]:
        """The DYNKV_*/DYN_KVBM_* variables of one configuration (ports and names excluded)."""
        o = self.options
        env: dict[str, str] = {"DYNKV_KVBM": "true" if config.kvbm else "false"}
        if config.profile:
            env["DYNKV_PROFILE"] = config.profile
        if config.topology:
            env["DYNKV_TOPOLOGY"] = config.topology
        if config.transport == "tls":  # `up --advertise`: TLS on every hop (docs/multi-host.md)
            env["DYNKV_ADVERTISE"] = o.advertise or DEFAULT_ADVERTISE
        for name, value in (
            ("DYNKV_MODEL", o.model),
            ("DYNKV_DEVICE_KV_GB", o.device_kv_gb),
            ("DYNKV_MAX_MODEL_LEN", o.max_model_len),
            ("DYNKV_WORKERS", o.workers),
        ):
            if value is not None:
                env[name] = str(value)
        env["DYNKV_STARTUP_TIMEOUT_SECS"] = str(o.startup_timeout_s)
        if config.kvbm:
            tiers = load_profile(config.profile).kvbm if config.profile else {}
            if o.cpu_cache_gb is not None and "cpu_cache_gb" in tiers:
                env["DYN_KVBM_CPU_CACHE_GB"] = str(o.cpu_cache_gb)
            if o.disk_cache_gb is not None and "disk_cache_gb" in tiers:
                env["DYN_KVBM_DISK_CACHE_GB"] = str(o.disk_cache_gb)
            env["DYN_KVBM_DISK_CACHE_DIR"] = str(self.root / "kvbm-disk")
        env.update(self.options.env)
        return env

    def check(self, config: StackConfig) -> None:
        """Resolve the configuration as `dynkv up` will, so a bad profile or value stops the
        comparison before the first stack starts, not after an hour."""
        try:
            if config.profile:
                load_profile(config.profile)
            resolved = resolve(env=self.settings_env(config))
        except SettingsError as exc:
            raise CompareError(f"{config.label}: {exc.cause}", exc.fix) from None
        if resolved.deployment.topology == "disagg" and len(os.sched_getaffinity(0)) < 2:
            raise CompareError(
                f"{config.label}: disagg on CPU needs at least 2 cores",
                "compare on a host with 2 or more cores, or leave disagg out",
            )

    # ---- up / down -------------------------------------------------------------------------

    def up(self, config: StackConfig) -> RunningStack:
        self._count += 1
        name = f"cmp{self._count}-{_slug(config.label)}"[:63]
        state_dir = self.root / "state"
        for d in (self.root, state_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = self.base_env | self.settings_env(config)
        env |= {"DYNKV_NAME": name, "DYNKV_STATE_DIR": str(state_dir)}
        try:
            env |= fresh_ports(max(self.options.workers or 0, WORKERS_PER_STACK))
        except NoFreePorts as exc:
            raise CompareError(str(exc), "free some ports, or compare agg only") from None
        argv = [self.python, "-m", "dynkv.cli.main", "up", "-d", "--json"]
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=self.options.startup_timeout_s * 3 + 120,
            )
        except subprocess.TimeoutExpired:
            self._stop(name, state_dir)
            raise StackFailed(config.label, "`dynkv up` did not return in time") from None
        except BaseException:  # Ctrl-C while it starts: `up` is killed, its services are not
            self._stop(name, state_dir)
            raise
        up_s = time.monotonic() - started
        if proc.returncode != 0:
            self._stop(name, state_dir)
            tail = "\n".join(proc.stderr.strip().splitlines()[-_TAIL_LINES:])
            raise StackFailed(
                config.label,
                f"`dynkv up` exited with {proc.returncode} (logs: {state_dir / name / 'logs'}):\n"
                + tail,
            )
        try:
            state = json.loads(proc.stdout)
        except ValueError:
            self._stop(name, state_dir)
            raise StackFailed(config.label, "`dynkv up --json` printed no JSON state") from None
        return self._running(state, name, state_dir, up_s, env)

    def _running(
        self, state: dict[str, Any], name: str, state_dir: Path, up_s: float, env: dict[str, str]
    ) -> RunningStack:
        frontend = next(s for s in state["services"] if s["role"] == "frontend")
        workers = [s for s in state["services"] if s["role"] in ROLE_NAMES]
        settings = {k: v for k, v in env.items() if k.startswith(("DYNKV_", "DYN_KVBM_"))}
        ca = frontend["meta"].get("ca_cert")  # an advertised stack's frontend: its own CA
        return RunningStack(
            url=frontend["meta"]["url"],
            model=frontend["meta"]["model"],
            metrics_urls=[
                w["meta"]["metrics_url"] for w in workers if w["meta"].get("metrics_url")
            ],
            info={
                "name": name,
                "state_dir": str(state_dir),
                "up_s": round(up_s, 1),
                "workers": [w["name"] for w in workers],
                "env": settings,
            },
            trust=Trust(ClientTLS(ca=ca), f"deployment {name}") if ca else None,
        )

    def down(self, stack: RunningStack) -> None:
        self._stop(stack.info["name"], Path(stack.info["state_dir"]))

    def _stop(self, name: str, state_dir: Path) -> None:
        from dynkv.supervisor import stop_deployment

        try:
            report = stop_deployment(state_dir / name, grace=10.0)
            self.warnings += [f"{name}: {w}" for w in report.warnings]
        except Exception as exc:  # teardown must not hide the measurement; say it instead
            self.warnings.append(f"{name}: stopping failed: {type(exc).__name__}: {exc}")
        # the stack's G3 pools: the next stack must not find its blocks
        for pool in (self.root / "kvbm-disk").glob(f"{name}-*"):
            shutil.rmtree(pool, ignore_errors=True)
