"""`python -m dynkv.frontend` settings: one typed model, every default defined once.

`FrontendConfig` holds the values (and their defaults and bounds); `parse_args` reads them from
the environment (`DYNKV_FRONTEND_<FIELD>`, through pydantic-settings) and from the command line
(`--<field>`, generated from the same fields; the plan writes it), the command line winning.
Secrets come only from the environment (`DYNKV_API_KEY`, `DYNKV_DEPLOYMENT_SECRET`) or a file
(`--api-key-file`): a command line is visible to every user of the machine (`ps`,
/proc/<pid>/cmdline) and ends up in the state file, an environment is not. docs/security.md lists
the settings that change what the frontend trusts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as EnvError

from dynkv.plan.frontend import exposure_problem, is_loopback
from dynkv.settings.deployment import RouterPolicy
from dynkv.settings.env_source import read_env
from dynkv.tls.model import CA_ENV, CERT_ENV, KEY_ENV, ClientTLS
from dynkv.worker.record import DEPLOYMENT_SECRET_ENV

API_KEY_ENV = "DYNKV_API_KEY"
ROUTER_ENV = "DYNKV_ROUTER"
ENV_PREFIX = "DYNKV_FRONTEND_"
MIB = 1024 * 1024
# Fields never taken from the command line (they would show in `ps`).
_ENV_ONLY = frozenset({"api_key", "deployment_secret"})


class FrontendConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="bind address (default: loopback)")
    port: int = Field(8000, ge=1, le=65535)
    deployment: str = Field("default", description="etcd namespace /dynkv/<deployment>/")
    etcd_endpoints: tuple[str, ...] = Field(
        (), description="etcd client URL(s), comma-separated; none: no discovery (tests)"
    )
    router: RouterPolicy = Field(
        RouterPolicy.ROUND_ROBIN,
        description=f"worker choice: {', '.join(RouterPolicy)} (also ${ROUTER_ENV})",
    )
    models: tuple[str, ...] = Field(
        (), description="a served model name answered 503 (not 404) while it has no worker"
    )
    nats_url: str | None = Field(
        None, description="the deployment's NATS: the kv router subscribes to KV events there"
    )
    tokenizer: str | None = Field(
        None, description="the workers' model (or tokenizer) directory: the kv router's tokenizer"
    )
    chat_template: str | None = Field(
        None, description="the workers' --chat-template, when they were given one"
    )
    router_temperature: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="kv router: > 0 samples among near-ties"
    )
    router_tier_weights: str | None = Field(
        None, description="kv router: G1,G2,G3 weights instead of measured rates, or 'dynamo'"
    )
    router_decode_seconds: float = Field(
        0.01,
        ge=0,
        allow_inf_nan=False,
        description="kv router: queueing cost of a request in flight, until the worker has "
        "measured its own",
    )
    router_replica_half_life: float = Field(
        60.0,
        ge=0,
        allow_inf_nan=False,
        description="kv router: half-life (seconds) of a prefix's heat, the requests a replica's "
        "recompute is shared with; 0: never share it",
    )
    request_timeout: float = Field(600.0, gt=0, description="seconds of worker silence")
    connect_timeout: float = Field(3.0, gt=0)
    health_interval: float = Field(1.0, gt=0, description="re-probe of unhealthy workers")
    probe_timeout: float = Field(
        5.0, gt=0, description="a worker's /health slower than this is unhealthy (hung)"
    )
    stall_probe_after: float = Field(
        10.0, gt=0, description="waiting this long for a worker's first byte probes its /health"
    )
    max_connections: int = Field(256, ge=1, description="to all workers together")
    max_concurrency: int = Field(
        256, ge=1, description="requests served at once; more get 503 with Retry-After"
    )
    max_body_bytes: int = Field(16 * MIB, ge=1, description="larger request bodies get 413")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="requests asking for more max_tokens get 400 (none: no limit)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    disagg_fallback: bool = Field(
        False, description="disagg: the decode worker serves alone when no prefill worker can"
    )
    disagg_transfer: Literal["handoff", "nixl"] = Field(
        "handoff", description="disagg: the KV transfer protocol the prefill request asks for"
    )
    tls_cert: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    tls_key: Path | None = Field(None, description="private key of --tls-cert (PEM)")
    insecure: bool = Field(
        False, description="allow a non-loopback bind without an API key (anyone may call)"
    )
    api_key_file: Path | None = Field(None, description="read the API key from this file")
    # an advertised deployment (docs/multi-host.md): etcd and the workers serve https from its CA
    tls_ca: Path | None = Field(None, description=f"CA of etcd and the workers (also ${CA_ENV})")
    tls_client_cert: Path | None = Field(
        None, description=f"client certificate for etcd (also ${CERT_ENV})"
    )
    tls_client_key: Path | None = Field(None, description=f"its key (also ${KEY_ENV})")
    api_key: str | None = Field(None, repr=False, exclude=True)
    deployment_secret: str | None = Field(None, repr=False, exclude=True)

    @field_validator("etcd_endpoints", "models", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("router_tier_weights")
    @classmethod
    def _tier_weights(cls, value: str | None) -> str | None:
        from dynkv.router.score import parse_tier_weights

        weights = parse_tier_weights(value)
        return None if weights is None else ",".join(f"{w:g}" for w in weights)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def client_tls(self) -> ClientTLS | None:
        """How the frontend verifies etcd and the workers; None: plain http (loopback)."""
        if self.tls_ca is None:
            return None
        cert, key = self.tls_client_cert, self.tls_client_key
        return ClientTLS(
            ca=str(self.tls_ca),
            cert=str(cert) if cert and key else None,
            key=str(key) if cert and key else None,
        )

    @property
    def worker_api_key(self) -> str | None:
        """The key the workers' vLLM requires (derived from the deployment secret)."""
        from dynkv.worker.record import worker_api_key

        return worker_api_key(self.deployment_secret) if self.deployment_secret else None


