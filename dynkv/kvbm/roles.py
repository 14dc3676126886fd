"""The roles a dynkv worker (a vLLM engine) plays, named once.

`agg` serves whole requests; in disaggregated serving a `prefill` worker computes the prompt and
hands its KV blocks to a `decode` worker (through the handoff pool, `dynkv.kvbm.handoff`). The
runtime lives in `dynkv.kvbm` because vLLM loads it on its own; the launcher, the plan and the
frontend may import this enum from here (that direction is allowed, the reverse is not).
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    AGG = "agg"
    PREFILL = "prefill"
    DECODE = "decode"


# The names as plain strings, in this order: `"agg" in Role` raises TypeError on Python 3.11, so a
# membership test on a string (a service's role, a TOML table name) uses this.
ROLE_NAMES: tuple[str, ...] = tuple(role.value for role in Role)
