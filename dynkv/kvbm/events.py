"""KV events: what a worker tells the router about the blocks it holds (docs/kv-events.md).

Defined once here, inside the runtime library (vLLM loads it in the worker's processes), and
imported by the router. Keys are this runtime's chained block keys (`dynkv.kvbm.keys`: cache salt,
LoRA and model fingerprint included), written as 32 hex digits so that any JSON reader keeps all
128 bits.

Each worker publishes on one subject, `dynkv.<deployment>.kv.<worker_id>`, so that NATS keeps its
messages in order: `EventBatch`es (numbered 1, 2, 3, ... per `instance_id`; a new instance id means
the worker restarted and every earlier event is void) and, periodically, `WorkerRates` (what a hit
costs there; it also carries the last batch number, so an idle worker's lost batch is noticed).
`dynkv.<deployment>.kv.<worker_id>.snapshot` answers a request with the worker's whole key set,
in `SnapshotChunk`s sent to the request's reply subject.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, TypeAdapter

SUBJECT_ROOT = "dynkv"
_TOKEN = re.compile(r"^[A-Za-z0-9_~-]+$")


def _key_from_wire(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 128:
        return value
    if isinstance(value, str) and len(value) == 32:
        return int(value, 16)
    raise ValueError("a block key is 32 hex digits")


WireKey = Annotated[
    int, PlainValidator(_key_from_wire), PlainSerializer(lambda k: f"{k:032x}", return_type=str)
]


class KvTier(StrEnum):
    """Where a worker holds a block: G1 (device), G2 (host memory), G3 (disk). Lower is faster."""

    DEVICE = "g1"
    HOST = "g2"
    DISK = "g3"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {KvTier.DEVICE: 0, KvTier.HOST: 1, KvTier.DISK: 2}
TIERS: tuple[KvTier, ...] = (KvTier.DEVICE, KvTier.HOST, KvTier.DISK)


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Stored(_Wire):
    """`keys` are now held in `tier`. When `parent` is set, `keys` form one chain: the parent of
    keys[0] is `parent` and that of keys[i] is keys[i-1]; None: no chain is claimed (the keys
    are chained hashes, so the index does not need it)."""

    type: Literal["stored"] = "stored"
    tier: KvTier
    keys: list[WireKey]
    parent: WireKey | None = None


class Removed(_Wire):
    """`keys` are no longer held in `tier` (evicted, failed verification, or invalidated)."""

    type: Literal["removed"] = "removed"
    tier: KvTier
    keys: list[WireKey]


class Cleared(_Wire):
    """Every block is gone from `tier`, or from every tier when `tier` is None."""

    type: Literal["cleared"] = "cleared"
    tier: KvTier | None = None


KvEvent = Annotated[Stored | Removed | Cleared, Field(discriminator="type")]


class EventBatch(_Wire):
    """Events of one worker instance, in the order they happened. `seq` counts batches from 1
    per instance: a missing number means batches were lost (the router then resynchronises)."""

    type: Literal["events"] = "events"
    worker_id: str
    instance_id: str
    seq: int = Field(ge=1)
    ts: float  # wall-clock seconds when the batch was cut
    block_size: int = Field(ge=1)
    events: list[KvEvent]


class PrefillRate(_Wire):
    """Measured prefill speed for prompts of `min_tokens` ≤ length < `max_tokens`."""

    min_tokens: int = Field(ge=0)
    max_tokens: int = Field(ge=1)
    tokens_per_s: float = Field(gt=0)
    samples: int = Field(ge=0)


class WorkerRates(_Wire):
    """What a cache hit costs on this worker, measured there. A rate is None until measured.

    `seq` is the last batch number this instance has sent (or dropped); a router that has applied
    fewer has lost batches and resynchronises."""

    type: Literal["rates"] = "rates"
    worker_id: str
    instance_id: str
    seq: int = Field(ge=0)
    ts: float
    block_size: int = Field(ge=1)
    # the model fingerprint (hex) rooting the worker's keys: a router hashes prompts with it
    fingerprint: str = ""
    prefill: list[PrefillRate] = Field(default_factory=list)
    g2_to_g1_tokens_per_s: float | None = Field(None, gt=0)
    g3_to_g1_tokens_per_s: float | None = Field(None, gt=0)
    # seconds each running request adds to an engine step: what decode load costs a new prompt
    decode_seconds_per_request: float | None = Field(None, gt=0)
    held_blocks: dict[KvTier, int] = Field(default_factory=dict)
    dropped_batches: int = 0  # since this instance started (NATS down, queue full)


KvMessage = Annotated[EventBatch | WorkerRates, Field(discriminator="type")]


class SnapshotChunk(_Wire):
    """Part `part` (from 0) of `parts` of a worker's key set as of batch `seq` (events of later
    batches apply on top of it). Sent to the snapshot request's reply subject."""

    type: Literal["snapshot"] = "snapshot"
    worker_id: str
    instance_id: str
    seq: int = Field(ge=0)
    block_size: int = Field(ge=1)
    part: int = Field(ge=0)
    parts: int = Field(ge=1)
    tier: KvTier | None = None  # None: an empty worker (the only chunk)
    keys: list[WireKey] = Field(default_factory=list)


_MESSAGE: TypeAdapter[EventBatch | WorkerRates] = TypeAdapter(KvMessage)


def parse_message(data: bytes) -> EventBatch | WorkerRates:
    """One message of a worker's subject (pydantic.ValidationError when it is not one)."""
    return _MESSAGE.validate_json(data)


def check_token(value: str, what: str) -> str:
    """A subject token: letters, digits, `_`, `-` and `~` (NATS separates tokens with dots and
    reads `*` and `>` as wildcards). A deployment name's dots are written `~` (`subject_token`)."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} is not a NATS subject token ([A-Za-z0-9_~-]+)")
    return value


def subject_token(deployment: str) -> str:
    """A deployment name as one subject token: its dots become `~` (never in a name)."""
    return check_token(deployment.replace(".", "~"), "deployment")


def events_subject(deployment: str, worker_id: str) -> str:
    dep, worker = subject_token(deployment), check_token(worker_id, "worker id")
    return f"{SUBJECT_ROOT}.{dep}.kv.{worker}"


def snapshot_subject(deployment: str, worker_id: str) -> str:
    return events_subject(deployment, worker_id) + ".snapshot"


def events_wildcard(deployment: str) -> str:
    """Every worker's events subject (not their snapshot subjects: `*` is one token)."""
    return f"{SUBJECT_ROOT}.{subject_token(deployment)}.kv.*"


def worker_of(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def reconnecting(wait_s: float) -> dict[str, object]:
    """nats.connect's arguments for a client that outlives NATS restarts: nats-py retries for
    ever, `wait_s` apart and each attempt bounded by 2 s, the first connection included (so
    `connect` returns only once NATS answers: its owner runs it where it can stop it, a thread
    it leaves behind or a task it cancels, dynkv/router/tasks.py). The publisher and the
    router's subscriber both connect this way."""
    return {
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": wait_s,
        "connect_timeout": 2,
    }
