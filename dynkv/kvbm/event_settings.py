"""Where and how a worker publishes KV events (`DYNKV_KV_EVENTS_*`), and the rates it reports.

Separate from the publisher so that the plan (which sets these variables for every worker) and
the router read the settings without the publishing machinery (docs/kv-events.md).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from dynkv.kvbm.env_settings import EnvSettings
from dynkv.kvbm.events import PrefillRate, check_token, subject_token

ENV_PREFIX = "DYNKV_KV_EVENTS_"
# The names every client of an advertised deployment reads (dynkv.tls.model, which this package
# may not import: it runs inside vLLM); tests/unit/test_tls_plan.py keeps the two in step.
TLS_CA_ENV = "DYNKV_CLIENT_CA"
NATS_TOKEN_ENV = "DYNKV_NATS_TOKEN"


class KvEventsSettings(EnvSettings):
    """Where and how a worker publishes KV events; field `x` is `DYNKV_KV_EVENTS_X`. `dynkv up`
    sets the first three for every worker, and `g1_endpoint` where vLLM publishes its KV events;
    without `nats_url` nothing is published."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, env_ignore_empty=True, extra="ignore"
    )

    nats_url: str | None = Field(None, description="NATS server, e.g. nats://127.0.0.1:4222.")
    deployment: str = Field("default", description="Deployment name (a subject token).")
    worker_id: str = Field("worker", description="This worker's id (a subject token).")
    batch_max: int = Field(256, ge=1, description="Events per batch at most.")
    flush_ms: float = Field(20.0, gt=0, description="A pending event waits this long at most.")
    queue_max: int = Field(1024, ge=1, description="Batches waiting to be sent; more are dropped.")
    rates_interval_secs: float = Field(2.0, gt=0, description="Period of the rates message.")
    reconnect_secs: float = Field(0.5, gt=0, description="Wait between NATS connection attempts.")
    g1_endpoint: str | None = Field(
        None,
        description="vLLM's own KV events (the ZMQ endpoint of its --kv-events-config), bridged "
        "into G1 events; unset: no G1 events.",
    )
    g1_max_blocks: int = Field(
        1_000_000, ge=1, description="vLLM blocks the G1 bridge remembers; older ones are removed."
    )
    # an advertised deployment (docs/multi-host.md): NATS over TLS from its CA, with a token
    tls_ca: str | None = Field(
        None,
        validation_alias=AliasChoices(ENV_PREFIX + "TLS_CA", TLS_CA_ENV),
        description="CA that signed the NATS server's certificate (tls:// URLs).",
    )
    nats_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices(ENV_PREFIX + "NATS_TOKEN", NATS_TOKEN_ENV),
        description="NATS auth token (never printed).",
    )

    def nats_options(self) -> dict[str, object]:
        """nats.connect's TLS and token arguments: none for a loopback deployment."""
        options: dict[str, object] = {}
        if self.tls_ca:
            options["tls"] = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.nats_token is not None:
            options["token"] = self.nats_token.get_secret_value()
        return options

    def check(self) -> KvEventsSettings:
        subject_token(self.deployment)
        check_token(self.worker_id, "worker id")
        return self

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Environment variable → field name, for every field read under this prefix."""
        return {ENV_PREFIX + f.upper(): f for f in cls.model_fields if f not in _SHARED}

    @classmethod
    def env(
        cls, *, nats_url: str, deployment: str, worker_id: str, g1_endpoint: str | None = None
    ) -> dict[str, str]:
        """The environment that makes a worker publish (what the plan gives each worker)."""
        env = {
            ENV_PREFIX + "NATS_URL": nats_url,
            ENV_PREFIX + "DEPLOYMENT": deployment,
            ENV_PREFIX + "WORKER_ID": worker_id,
        }
        if g1_endpoint:
            env[ENV_PREFIX + "G1_ENDPOINT"] = g1_endpoint
        return env


_SHARED = frozenset({"tls_ca", "nats_token"})  # read under the deployment-wide names above


@dataclass
class RatesReading:
    """What `rates_source` returns: the measured costs of a hit and of the decode load (None:
    not measured yet)."""

    prefill: list[PrefillRate] = field(default_factory=list)
    g2_to_g1_tokens_per_s: float | None = None
    g3_to_g1_tokens_per_s: float | None = None
    decode_seconds_per_request: float | None = None


RatesSource = Callable[[], RatesReading]
