"""Block keys: a chained 128-bit hash over (parent key, token ids), rooted in the fingerprint.

key(block i) = xxh3_128(key(block i-1) ‖ token ids of block i), and the root is
xxh3_128(fingerprint ‖ extra keys). Extra keys (cache salt, LoRA adapter, multimodal hashes) enter
the root, so two tenants with different salts share no block at all. Nothing here depends on
PYTHONHASHSEED or on a random seed: keys are identical across processes and restarts (LMCache
users lost every hit to a random seed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

BlockKey = int  # 128-bit
KEY_BYTES = 16


def extra_keys(
    cache_salt: str | None = None, lora_name: str | None = None, lora_path: str = ""
) -> tuple[str, ...]:
    """A request's extra keys, the one convention of the runtime and the router (a router that
    computes a prompt's keys for another convention would find nothing)."""
    extra: list[str] = []
    if cache_salt:
        extra.append("salt:" + cache_salt)
    if lora_name is not None:
        extra.append(f"lora:{lora_name}:{lora_path}")
    return tuple(extra)


class BlockHasher:
    def __init__(self, fingerprint: bytes, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.fingerprint = fingerprint
        self.block_size = block_size

    def root(self, extra: Iterable[str | bytes] = ()) -> BlockKey:
        h = xxhash.xxh3_128()
        h.update(self.fingerprint)
        for item in extra:
            data = item.encode() if isinstance(item, str) else bytes(item)
            # length-prefixed so ("ab","c") and ("a","bc") differ
            h.update(len(data).to_bytes(4, "little"))
            h.update(data)
        return h.intdigest()

    def keys(
        self,
        token_ids: Sequence[int] | np.ndarray,
        extra: Iterable[str | bytes] = (),
        *,
        start: int = 0,
        parent: BlockKey | None = None,
    ) -> list[BlockKey]:
        """Keys of the full blocks of `token_ids` (a trailing partial block has no key).

        `start`/`parent` continue a chain: keys of blocks `start..` given the key of block
        `start-1` (used to extend a request's keys as it decodes without rehashing its prompt).
        """
        if start > 0 and parent is None:
            raise ValueError("continuing a chain needs the parent key")
        prev = self.root(extra) if start == 0 else parent
        assert prev is not None
        tokens = np.asarray(token_ids, dtype=np.uint32)
        return self.chain(prev, tokens[start * self.block_size :])

    def chain(self, parent: BlockKey, token_ids: Sequence[int] | np.ndarray) -> list[BlockKey]:
        """Keys of the full blocks of `token_ids`, the blocks that follow the one keyed `parent`
        (a root from `root()`, or any block's key)."""
        tokens = np.asarray(token_ids, dtype=np.uint32)
        prev, bs = parent, self.block_size
        out: list[BlockKey] = []
        for i in range(len(tokens) // bs):
            h = xxhash.xxh3_128()
            h.update(prev.to_bytes(KEY_BYTES, "little"))
            h.update(tokens[i * bs : (i + 1) * bs].tobytes())
            prev = h.intdigest()
            out.append(prev)
        return out
