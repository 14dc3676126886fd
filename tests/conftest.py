"""Shared fixtures: a clean environment for settings, and isolated state/cache dirs."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Property tests check behaviour, not speed: a loaded 2-core CI box must not fail an example for
# taking longer than hypothesis's default 200 ms deadline, or a slow data generation.
settings.register_profile(
    "dynkv", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("dynkv")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No DYN_KVBM_*/DYNKV_* leaking in from the developer's shell; private XDG dirs."""
    for key in list(os.environ):
        if key.upper().startswith(("DYN_KVBM_", "DYNKV_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return monkeypatch


@pytest.fixture(autouse=True)
def private_probe_cache(monkeypatch, tmp_path):
    """In-process doctor runs keep their vLLM import probe to the test: tests that fake a probe
    result must not read a success another test (or the developer's `up`) kept. Processes the
    e2e tests start (`dynkv up`) share the session's cache (tests/e2e/conftest.py: e2e_cache),
    which spares each later stack a vLLM import."""
    from dynkv.doctor import probe_cache

    monkeypatch.setattr(probe_cache, "cache_path", lambda: tmp_path / "vllm-probe.json")
