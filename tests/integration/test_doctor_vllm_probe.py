"""The real import probe: vLLM imported in a child process, timed, with the connector looked up
the way vLLM will (by module path)."""

from __future__ import annotations

import importlib.util

import pytest

from dynkv.doctor import vllm_probe

pytestmark = pytest.mark.integration


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_probe_imports_vllm_in_a_child_and_reports_the_connector():
    result = vllm_probe.probe()
    assert result.vllm_ok, result.vllm_error
    assert result.vllm_version and result.vllm_version.startswith("0.")
    assert result.vllm_seconds is not None and result.vllm_seconds > 0
    if importlib.util.find_spec(vllm_probe.CONNECTOR_MODULE) is None:
        assert not result.connector_ok
        assert "vllm_connector" in (result.connector_error or "")
    else:
        assert result.connector_ok, result.connector_error
