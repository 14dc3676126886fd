"""The records the connector's scheduler side keeps: per request, and the plan of one step.

`StepPlan` travels to the worker inside vLLM's connector metadata; `RequestState` lives only in
the EngineCore process, from a request's first lookup to its end (dynkv/kvbm/vllm_scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynkv.kvbm.onboard_policy import Decision
from dynkv.kvbm.ops import StepOps


@dataclass
class RequestState:
    """What the scheduler side keeps of one request between vLLM's calls."""

    request: Any
    extra: tuple[str, ...]
    keys: list[int] = field(default_factory=list)
    stored: int = 0  # blocks [0, stored) were considered for write-through
    lookup_start: int = 0  # block index of the last lookup (vLLM's own hit, in blocks)
    recorded: bool = False  # this request's lookup is in the hit-rate window
    skip: bool = False  # inputs KVBM cannot key (multimodal, prompt embeddings), or opted out
    produce: bool = False  # a prefill request of disaggregated serving: hand its prompt off
    handoff_slots: list[int] | None = None  # where the prompt's blocks went (prefill side)
    receive: list[int] | None = None  # handoff slots of the prompt's blocks (decode side)
    receive_pool: str = ""  # the handoff pool they are in (a checked id of a prefill worker)
    use_handoff: bool = False  # the last lookup chose the handoff over the local tiers
    decision: Decision | None = None  # the onboard policy's, at the last lookup
    prefill_t0: float | None = None  # when the step that started computing the prompt was planned
    prefill_from: int = 0  # tokens already held when it started (prefix caches)
    loaded: bool = False  # a KVBM load ran while it was computed: not a clean prefill sample


MAX_TIMED_STEPS = 64  # steps awaiting their report; older ones are forgotten (never reported)


@dataclass
class StepPlan:
    """The scheduler's plan for one step (carried inside vLLM's connector metadata)."""

    ops: StepOps = field(default_factory=StepOps)
    unloadable: list[int] = field(default_factory=list)  # device blocks promised but not held
    step: int = -1  # ≥ 0: the worker reports this step back when done (a prefill is timed)
