"""Fixtures shared by the end-to-end modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def e2e_cache(tmp_path_factory) -> Path:
    """One `$XDG_CACHE_HOME` for every stack of the session. The first `up` generates the tiny
    model and caches vLLM's parsed options and the doctor's vLLM probe there; each later stack
    reuses them instead of paying ~20 s for them again on this 2-core box. Default G3 pools stay
    apart: their directories are named after the deployment, and each module has its own name."""
    return tmp_path_factory.mktemp("e2e-cache")
