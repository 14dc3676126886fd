"""`python -m dynkv.worker` settings: one typed model, every default defined once.

`WorkerConfig` holds the values (with their defaults and bounds); `parse_args` reads them from the
environment (`DYNKV_WORKER_<FIELD>`, through pydantic-settings) and from the command line
(`--<field>`, generated from the same fields; the plan writes it, `dynkv.plan.worker`), the command
line winning. Everything after `--` is the vLLM command line the wrapper runs. The deployment
secret is not a field: it comes only from `DYNKV_DEPLOYMENT_SECRET` (docs/security.md), never argv.

`DYNKV_WORKER_PORT` (a port setting of `dynkv up`, not of the wrapper) shares the prefix and is
ignored here: no field is called `port`.
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as EnvError

from dynkv.kvbm.roles import Role
from dynkv.plan.cpu import parse_cpu_list
from dynkv.settings.env_source import read_env

ENV_PREFIX = "DYNKV_WORKER_"
PROG = "python -m dynkv.worker"
USAGE = f"usage: {PROG} [options] -- <vllm command line>"


class WorkerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role = Field(description="the role this worker plays")
    deployment: str = Field(min_length=1, description="etcd namespace /dynkv/<deployment>/")
    worker_id: str = Field(min_length=1, description="the registration key's last segment")
    url: str = Field(min_length=1, description="base URL of the vLLM server")
    served_model_name: str = Field(min_length=1, description="the model name vLLM serves")
    metrics_url: str | None = Field(None, description="KVBM metrics (absent without KVBM)")
    etcd_endpoints: tuple[str, ...] = Field(
        min_length=1, description="etcd client URL(s), comma-separated"
    )
    lease_ttl: int = Field(10, ge=1, description="seconds the registration outlives the wrapper")
    health_interval: float = Field(2.0, gt=0, description="seconds between /health probes")
    # generous: a busy CPU engine can answer /health late, and withdrawing it would be worse
    probe_timeout: float = Field(5.0, gt=0, description="a slower /health counts as failed")
    unhealthy_after: int = Field(3, ge=1, description="consecutive failed probes to withdraw")
    # a worker without KVBM: the wrapper bridges vLLM's own KV events (docs/kv-events.md)
    g1_events_block_size: int | None = Field(
        None, ge=1, description="bridge vLLM's KV events into G1 events, with this block size"
    )
    node: str | None = Field(None, description="the joined node it runs on (dynkv join)")
    # one of several CPU engines on a host: vLLM's API server and EngineCore run on the engine's
    # own cores too, not on a neighbour's (docs/fleet.md#cpu-engines)
    cpus: tuple[int, ...] | None = Field(
        None, description="run vLLM, every process of it, on these CPUs (0-2,5); none: anywhere"
    )

    @field_validator("etcd_endpoints", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpu_list(cls, value: Any) -> Any:
        return parse_cpu_list(value) if isinstance(value, str) else value


class WorkerSettings(BaseSettings, WorkerConfig):
    """The same fields read from the environment: `DYNKV_WORKER_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)
    etcd_endpoints: Annotated[tuple[str, ...], NoDecode] = Field(min_length=1)  # comma-separated
    cpus: Annotated[tuple[int, ...] | None, NoDecode] = None  # 0-2,5


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    """`--<field>` for every field; unset flags fall back to the environment, then to the
    field's default."""
    p = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [options] -- <vllm command line>",
        description="Runs vLLM as a child and registers it in etcd while it is healthy. Every "
        f"option can also be set as {ENV_PREFIX}<OPTION>; the deployment secret comes from "
        "DYNKV_DEPLOYMENT_SECRET only.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    for name, info in WorkerConfig.model_fields.items():
        default = "required" if info.is_required() else f"default: {info.default}"
        kwargs: dict[str, Any] = {"dest": name, "help": f"{info.description} ({default})"}
        if isinstance(info.annotation, type) and issubclass(info.annotation, enum.Enum):
            kwargs["choices"] = [member.value for member in info.annotation]
        p.add_argument(_flag(name), **kwargs)
    return p


def parse_args(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> tuple[WorkerConfig, list[str]]:
    """(settings, vLLM argv) from `argv` and `environ` (default: os.environ). No `--` exits 1
    with the usage line; a bad or missing option exits 2 with the cause (argparse's convention)."""
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit(USAGE)
    split = argv.index("--")
    ours, child = argv[:split], argv[split + 1 :]
    if not child:
        raise SystemExit(f"{PROG}: no command after --")
    p = parser()
    given = vars(p.parse_args(ours))
    env = os.environ if environ is None else environ
    try:
        merged = {**read_env(WorkerSettings, env), **given}
    except EnvError as exc:
        p.error(str(exc))
    missing = [
        _flag(n)
        for n, f in WorkerConfig.model_fields.items()
        if f.is_required() and n not in merged
    ]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        return WorkerConfig.model_validate(merged), child
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "?"
        where = _flag(field) if field in given else f"{ENV_PREFIX}{field.upper()}"
        p.error(f"{where}: {err['msg']}")
