"""Disaggregated serving: a prefill worker computes the prompt, a decode worker generates.

Two steps per request (docs/disagg.md), each to a worker the routing policy picks among the
healthy workers of that role (`RouteContext.open`):
1. prefill: the request, with `max_tokens=1`, not streamed, and
   `kv_transfer_params={"dynkv": {"produce": true}}`, to a `prefill` worker. Its connector copies
   the prompt's KV blocks into its own handoff pool and returns where they are (the pool's id and
   the slots) in the response's `kv_transfer_params`.
2. decode: the client's request as sent, plus those `kv_transfer_params`, to a `decode` worker,
   whose connector checks the pool is one of the deployment's and loads the blocks instead of
   computing the prompt; its answer (streamed or not) is relayed to the client.
Over NIXL (`--disagg-transfer nixl`, GPUs) step 1 asks for vLLM's NixlConnector protocol
instead (`do_remote_decode`), and step 2 passes its answer's params on the same way.
If no prefill worker can take the request: a 503 that says so, or — with DYNKV_DISAGG_FALLBACK —
the decode worker serves it alone (it computes the prompt itself). A prefill that answers with an
error (a prompt too long) is passed to the client as the answer; a prefill whose answer carries no
handoff still leads to a correct decode, which then computes the prompt.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.responses import Response

from dynkv.frontend.errors import ApiError, no_worker
from dynkv.frontend.kv_route import UsageTap
from dynkv.frontend.pool import WorkerPool
from dynkv.frontend.protocol import INTERNAL_FIELDS, ApiRequest
from dynkv.frontend.router import RouteContext, Strategy
from dynkv.kvbm.roles import Role

log = logging.getLogger("dynkv.frontend")

# What the prefill request asks its connector for, by transfer: dynkv's connector copies the
# prompt's blocks into the shared-memory pool; vLLM's NixlConnector keeps them on the device for
# the decode worker to pull (its own protocol: the answer's params carry the remote block ids).
PREFILL_PARAMS: dict[str, dict[str, Any]] = {
    "handoff": {"dynkv": {"produce": True}},
    "nixl": {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    },
}
# fields that only make sense for the client's own (decode) request
_PREFILL_DROP = (
    "stream",
    "stream_options",
    "max_completion_tokens",
    "n",
    "best_of",
    *INTERNAL_FIELDS,
)


def usage_of(answer: bytes) -> UsageTap:
    tap = UsageTap()
    tap(answer)
    return tap


def prefill_body(req: ApiRequest, transfer: str = "handoff") -> bytes:
    body: dict[str, Any] = {k: v for k, v in req.body.items() if k not in _PREFILL_DROP}
    body.update(max_tokens=1, stream=False, kv_transfer_params=PREFILL_PARAMS[transfer])
    return json.dumps(body, separators=(",", ":")).encode()


class Disaggregated(Strategy):
    name = "disagg"

    def __init__(self, fallback: bool = False, transfer: str = "handoff") -> None:
        self.fallback = fallback
        self.transfer = transfer

    def can_serve(self, pool: WorkerPool, model: str) -> bool:
        return bool(pool.workers(model, Role.DECODE))

    async def serve(self, ctx: RouteContext, req: ApiRequest) -> Response:
        params = None
        try:
            prefill = await ctx.open(req, Role.PREFILL, body=prefill_body(req, self.transfer))
        except ApiError as exc:
            if exc.status != 503:
                raise
            if not self.fallback:
                raise no_worker(
                    f"no prefill worker of model {req.model!r} can take the request "
                    f"({exc.message}); set DYNKV_DISAGG_FALLBACK=true to let the decode workers "
                    "serve alone meanwhile"
                ) from None
            log.warning("prefill unavailable (%s): decode serves %s alone", exc.message, req.model)
        else:
            answer = await prefill.read()
            if prefill.ticket is not None and prefill.status == 200:
                # the KV router predicted what the prefill worker reuses: its answer says
                ctx.metrics.cached_tokens(
                    prefill.worker.id, prefill.ticket.predicted_cached, usage_of(answer)
                )
            if prefill.status != 200:  # e.g. the prompt is too long: that is the answer
                return Response(
                    answer, status_code=prefill.status, headers=prefill.client_headers()
                )
            try:
                params = json.loads(answer).get("kv_transfer_params")
            except (ValueError, AttributeError):
                params = None
            if not params:
                log.warning(
                    "prefill of %s returned no KV handoff: decode computes the prompt", req.model
                )
        body = req.with_body(kv_transfer_params=params) if params else req.forward_body()
        return ctx.relay(await ctx.open(req, Role.DECODE, body=body), req)
