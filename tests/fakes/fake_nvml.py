"""Canned NVML for the doctor's GPU scenarios: this machine has no NVIDIA GPU, so a snapshot (or
the error NVML would raise) stands in for one behind the package's `Nvml` interface."""

from __future__ import annotations

from dynkv.doctor.nvml import NvmlSnapshot, NvmlUnavailable


class FakeNvml:
    """Canned NVML for tests (and for `up`'s tests): a snapshot, or the error NVML would raise."""

    def __init__(
        self, snapshot: NvmlSnapshot | None = None, error: NvmlUnavailable | None = None
    ) -> None:
        if snapshot is None and error is None:
            error = NvmlUnavailable("library", "libnvidia-ml.so not found (fake)")
        self._snapshot, self._error = snapshot, error
        self.calls = 0

    def snapshot(self) -> NvmlSnapshot:
        self.calls += 1
        if self._error is not None:
            raise self._error
        assert self._snapshot is not None
        return self._snapshot
