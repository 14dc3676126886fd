"""G1 as blocks of bytes: copies between vLLM's per-layer KV tensors and host block rows.

vLLM keeps one KV tensor per attention layer. Where the block dimension sits differs by backend
(CPU: `[num_blocks, kv_heads, block_size, 2*head_size]`, dim 0; FlashAttention on CUDA:
`[2, num_blocks, block_size, kv_heads, head_size]`, dim 1), so each tensor is viewed as bytes
with the block dimension moved first; one block's bytes in a host row are then layer 0's slice,
layer 1's slice, and so on — opaque, and identical on the way back.

Copies are batched: consecutive device blocks that go to consecutive rows form a run copied with
one strided copy per layer (vLLM hands out block ids in order and the host pool hands out slots in
order, so a fresh prompt is usually one run). Fragmented batches (blocks vLLM recycled from its
free queue) are copied run by run through numpy on the CPU — a torch call per 24 KB slice costs
more than the copy, and a gather + scatter moves every byte twice (measured: 112 scattered
blocks of the bench model, 4 ms vs 23 ms) — and with one gather and one scatter per layer on
CUDA. On CUDA the copies run non-blocking on a side stream from/to pinned memory;
`synchronize()` waits for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from dynkv.kvbm.layout import BlockLayout

_RUN_COPY_MAX_RUNS = 4


def runs(block_ids: Sequence[int], rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group (block, row) pairs into runs (first block, first row, length) where both advance by
    one. Order is preserved."""
    out: list[tuple[int, int, int]] = []
    for b, r in zip(block_ids, rows, strict=True):
        if out:
            b0, r0, n = out[-1]
            if b == b0 + n and r == r0 + n:
                out[-1] = (b0, r0, n + 1)
                continue
        out.append((b, r, 1))
    return out


@dataclass(frozen=True)
class _Layer:
    blocks: torch.Tensor  # uint8 view, block dimension first
    offset: int  # byte offset of this layer's slice within a host row
    nbytes: int  # bytes of one block of this layer


