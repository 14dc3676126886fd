"""vLLM's own KV events (its device prefix cache, G1) in this runtime's block keys.

vLLM started with `--kv-events-config` publishes, per engine step, what its prefix cache gained
and lost, under vLLM's own block hashes (process-local with its non-cryptographic hashes, and
never the keys a router can compute): `BlockStored` (the new blocks' hashes, their parent's hash,
their token ids, the block size, LoRA name, medium, and per block the "extra keys" that entered
vLLM's hash: LoRA name, multimodal pairs, cache salt, prompt-embedding digests), `BlockRemoved`
(hashes) and `AllBlocksCleared`. `G1Translator` keys each stored block with `BlockHasher` (the
fingerprint and extra-key convention of the worker's KVBM runtime, so a prefix has one key in G1,
G2 and G3) continuing from its parent's key, and remembers vLLM hash → key for later parents and
removals.

A block is bridged only when its key is certain; otherwise it is left out (the router then
simply does not know it: a miss, never a wrong answer, docs/kv-events.md):
- LoRA blocks (the runtime's key holds the adapter's path, which the events do not carry),
  multimodal and prompt-embedding blocks (the runtime does not key them either);
- a block whose parent is unknown (stored before the bridge listened, or forgotten);
- blocks of another size (partial-block entries), of another cache group than the first (hybrid
  models), or in another medium (vLLM's own CPU offloading).
The map is bounded: past `max_blocks` the oldest entries are forgotten and reported removed, so
the router never keeps a block the bridge could no longer remove.
A vLLM hash stored twice (two device blocks with the same content) and removed once is reported
removed: the router may forget a block still held, never keep one that is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import xxhash

from dynkv.kvbm.keys import BlockHasher, extra_keys

# vLLM's block hash: bytes, or an int with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES
VllmHash = bytes | int
DEVICE_MEDIUM = "GPU"  # vLLM's name for its device pool, CPU backend included


@dataclass(frozen=True)
class VllmStored:
    hashes: list[VllmHash]
    parent: VllmHash | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    extra: list[Any] | None = None  # per block: None or a list of that block's extra keys
    group: int | None = None


@dataclass(frozen=True)
class VllmRemoved:
    hashes: list[VllmHash]
    medium: str | None = None
    group: int | None = None


@dataclass(frozen=True)
class VllmCleared:
    pass


VllmEvent = VllmStored | VllmRemoved | VllmCleared


class BadPayload(ValueError):
    """A message that is not one of vLLM's KV event batches."""


def _hash(value: Any) -> VllmHash:
    if isinstance(value, bytes | int) and not isinstance(value, bool):
        return value
    raise BadPayload(f"a block hash is bytes or an int, not {type(value).__name__}")


def _event(raw: Any) -> VllmEvent | None:
    if not isinstance(raw, dict):
        raise BadPayload("an event is a map")
    kind = raw.get("type")
    if kind == "BlockStored":
        parent = raw.get("parent_block_hash")
        return VllmStored(
            hashes=[_hash(h) for h in raw["block_hashes"]],
            parent=None if parent is None else _hash(parent),
            token_ids=list(raw["token_ids"]),
            block_size=int(raw["block_size"]),
            lora_name=raw.get("lora_name"),
            medium=raw.get("medium"),
            extra=raw.get("extra_keys"),
            group=raw.get("group_idx"),
        )
    if kind == "BlockRemoved":
        return VllmRemoved(
            hashes=[_hash(h) for h in raw["block_hashes"]],
            medium=raw.get("medium"),
            group=raw.get("group_idx"),
        )
    if kind == "AllBlocksCleared":
        return VllmCleared()
    return None  # an event kind this bridge does not know: not about the blocks it tracks


def decode_batch(payload: bytes) -> list[VllmEvent]:
    """The events of one vLLM KV event batch (msgpack: `[ts, events, data_parallel_rank]`, each
    event a map tagged by `type`), read generically so the worker side never imports vLLM."""
    import msgspec

    try:
        raw = msgspec.msgpack.decode(payload)
        if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
            raise BadPayload("a batch is [ts, events, ...]")
        return [e for e in (_event(item) for item in raw[1]) if e is not None]
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise BadPayload(str(exc)) from exc


def g1_fingerprint(model: str, block_size: int) -> bytes:
    """The fingerprint of a worker without KVBM (no block layout to fingerprint): keys only
    need to be those the router computes from the fingerprint the worker announces."""
    return xxhash.xxh3_128_digest(f"dynkv-g1\0{model}\0{block_size}".encode())


class G1Sink(Protocol):
    """Where bridged changes go (`KvEventPublisher`)."""

    def g1_changed(self, stored: Sequence[int] = (), removed: Sequence[int] = ()) -> None: ...

    def g1_cleared(self) -> None: ...


