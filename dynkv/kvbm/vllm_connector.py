"""The bundled KVBM connector for vLLM 0.32 (`KVConnectorBase_V1`).

Load it with:
    --kv-transfer-config '{"kv_connector": "DynkvConnector",
                           "kv_connector_module_path": "dynkv.kvbm.vllm_connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}'
and configure it with the `DYN_KVBM_*` environment (or `kv_connector_extra_config` keys).

vLLM builds one instance per role: SCHEDULER in the EngineCore process (the leader: index and
policies, `vllm_scheduler.SchedulerSide`) and WORKER in each model worker process (the store: the
bytes, `vllm_worker.WorkerSide`). Everything they exchange travels in `DynkvMetadata` (scheduler →
worker, every step) and `DynkvWorkerMetadata` (worker → scheduler, every step). This class only
dispatches; importing it is cheap and has no side effects (vLLM imports it in the API server).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from dynkv.kvbm.ops import StepOps, StoreReport

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("dynkv.kvbm")


@dataclass
class DynkvMetadata(KVConnectorMetadata):
    ops: StepOps = field(default_factory=StepOps)
    unloadable: list[int] = field(default_factory=list)
    step: int = -1  # ≥ 0: report this step back when it is done (times a prefill)


@dataclass
class DynkvWorkerMetadata(KVConnectorWorkerMetadata):
    report: StoreReport = field(default_factory=StoreReport)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, DynkvWorkerMetadata):
            self.report.merge(other.report)
        return self


class DynkvConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from dynkv.kvbm.logs import ensure_handler
        from dynkv.kvbm.vllm_config import disk_dir_for_rank, layout_from, settings_from

        ensure_handler()
        settings = settings_from(vllm_config)
        layout = layout_from(vllm_config, kv_cache_config)
        parallel = vllm_config.parallel_config
        world = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        self._scheduler = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from dynkv.kvbm.vllm_scheduler import SchedulerSide

            transfer = self._kv_transfer_config
            if transfer.kv_load_failure_policy != "recompute":
                # a cache is best-effort: a block that fails its checksum is recomputed, not fatal
                log.info(
                    "KVBM: setting kv_load_failure_policy=recompute (was %s)",
                    transfer.kv_load_failure_policy,
                )
                transfer.kv_load_failure_policy = "recompute"
            self._scheduler = SchedulerSide(
                layout, disk_dir_for_rank(settings, 0, world), world_size=world
            )
        else:
            from dynkv.kvbm.vllm_worker import WorkerSide

            rank = _worker_rank()
            self._worker = WorkerSide(
                layout,
                disk_dir_for_rank(settings, rank, world),
                num_blocks=kv_cache_config.num_blocks,
                rank=rank,
            )

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never an error

    # ==== worker side ====================================================================
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DynkvMetadata) and self._worker is not None
        self._worker.start_load(meta.ops, meta.unloadable)
        if meta.step >= 0:
            self._worker.ack(meta.step)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # every load completes in start_load_kv, before the forward

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # whole blocks are saved in wait_for_save, once all layers are written

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DynkvMetadata) and self._worker is not None
        self._worker.save(meta.ops)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self._worker is None:
            return None
        report = self._worker.take_report()
        return DynkvWorkerMetadata(report) if report else None

    # ==== scheduler side =================================================================
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        for req_id in scheduler_output.preempted_req_ids or ():
            self._scheduler.on_preempted(req_id)
        manager = self._kv_cache_manager

        def block_ids_of(req_id: str) -> list[int]:
            return list(manager.get_block_ids(req_id)[0]) if manager is not None else []

        plan = self._scheduler.build_step(scheduler_output.num_scheduled_tokens, block_ids_of)
        return DynkvMetadata(plan.ops, plan.unloadable, plan.step)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, DynkvWorkerMetadata) and self._scheduler is not None:
            self._scheduler.apply_report(meta.report)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is None:
            return False, None
        return False, self._scheduler.request_finished(request.request_id)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()


def _worker_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_world_group

        return int(get_world_group().rank_in_group)
    except Exception:
        return 0
