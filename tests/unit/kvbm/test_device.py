"""G1 ↔ host copies: byte-exact for the CPU layout and a FlashAttention-style layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynkv.kvbm.device import DeviceKV, runs


def test_runs_group_consecutive_pairs():
    assert runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 4]) == [(3, 0, 3), (9, 3, 2)]
    assert runs([1, 2], [5, 7]) == [(1, 5, 1), (2, 7, 1)]
    assert runs([], []) == []


def cpu_layout(nb=16, layers=3):
    torch.manual_seed(0)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(nb, 2, 32, 128).bfloat16()
        for i in range(layers)
    }


def flash_layout(nb=16, layers=3):
    torch.manual_seed(1)
    return {f"l{i}": torch.randn(2, nb, 32, 2, 64).half() for i in range(layers)}


def lbnhc_layout(nb=16, layers=3):
    """vLLM's default CUDA layout: logical [B, H, N, C], physically [B, N, H, C]."""
    torch.manual_seed(2)
    return {f"l{i}": torch.randn(nb, 32, 2, 128).half().permute(0, 2, 1, 3) for i in range(layers)}


@pytest.mark.parametrize("make", [cpu_layout, flash_layout, lbnhc_layout])
@pytest.mark.parametrize(
    "src, rows",
    [
        ([0, 1, 2, 3], [0, 1, 2, 3]),  # one run
        ([5, 1, 9, 2, 7, 3, 11], [6, 0, 3, 1, 5, 2, 4]),  # fragmented both sides: run by run
        ([5, 1, 9, 2, 7, 3, 11], [0, 1, 2, 3, 4, 5, 6]),  # scattered blocks, one run of rows
    ],
)
def test_round_trip_is_byte_exact(make, src, rows):
    kv = make()
    dev = DeviceKV(kv, 16)
    layout = dev.layout("m", 32)
    host = np.zeros((8, layout.slot_stride), dtype=np.uint8)
    before = {b: dev.block_bytes(b) for b in src}
    dev.to_host(src, host, rows)
    for b, r in zip(src, rows, strict=True):
        assert bytes(host[r, : layout.bytes_per_block]) == before[b]
    dst = [15, 14, 13, 12, 10, 8, 6][: len(src)]
    dev.from_host(host, rows, dst)
    for b, d in zip(src, dst, strict=True):
        assert dev.block_bytes(d) == before[b]


def test_layout_describes_the_device_tensors():
    dev = DeviceKV(cpu_layout(layers=2), 16)
    layout = dev.layout("tiny", 32)
    assert layout.num_layers == 2
    assert layout.bytes_per_layer_block == 2 * 32 * 128 * 2
    assert layout.dtype == "bfloat16" and "block_dim=[0]" in layout.device_layout
    assert DeviceKV(flash_layout(), 16).block_dims == [1]


def test_permuted_pages_are_copied_raw():
    kv = lbnhc_layout(layers=1)
    dev = DeviceKV(kv, 16)
    (tensor,) = kv.values()
    # the host row holds the page exactly as it sits in memory (no transposition)
    page = tensor.permute(0, 2, 1, 3)[3].contiguous().view(torch.uint8).numpy().tobytes()
    assert dev.block_bytes(3) == page


def test_tensor_without_block_dimension_is_rejected():
    with pytest.raises(ValueError, match="no dimension of 16 blocks"):
        DeviceKV({"x": torch.zeros(3, 4)}, 16)