class FrontendSettings(BaseSettings, FrontendConfig):
    """The same fields read from the environment: `DYNKV_FRONTEND_<FIELD>`, and the historical
    names `DYNKV_API_KEY`, `DYNKV_ROUTER` and `DYNKV_DEPLOYMENT_SECRET`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True, populate_by_name=True
    )
    etcd_endpoints: Annotated[tuple[str, ...], NoDecode] = ()  # comma-separated
    models: Annotated[tuple[str, ...], NoDecode] = ()  # comma-separated
    router: RouterPolicy = Field(
        RouterPolicy.ROUND_ROBIN,
        validation_alias=AliasChoices(ENV_PREFIX + "ROUTER", ROUTER_ENV),
    )
    api_key: str | None = Field(
        None, repr=False, exclude=True, validation_alias=AliasChoices(API_KEY_ENV)
    )
    deployment_secret: str | None = Field(
        None, repr=False, exclude=True, validation_alias=AliasChoices(DEPLOYMENT_SECRET_ENV)
    )
    tls_ca: Path | None = Field(None, validation_alias=AliasChoices(ENV_PREFIX + "TLS_CA", CA_ENV))
    tls_client_cert: Path | None = Field(
        None, validation_alias=AliasChoices(ENV_PREFIX + "TLS_CLIENT_CERT", CERT_ENV)
    )
    tls_client_key: Path | None = Field(
        None, validation_alias=AliasChoices(ENV_PREFIX + "TLS_CLIENT_KEY", KEY_ENV)
    )


def _by_field_name(values: Mapping[str, Any]) -> dict[str, Any]:
    """The env source keys an aliased field by its alias: key it by the field's name."""
    names: dict[str, str] = {}
    for name, info in FrontendSettings.model_fields.items():
        alias = info.validation_alias
        for choice in getattr(alias, "choices", ()):
            names[str(choice)] = name
    return {names.get(k, k): v for k, v in values.items()}


def parser() -> argparse.ArgumentParser:
    """`--<field>` for every field but the secrets; unset flags fall back to the environment,
    then to the field's default."""
    p = argparse.ArgumentParser(
        prog="python -m dynkv.frontend",
        description="OpenAI-compatible frontend of a dynkv deployment: discovers the workers "
        "in etcd and routes /v1/chat/completions and /v1/completions to them. Secrets come from "
        f"${API_KEY_ENV} (or --api-key-file) and ${DEPLOYMENT_SECRET_ENV} only.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    for name, info in FrontendConfig.model_fields.items():
        if name in _ENV_ONLY:
            continue
        flag = "--" + ("model" if name == "models" else name).replace("_", "-")
        help_text = f"{info.description or ''} (default: {info.default})".strip()
        if info.annotation is bool:
            p.add_argument(flag, dest=name, action="store_true", help=help_text)
        elif name == "models":
            p.add_argument(flag, dest=name, action="append", help=help_text)
        else:
            p.add_argument(flag, dest=name, help=help_text)
    return p


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> FrontendConfig:
    """Settings from `environ` (default: os.environ) and `argv`; a usage error exits 2 with the
    cause (argparse's convention)."""
    env = os.environ if environ is None else environ
    p = parser()
    given = vars(p.parse_args(list(argv)))
    try:
        from_env = _by_field_name(read_env(FrontendSettings, env))
        merged = {**from_env, **given}
        if merged.get("api_key_file") and not merged.get("api_key"):
            merged["api_key"] = _read_key(Path(merged["api_key_file"]), p)
        config = FrontendConfig.model_validate(merged)
    except EnvError as exc:
        p.error(str(exc))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "?"
        p.error(f"--{field.replace('_', '-')}: {err['msg']}")
    if not config.etcd_endpoints:
        p.error("--etcd-endpoints: no URL given")
    problem = bind_problem(config)
    if problem:
        p.error(problem)
    return config


def _read_key(path: Path, p: argparse.ArgumentParser) -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        p.error(f"--api-key-file {path}: {exc.strerror}")
    if not key:
        p.error(f"--api-key-file {path}: the file is empty")
    return key


def bind_problem(config: FrontendConfig) -> str | None:
    """Why this configuration must not start (cause; fix), or None. A non-loopback address
    without an API key serves anyone on the network (docs/security.md)."""
    if bool(config.tls_cert) != bool(config.tls_key):
        return "--tls-cert and --tls-key go together; give both (or neither)"
    problem = exposure_problem(
        host=config.host, api_key=bool(config.api_key), insecure=config.insecure
    )
    return None if problem is None else "; ".join(problem)


def plaintext_key_warning(config: FrontendConfig) -> str | None:
    if config.api_key and not config.loopback and not config.tls_cert:
        return (
            f"the API key travels in plaintext on {config.host}:{config.port}; "
            "pass --tls-cert/--tls-key (or put a TLS proxy in front)"
        )
    return None