class DeviceKV:
    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors")
        self.num_blocks = num_blocks
        self.names = list(kv_caches)
        layers: list[_Layer] = []
        offset = 0
        shapes = set()
        first = next(iter(kv_caches.values()))
        self.device = first.device
        self.dtype = first.dtype
        for name, tensor in kv_caches.items():
            block_dim = _block_dim(tensor, num_blocks, name)
            as_bytes = tensor.view(torch.uint8) if tensor.dtype != torch.uint8 else tensor
            blocks = _dense_pages(as_bytes) if block_dim == 0 else None
            if blocks is None:  # pages not dense in memory: copy the logical block instead
                blocks = as_bytes.movedim(block_dim, 0)
            nbytes = blocks[0].numel()
            layers.append(_Layer(blocks, offset, nbytes))
            shapes.add(tuple(as_bytes.movedim(block_dim, 0).shape[1:]))
            offset += nbytes
        self.layers = layers
        self.bytes_per_block = offset
        self.block_dims = sorted({_block_dim(t, num_blocks, n) for n, t in kv_caches.items()})
        self.layer_block_shape = tuple(next(iter(shapes))) if len(shapes) == 1 else ()
        self.is_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None
        # the fragmented CPU path: numpy views, and 8-byte-word views where pages allow (torch's
        # index kernels move 8-byte words ~4× faster than bytes, on the engine's own threads)
        self._np_blocks = None if self.is_cuda else [layer.blocks.numpy() for layer in layers]
        self._wide = None
        if not self.is_cuda and all(
            layer.blocks.dim() == 2 and layer.offset % 8 == 0 and layer.nbytes % 8 == 0
            for layer in layers
        ):
            self._wide = [layer.blocks.view(torch.int64) for layer in layers]

    def layout(self, model: str, block_size: int) -> BlockLayout:
        per_layer = {layer.nbytes for layer in self.layers}
        if len(per_layer) != 1:
            raise ValueError("layers with different block sizes are not supported")
        return BlockLayout(
            model=model,
            dtype=str(self.dtype).removeprefix("torch."),
            block_size=block_size,
            num_layers=len(self.layers),
            bytes_per_layer_block=per_layer.pop(),
            layer_block_shape=self.layer_block_shape,
            device_layout=f"{self.device.type}:block_dim={self.block_dims}",
        )

    # ---- copies ----------------------------------------------------------------------------------
    def to_host(self, block_ids: Sequence[int], array: np.ndarray, rows: Sequence[int]) -> None:
        """Device blocks `block_ids` → host rows `rows` of `array` ([slots, stride] uint8)."""
        self._copy(block_ids, array, rows, to_host=True)

    def from_host(self, array: np.ndarray, rows: Sequence[int], block_ids: Sequence[int]) -> None:
        """Host rows → device blocks (the onboard direction)."""
        self._copy(block_ids, array, rows, to_host=False)

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _copy(self, block_ids, array, rows, *, to_host: bool) -> None:
        if len(block_ids) != len(rows):
            raise ValueError("block_ids and rows differ in length")
        if not len(block_ids):
            return
        host = torch.from_numpy(array)
        if self._stream is None:
            self._copy_on_current(block_ids, host, rows, to_host)
            return
        # the side stream must see the KV the compute stream wrote, and vice versa
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._copy_on_current(block_ids, host, rows, to_host)
        if not to_host:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _copy_on_current(self, block_ids, host: torch.Tensor, rows, to_host: bool) -> None:
        grouped = runs(block_ids, rows)
        if self._np_blocks is not None and len(grouped) > _RUN_COPY_MAX_RUNS:
            if self._wide is not None and _one_run(rows):
                self._indexed_copy(block_ids, host, rows[0], to_host)
            else:
                self._numpy_run_copy(grouped, host, to_host)
        elif len(grouped) <= _RUN_COPY_MAX_RUNS:
            self._run_copy(grouped, host, to_host)
        else:
            self._gather_copy(block_ids, host, rows, to_host)

    def _numpy_run_copy(self, grouped, host: torch.Tensor, to_host: bool) -> None:
        """Many runs on a CPU device: numpy slices (no per-run torch dispatch)."""
        assert self._np_blocks is not None
        cpu = host.numpy()
        for layer, blocks in zip(self.layers, self._np_blocks, strict=True):
            cols = cpu[:, layer.offset : layer.offset + layer.nbytes]
            for b0, r0, n in grouped:
                dev = blocks[b0 : b0 + n]
                if to_host:
                    cols[r0 : r0 + n] = dev.reshape(n, layer.nbytes)
                else:
                    dev[...] = cols[r0 : r0 + n].reshape(dev.shape)

    def _run_copy(self, grouped, host: torch.Tensor, to_host: bool) -> None:
        """Few runs: one tensor copy per run and layer."""
        nb = self.is_cuda
        for layer in self.layers:
            for b0, r0, n in grouped:
                dev = layer.blocks[b0 : b0 + n]
                cpu = host[r0 : r0 + n, layer.offset : layer.offset + layer.nbytes].view(dev.shape)
                if to_host:
                    cpu.copy_(dev, non_blocking=nb)
                else:
                    dev.copy_(cpu, non_blocking=nb)

    def _gather_copy(self, block_ids, host: torch.Tensor, rows, to_host: bool) -> None:
        """Many scattered runs on a GPU: one gather/scatter kernel per layer."""
        nb = self.is_cuda
        dev_idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        row_idx = torch.as_tensor(list(rows), dtype=torch.long)
        n = len(block_ids)
        for layer in self.layers:
            cols = host[:, layer.offset : layer.offset + layer.nbytes]
            if to_host:
                gathered = layer.blocks.index_select(0, dev_idx)
                if nb:
                    gathered = gathered.to("cpu", non_blocking=False)
                cols[row_idx] = gathered.reshape(n, layer.nbytes)
            else:
                picked = cols[row_idx].view((n, *layer.blocks.shape[1:]))
                if nb:
                    picked = picked.pin_memory().to(self.device, non_blocking=True)
                layer.blocks.index_copy_(0, dev_idx, picked)

    def _indexed_copy(self, block_ids, host: torch.Tensor, first_row: int, to_host: bool) -> None:
        """Scattered device blocks ↔ one run of host rows, one index kernel per layer."""
        assert self._wide is not None
        n = len(block_ids)
        idx = torch.as_tensor(list(block_ids), dtype=torch.long)
        words = host[first_row : first_row + n].view(torch.int64)
        for layer, wide in zip(self.layers, self._wide, strict=True):
            cols = words[:, layer.offset // 8 : (layer.offset + layer.nbytes) // 8]
            if to_host:
                cols.copy_(wide.index_select(0, idx))
            else:
                wide.index_copy_(0, idx, cols)

    def block_bytes(self, block_id: int) -> bytes:
        """One block's bytes as stored in a host row (tests compare device blocks with this)."""
        parts = [
            layer.blocks[block_id].contiguous().cpu().numpy().tobytes() for layer in self.layers
        ]
        return b"".join(parts)


def _one_run(rows) -> bool:
    return all(b == a + 1 for a, b in pairwise(rows))


def _dense_pages(t: torch.Tensor) -> torch.Tensor | None:
    """`[num_blocks, page_bytes]` over the same memory when each block's bytes form one dense run
    (vLLM's CPU layout, and FlashAttention's default on CUDA whose heads/tokens are permuted only
    inside the page): copies then move raw pages, never transposing them."""
    sizes, strides = t.shape[1:], t.stride()[1:]
    numel = 1
    span = 1
    for size, stride in zip(sizes, strides, strict=True):
        numel *= size
        span += (size - 1) * stride
    if span != numel or any(st < 0 for st in strides):
        return None
    # with non-negative strides a page starts at its block's first byte
    return t.as_strided((t.shape[0], numel), (t.stride(0), 1), t.storage_offset())


def _block_dim(tensor: torch.Tensor, num_blocks: int, name: str) -> int:
    # CPU and most backends put blocks first; FlashAttention-style puts K/V (size 2) first
    for dim, size in enumerate(tensor.shape):
        if size == num_blocks:
            return dim
    raise ValueError(
        f"KV tensor {name} of shape {tuple(tensor.shape)} has no dimension of {num_blocks} blocks"
    )
