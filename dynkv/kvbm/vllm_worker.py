"""The worker half of the vLLM connector: executes each step's ops next to the KV tensors.

Lives in vLLM's worker process (on CPU a spawned process; on CUDA inside EngineCore unless tensor
parallel), and owns the `BlockStore`. Loads run in `start_load_kv`, before the forward pass (vLLM
calls it first whenever the step has synchronous loads); stores run in `wait_for_save`, after it,
when the step's KV is written. A block that fails to load is returned by
`get_block_ids_with_load_errors` in the same step, so vLLM recomputes it: never wrong output.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.ops import StepOps, StoreReport, discard_computed
from dynkv.kvbm.store import BlockStore

log = logging.getLogger("dynkv.kvbm")


class WorkerSide:
    def __init__(
        self, layout: BlockLayout, settings: KvbmSettings, *, num_blocks: int, rank: int = 0
    ) -> None:
        self.layout = layout
        self.settings = settings
        self.num_blocks = num_blocks
        self.rank = rank
        self.device = None
        self.store: BlockStore | None = None
        self._load_errors: set[int] = set()
        self._failed_this_step = False  # a load failed: the step's own KV is not to be stored
        self._steps: list[int] = []  # steps the scheduler asked to hear back about
        self._busy = 0.0  # seconds spent loading and saving since the last report

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        from dynkv.kvbm.device import DeviceKV

        device = DeviceKV(kv_caches, self.num_blocks)
        if device.bytes_per_block != self.layout.bytes_per_block:
            raise KvbmConfigError(
                f"the KV tensors hold {device.bytes_per_block} bytes per block but the "
                f"configuration implies {self.layout.bytes_per_block}; this attention backend's "
                "layout is not supported by the dynkv connector",
                "serve without --kv-transfer-config, or report the backend and model",
            )
        self.device = device
        self.store = BlockStore(self.layout, self.settings, pin_memory=device.is_cuda)
        log.info(
            "KVBM worker ready: %d layers, %d bytes per block, G2 %s, G3 %s",
            self.layout.num_layers,
            self.layout.bytes_per_block,
            f"{self.store.host.slots} blocks" if self.store.host else "off",
            f"{self.store.disk.slots} blocks in {self.store.disk.directory}"
            if self.store.disk
            else "off",
        )
        if self.store.handoff is not None:
            log.info(
                "KVBM handoff pool: %d blocks in %s",
                self.store.handoff.slots,
                self.store.handoff.directory,
            )
        elif self.settings.handoff_dir is not None:
            log.info(
                "KVBM handoff: reads the pools %s in %s",
                ", ".join(self.settings.readable_pools),
                self.settings.handoff_dir,
            )

    def start_load(self, ops: StepOps, unloadable: list[int]) -> None:
        failed = set(unloadable)
        if ops.loads and self.store is not None and self.device is not None:
            t0 = time.perf_counter()
            failed.update(self.store.load(ops.loads, self.device))
            self._busy += time.perf_counter() - t0
        self._load_errors.update(failed)
        self._failed_this_step = bool(failed)

    def save(self, ops: StepOps) -> None:
        if self.store is None or self.device is None:
            return
        failed, self._failed_this_step = self._failed_this_step, False
        if failed:  # the forward attended to blocks that did not load: keep none of its KV
            ops, discarded = discard_computed(ops)
            self.store.add_report(discarded)
        t0 = time.perf_counter()
        if ops.stores or ops.offloads:
            self.store.store(ops.stores, ops.offloads, self.device)
        if ops.handoffs:
            self.store.write_handoff(ops.handoffs, self.device)
        self._busy += time.perf_counter() - t0

    def ack(self, step: int) -> None:
        """The scheduler times a prefill by this step's report: make sure there is one."""
        self._steps.append(step)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        if errors:
            log.info("KVBM: %d blocks could not be onboarded; vLLM recomputes them", len(errors))
        return errors

    def take_report(self) -> StoreReport | None:
        if self.store is None:
            return None
        report = self.store.take_report()
        report.steps = [(step, self._busy) for step in self._steps]
        self._steps, self._busy = [], 0.0
        if self.rank != 0:  # counters once per deployment, failures and acks from every rank
            report.counts.clear()
            report.durations.clear()
            report.loads.clear()
        return report or None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
