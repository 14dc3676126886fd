"""`dynkv doctor` through typer's CliRunner: exit codes, the human table on stderr, JSON on stdout.

NVML, the installed build and the vLLM import are pinned to a CPU host with a working connector,
so the outcome does not depend on the machine the suite runs on; everything else is real.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import socket

import pytest
from doctor_support import CPU_BUILD, base_env
from fakes.fake_nvml import FakeNvml
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.doctor import check_ids, check_vllm, runner, vllm_probe
from dynkv.doctor.vllm_probe import ProbeResult

runner_ = CliRunner()
SECRET = "hf_TopSecretTokenValue0987654321"


@pytest.fixture
def doctor_env(clean_env, tmp_path, monkeypatch):
    for key, value in base_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(runner, "PynvmlNvml", FakeNvml)  # a CPU host
    monkeypatch.setattr("dynkv.doctor.builds.detect_build", lambda: CPU_BUILD)
    monkeypatch.setattr(
        vllm_probe, "probe", lambda timeout=0: ProbeResult(True, 3.0, "0.32.0", connector_ok=True)
    )
    connector = tmp_path / "vllm_connector.py"
    connector.write_text("class DynkvConnector:\n    pass\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        check_vllm,
        "find_spec",
        lambda name, *a: (
            importlib.machinery.ModuleSpec(name, None, origin=str(connector))
            if name == vllm_probe.CONNECTOR_MODULE
            else real(name, *a)
        ),
    )
    return monkeypatch


def invoke(*args: str):
    return runner_.invoke(app, ["doctor", *args])


def test_only_warnings_exit_0_and_the_report_goes_to_stderr(doctor_env):
    result = invoke()
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    err = result.stderr
    assert "✓" in err and "!" in err and "✗" not in err
    assert "gpu.nvml" in err and "fix: " in err  # the no-GPU warning, with its fix under it
    assert "failure(s)" in err and "0 failure(s)" in err


def test_a_failure_exits_1_and_names_the_fix(doctor_env):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = invoke("--port", str(port))
    assert result.exit_code == 1
    assert "✗" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr
    assert "fix: kill" in result.stderr
    assert "would stop here" in result.stderr


def test_fix_lines_are_not_broken_for_copy_and_paste(doctor_env):
    doctor_env.setenv("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "true")
    result = invoke()
    fix_lines = [line for line in result.stderr.splitlines() if "fix: unset" in line]
    assert fix_lines and fix_lines[0].rstrip().endswith(
        "unset DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER"
    )


def test_json_shape(doctor_env):
    result = invoke("--json", "--topology", "disagg")
    assert result.exit_code in (0, 1)
    data = json.loads(result.stdout)
    assert list(data) == ["checks"]
    ids = [c["id"] for c in data["checks"]]
    assert len(ids) == len(set(ids)) and set(ids) <= set(check_ids())
    for check in data["checks"]:
        assert set(check) == {"id", "status", "detail", "fix"}
        assert check["status"] in ("ok", "warn", "fail")
        assert isinstance(check["detail"], str) and check["detail"]
        assert (check["fix"] is None) == (check["status"] == "ok")
    assert result.exit_code == (1 if any(c["status"] == "fail" for c in data["checks"]) else 0)
    assert "worker 1" in next(c for c in data["checks"] if c["id"] == "ports.workers")["detail"]


def test_json_exit_1_on_failure(doctor_env):
    result = invoke("--json", "--infra", "external", "--etcd-endpoints", "http://127.0.0.1:1")
    assert result.exit_code == 1
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["infra.etcd"]["status"] == "fail"


def test_hf_token_value_never_appears(doctor_env):
    doctor_env.setenv("HF_TOKEN", SECRET)
    for args in ((), ("--json",)):
        result = invoke("--model", "org/absent", *args)
        for text in (result.stdout, result.stderr):
            assert SECRET not in text and SECRET[:10] not in text and SECRET[-8:] not in text
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["model.hf_token"] == {
        "id": "model.hf_token",
        "status": "ok",
        "detail": "HF_TOKEN is set",
        "fix": None,
    }


def test_bad_settings_still_exit_2(doctor_env):
    doctor_env.setenv("DYN_KVBM_CPU_CACHE_GB", "abc")
    result = invoke()
    assert result.exit_code == 2 and "DYN_KVBM_CPU_CACHE_GB='abc'" in result.stderr


@pytest.mark.parametrize(
    "variable", ["HF_HOME", "XDG_CACHE_HOME", "DYNKV_MODEL", "DYN_KVBM_DISK_CACHE_DIR"]
)
def test_a_path_too_long_for_the_file_system_is_a_finding_not_a_crashed_check(
    doctor_env, tmp_path, variable
):
    # Python 3.11's Path.exists/is_dir/is_file raise ENAMETOOLONG instead of answering False
    doctor_env.setenv(variable, str(tmp_path / ("n" * 300)))
    result = invoke("--json")
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert [c for c in checks.values() if "crashed" in c["detail"]] == []
    if variable == "HF_HOME":  # the hub cache cannot exist there: said so
        hf = checks["model.hf_cache"]
        assert hf["status"] != "ok" and "longer than 255 bytes" in hf["detail"], hf
        assert hf["fix"].startswith("export HF_HOME=")


@pytest.mark.parametrize("variable", ["DYNKV_STATE_DIR", "XDG_STATE_HOME"])
@pytest.mark.parametrize("command", ["doctor", "status", "down", "logs"])
def test_a_state_dir_too_long_for_the_file_system_is_a_usage_error(
    doctor_env, tmp_path, variable, command
):
    doctor_env.delenv("DYNKV_STATE_DIR", raising=False)
    doctor_env.setenv(variable, str(tmp_path / ("s" * 300)))
    result = runner_.invoke(app, [command])
    assert result.exit_code == 2, result.output
    assert "DYNKV_STATE_DIR" in result.stderr and "255 bytes" in result.stderr
    assert "Traceback" not in result.output


def test_no_tier_is_a_failed_check_not_a_usage_error(doctor_env):
    doctor_env.setenv("DYN_KVBM_CPU_CACHE_GB", "0")
    doctor_env.setenv("DYN_KVBM_DISK_CACHE_GB", "0")
    result = invoke("--json")
    assert result.exit_code == 1
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["tiers.blocks"]["status"] == "fail"


def test_help_lists_doctor(clean_env):
    result = runner_.invoke(app, ["--help"])
    assert "doctor" in result.stdout
