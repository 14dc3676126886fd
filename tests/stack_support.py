"""Real stacks for the end-to-end tests: `dynkv up -d` of the generated tiny model on the CPU,
under a deployment name, state dir and ports of the test's own, so that stacks of different test
modules (and whatever the user runs) never meet; the model cache is the session's (e2e_cache)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dynkv.private_deployment import dynkv_cli as dynkv
from dynkv.private_deployment import fresh_ports, without_settings
from dynkv.supervisor import processes_left

__all__ = ["assert_nothing_left", "counter", "dynkv", "stack_env"]


def stack_env(
    tmp: Path, name: str, *, cache: Path, workers: int = 2, **settings: str
) -> dict[str, str]:
    """The environment of `dynkv up` for a private CPU stack: none of the caller's settings,
    state under `tmp`, fresh ports (room for `workers` workers), the tiny model and vLLM's cached
    facts in `cache` (the session's e2e_cache, shared by the stacks), then `settings` (which win)."""
    return (
        without_settings(os.environ)
        | {
            "XDG_CACHE_HOME": str(cache),
            "DYNKV_STATE_DIR": str(tmp / "state"),
            "DYNKV_NAME": name,
            "DYNKV_DEVICE": "cpu",
            "DYNKV_MODEL": "dynkv-tiny",  # fast; tests/e2e/test_real_model.py covers the real one
            "DYNKV_MAX_MODEL_LEN": "2048",
            "DYNKV_STARTUP_TIMEOUT_SECS": "300",
        }
        | fresh_ports(workers)
        | settings
    )


def assert_nothing_left(services, deployment_dir: Path) -> None:
    """After `dynkv down`: no recorded pid, no member of their groups, no marked process."""
    left = processes_left(services, deployment_dir)
    assert left == [], left


def counter(urls: str | Iterable[str], name: str, **labels: str) -> float:
    """The sample `name` (with these label values, if given) read from one metrics URL, or
    summed over several (every decode worker of a disagg stack)."""
    total = 0.0
    for url in [urls] if isinstance(urls, str) else urls:
        for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
    return total
