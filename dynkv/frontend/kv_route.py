"""The `kv` routing policy in the frontend: tokenize, ask the KV router, account for the load.

When the deployment has NATS the frontend always runs a `KvRouter` (dynkv.router), whatever its
default policy, so that any request may choose `kv` with the `x-dynkv-router` header (a
benchmark compares policies on one fleet). Per request routed by `kv`:

1. its prompt token ids, computed as the worker will (`prompt_ids`): on the event loop when at
   most `INLINE_FRESH_CHARS` characters of it are not in the piece cache (a conversation's next
   round, a known system prompt: well under a millisecond), else in the tokenizer thread, so a
   new long prompt does not stall the loop (on a busy small host the hop to that thread and
   back cost a few milliseconds of every decision); a request this cannot tokenize is routed
   least outstanding, counted as reason `tokenize_failed`;
2. `KvRouter.pick` of the prompt (its tokens and cache salt) with each candidate's load: the
   prompt tokens this frontend has sent it that are not prefilled yet (released when the
   worker's first byte arrives; how long the oldest has been computing, `prefill_book.py`) and
   its requests in flight; it chooses by estimated TTFT (dynkv/router/score.py) or, while NATS
   is down, by load (reason `nats_down`, also counted in `dynkv_router_nats_fallbacks_total`);
3. the prediction (cached tokens) is kept so that the response's `usage` can be compared with it
   (`UsageTap`).
docs/frontend.md#routing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dynkv.frontend.errors import bad_request
from dynkv.frontend.piece_cache import NotCached
from dynkv.frontend.policy import POLICIES, Choice, LeastOutstanding
from dynkv.frontend.pool import Worker
from dynkv.frontend.prefill_book import PrefillBook, Queued
from dynkv.frontend.prompt_ids import PromptTokenizer, Unsupported
from dynkv.frontend.protocol import ApiRequest

if TYPE_CHECKING:
    from dynkv.frontend.config import FrontendConfig

log = logging.getLogger("dynkv.frontend")

ROUTER_HEADER = "x-dynkv-router"
KV = "kv"
POLICY_NAMES = (*POLICIES, KV)
# reasons of dynkv_router_decisions_total{policy="kv"} besides the router's own (kv, kv_replica,
# kv_miss, nats_down)
TOKENIZE_FAILED = "tokenize_failed"
NO_ROUTER = "kv_unavailable"  # no NATS configured, or no tokenizer: least outstanding
DECODE = "decode_fewest_outstanding"  # disagg: the decode step goes least outstanding
# characters of a prompt the event loop may encode itself (500–900 tokens: ~0.5 ms on an idle
# core); a prompt with more that the piece cache lacks goes to the tokenizer thread
INLINE_FRESH_CHARS = 2048
# …and only from a body this small (a 256 KB chat the cache holds whole: ~1.2 ms to render, cut
# and look up its pieces)
INLINE_MAX_BODY_BYTES = 256 * 1024


def policy_override(header: str | None) -> str | None:
    """The request's `x-dynkv-router` policy, or None; a 400 naming the choices otherwise."""
    if header is None or not header.strip():
        return None
    name = header.strip().lower()
    if name not in POLICY_NAMES:
        raise bad_request(
            f"Unknown {ROUTER_HEADER} {header.strip()!r}: choose one of {', '.join(POLICY_NAMES)}.",
            param=ROUTER_HEADER,
            code="unknown_router",
        )
    return name


@dataclass
class KvTicket:
    """One kv decision's bookkeeping: the prefill it queued on the worker (until its first
    byte) and what the router predicted it would find cached."""

    book: PrefillBook
    queued: Queued
    predicted_cached: int
    released: bool = False
    on_prefilled: Callable[[], None] | None = None  # the router's in-flight record ends

    def prefilled(self) -> None:
        if not self.released:
            self.released = True
            self.book.done(self.queued)
            if self.on_prefilled is not None:
                self.on_prefilled()


@dataclass
class KvPick:
    choice: Choice
    ticket: KvTicket | None
    seconds: float