@dataclass
class TranslatorCounters:
    stored: int = 0  # blocks bridged
    removed: int = 0  # removals bridged
    skipped: int = 0  # stored blocks left out (see the module doc)
    forgotten: int = 0  # entries dropped by the bound (reported removed)
    resets: int = 0  # the bridge lost track (gap, cleared): every entry dropped
    reasons: dict[str, int] = field(default_factory=dict)  # why blocks were skipped


class G1Translator:
    def __init__(self, hasher: BlockHasher, max_blocks: int = 1_000_000) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self.hasher = hasher
        self.max_blocks = max_blocks
        self.counters = TranslatorCounters()
        self._keys: dict[VllmHash, int] = {}  # insertion order = age (re-stores move to the end)

    def __len__(self) -> int:
        return len(self._keys)

    def key_of(self, vllm_hash: VllmHash) -> int | None:
        return self._keys.get(vllm_hash)

    def apply(self, events: Sequence[VllmEvent], sink: G1Sink) -> None:
        for event in events:
            if isinstance(event, VllmStored):
                stored, removed = self._stored(event)
                if stored or removed:
                    sink.g1_changed(stored=stored, removed=removed)
            elif isinstance(event, VllmRemoved):
                removed = self._removed(event)
                if removed:
                    sink.g1_changed(removed=removed)
            elif isinstance(event, VllmCleared):
                self.reset(sink)

    def reset(self, sink: G1Sink) -> None:
        """Forget everything and say so (vLLM cleared its cache, or the bridge missed events);
        nothing to say when nothing was known."""
        self.counters.resets += 1
        if self._keys:
            self._keys.clear()
            sink.g1_cleared()

    # ---- internals -------------------------------------------------------------------------------
    def _skip(self, why: str, blocks: int) -> tuple[list[int], list[int]]:
        self.counters.skipped += blocks
        self.counters.reasons[why] = self.counters.reasons.get(why, 0) + blocks
        return [], []

    def _stored(self, ev: VllmStored) -> tuple[list[int], list[int]]:
        n, bs = len(ev.hashes), self.hasher.block_size
        if not _device(ev.medium, ev.group):
            return [], []  # another pool's blocks: not G1
        if ev.block_size != bs or len(ev.token_ids) != n * bs:
            return self._skip("block_size", n)
        if ev.lora_name is not None:
            return self._skip("lora", n)
        extra = ev.extra if ev.extra is not None else [None] * n
        if len(extra) != n:
            return self._skip("extra_keys", n)
        if ev.parent is None:
            salt = _salt(extra[0])
            if salt is False:
                return self._skip("extra_keys", n)
            parent = self.hasher.root(extra_keys(salt or None))
        else:
            known = self._keys.get(ev.parent)
            if known is None:
                return self._skip("unknown_parent", n)
            parent = known
            if extra[0]:
                return self._skip("extra_keys", n)
        # later blocks carry no extra keys unless multimodal or embeddings: stop at the first
        usable = next((i for i in range(1, n) if extra[i]), n)
        if usable < n:
            self._skip("extra_keys", n - usable)
        keys = self.hasher.chain(parent, ev.token_ids[: usable * bs])
        new: list[tuple[VllmHash, int]] = []
        for h, key in zip(ev.hashes[:usable], keys, strict=True):
            old = self._keys.pop(h, None)
            self._keys[h] = key  # newest last
            if old != key:
                new.append((h, key))
        removed = self._bound()
        stored = [key for h, key in new if self._keys.get(h) == key]
        self.counters.stored += len(stored)
        return stored, removed

    def _bound(self) -> list[int]:
        over = len(self._keys) - self.max_blocks
        if over <= 0:
            return []
        oldest = list(self._keys)[:over] if over > 64 else _first(self._keys, over)
        removed = [self._keys.pop(h) for h in oldest]
        self.counters.forgotten += len(removed)
        return removed

    def _removed(self, ev: VllmRemoved) -> list[int]:
        if not _device(ev.medium, ev.group):
            return []
        removed = [k for k in (self._keys.pop(h, None) for h in ev.hashes) if k is not None]
        self.counters.removed += len(removed)
        return removed


def _first(keys: dict, n: int) -> list:
    it = iter(keys)
    return [next(it) for _ in range(n)]


def _device(medium: str | None, group: int | None) -> bool:
    return medium in (None, DEVICE_MEDIUM) and group in (None, 0)


def _salt(first: Any) -> str | None | bool:
    """The cache salt among the first block's extra keys; None: no salt; False: keys the
    runtime does not have (multimodal pairs, prompt-embedding digests, more than one string)."""
    if not first:
        return None
    if not isinstance(first, list | tuple):
        return False
    strings = [k for k in first if isinstance(k, str)]
    if len(strings) != len(first) or len(strings) > 1:
        return False
    return strings[0]
