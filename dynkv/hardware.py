"""What accelerator this host has, in the one place the plan and doctor both ask.

NVML (from nvidia-ml-py, `import pynvml`) is the source of truth; a missing library or driver means
no NVIDIA GPU. `dynkv.doctor` wraps NVML behind an interface of its own to validate versions.
"""

from __future__ import annotations

import contextlib


def nvidia_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # library absent, driver absent, or no device: all mean "no NVIDIA GPU"
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def resolve_device(requested: str) -> str:
    """`auto` → `cuda` when an NVIDIA GPU is visible, else `cpu`; explicit values pass through."""
    if requested != "auto":
        return requested
    return "cuda" if nvidia_gpu_count() > 0 else "cpu"