class KvRouting:
    """The frontend's side of the KV router; `router` is None without NATS."""

    def __init__(self, router, tokenizer: PromptTokenizer | None) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.book = PrefillBook()
        self._fallback = LeastOutstanding()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynkv-tokenize")
        self._warned = False

    @property
    def available(self) -> bool:
        return self.router is not None and self.tokenizer is not None

    async def start(self) -> None:
        if self.router is not None:
            await self.router.start()
        # Load the tokenizer before the first kv request needs it (seconds for a real model). Any
        # request may choose kv with the header, so this does not wait for kv to be the default.
        if self.available:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(self._pool, self._warm)

    def _warm(self) -> None:
        try:
            _ = self.tokenizer.tokenizer  # type: ignore[union-attr]
        except Exception as exc:
            log.warning("kv router: cannot load the tokenizer (%s); kv routes by load", exc)

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def remove_worker(self, worker: Worker) -> None:
        if self.router is not None:
            self.router.remove_worker(worker.id)
        self.book.drop(worker.id)

    async def token_ids(self, req: ApiRequest) -> list[int] | None:
        """The prompt's token ids (computed once per request), None when they cannot be."""
        if "token_ids" in req.scratch:
            return req.scratch["token_ids"]
        assert self.tokenizer is not None
        loop = asyncio.get_running_loop()
        tok = self.tokenizer
        try:
            ids = self._inline_ids(req)
            if ids is None:  # encoding would hold the event loop: the tokenizer thread does it
                ids = await loop.run_in_executor(self._pool, tok.token_ids, req.endpoint, req.body)
        except Unsupported as exc:
            log.debug("kv router: request %s routed by load: %s", req.log_id, exc)
            ids = None
        except Exception as exc:  # a template error, a tokenizer that cannot load
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "kv router: cannot tokenize request %s (%s); routed by load "
                    "(further failures are logged at debug level)", req.log_id, exc)  # fmt: skip
            ids = None
        req.scratch["token_ids"] = ids
        return ids

    def _inline_ids(self, req: ApiRequest) -> list[int] | None:
        """The ids when the piece cache holds most of the prompt, computed here; else None."""
        if len(req.raw) > INLINE_MAX_BODY_BYTES:
            return None  # rendering and cutting alone would hold the loop a millisecond or more
        assert self.tokenizer is not None
        try:
            return self.tokenizer.token_ids(req.endpoint, req.body, fresh_budget=INLINE_FRESH_CHARS)
        except NotCached:
            return None

    async def pick(self, req: ApiRequest, candidates: Sequence[Worker]) -> KvPick | None:
        if not candidates:
            return None
        t0 = time.perf_counter()
        if not self.available:
            fallback = self._fallback.pick(candidates)
            assert fallback is not None
            return KvPick(Choice(fallback.worker, NO_ROUTER), None, time.perf_counter() - t0)
        ids = await self.token_ids(req)
        if not ids:
            fallback = self._fallback.pick(candidates)
            assert fallback is not None
            choice = Choice(fallback.worker, TOKENIZE_FAILED)
            return KvPick(choice, None, time.perf_counter() - t0)
        from dynkv.router.router import Prompt
        from dynkv.router.score import WorkerLoad

        by_id = {w.id: w for w in candidates}
        loads = {}
        for w in candidates:
            queue = self.book.load(w.id)
            loads[w.id] = WorkerLoad(
                outstanding_prefill_tokens=queue.tokens,
                running_requests=w.outstanding,
                head_prefill_tokens=queue.head_tokens,
                head_prefill_elapsed_s=queue.head_elapsed_s,
            )
        salt = req.body.get("cache_salt")
        decision = self.router.pick(Prompt(ids, salt if isinstance(salt, str) else None), loads)
        chosen = decision.chosen
        if log.isEnabledFor(logging.DEBUG):  # why this worker: every candidate's estimate
            log.debug(
                "kv router: request %s -> %s (%s, heat %.1f): %s", req.log_id, chosen.worker,
                decision.reason, decision.heat, "; ".join(
                    f"{e.worker} {e.ttft_s * 1000:.0f} ms = recompute {e.recompute_s * 1000:.0f}"
                    f" + load {e.load_s * 1000:.0f} + queue {e.queue_s * 1000:.0f}, holds "
                    f"{e.match.blocks} blocks, copies {e.replica_tokens} tokens"
                    for e in decision.estimates
                ),
            )  # fmt: skip
        worker = by_id[chosen.worker]
        queued = self.book.add(worker.id, max(0, len(ids) - chosen.cached_tokens))
        ticket = KvTicket(
            self.book,
            queued,
            chosen.cached_tokens,
            on_prefilled=lambda: self.router.prefilled(decision),
        )
        return KvPick(Choice(worker, decision.reason), ticket, time.perf_counter() - t0)


# usage.prompt_tokens_details.cached_tokens in vLLM's compact JSON (a response body's or an SSE
# event's); a quote inside generated text is escaped, so text cannot fake it
_CACHED = re.compile(rb'"prompt_tokens_details"\s*:\s*\{[^{}]*?"cached_tokens"\s*:\s*(\d+)')
TAIL_BYTES = 64 * 1024


class UsageTap:
    """Keeps the tail of a response body to read the cached tokens its `usage` reports (a
    non-streamed answer, or the final chunk of a stream sent with
    `stream_options.include_usage`); None when it reports none."""

    def __init__(self) -> None:
        self._tail = b""

    def __call__(self, chunk: bytes) -> None:
        tail = self._tail + chunk
        self._tail = tail[-TAIL_BYTES:]

    def cached_tokens(self) -> int | None:
        found = _CACHED.findall(self._tail)
        return int(found[-1]) if found else None


def kv_routing(config: FrontendConfig) -> KvRouting:
    """The KV router when the deployment has NATS (whatever the default policy: a request may
    ask for `kv`), with the workers' tokenizer when the plan named it."""
    router = None
    if config.nats_url:
        from dynkv.router.router import KvRouter
        from dynkv.router.score import ScorerConfig, parse_tier_weights

        router = KvRouter(
            config.nats_url,
            config.deployment,
            ScorerConfig(
                decode_seconds_per_request=config.router_decode_seconds,
                tier_weights=parse_tier_weights(config.router_tier_weights),
                temperature=config.router_temperature,
                replica_half_life_s=config.router_replica_half_life,
            ),
        )
    tokenizer = (
        PromptTokenizer(config.tokenizer, config.chat_template) if config.tokenizer else None
    )
    if config.router == KV and (router is None or tokenizer is None):
        log.warning(
            "router kv without %s: requests are routed least outstanding",
            "a NATS URL" if router is None else "the model's tokenizer (--tokenizer)",
        )
    return KvRouting(router, tokenizer)
