"""`DYNKV_KVBM=false` / `up --no-kvbm`: plain vLLM workers (the no-offload baseline of a
comparison), as data: no connector, no KVBM metrics port, no tier required."""

from __future__ import annotations

import json

import pytest
from plan_support import flag, plan_for, vllm_part
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.doctor.check_tiers import blocks
from dynkv.doctor.context import DoctorContext
from dynkv.plan import PlanError
from dynkv.settings import SettingsError, resolve

NO_TIERS = {"DYNKV_PROFILE": "gpu-cpu", "DYN_KVBM_CPU_CACHE_GB": "0"}


def test_no_kvbm_worker_runs_plain_vllm_without_metrics():
    plan = plan_for({"DYNKV_KVBM": "false", "DYNKV_DEVICE_KV_GB": "0.05"})
    worker = plan.service("worker")
    vllm = vllm_part(worker.argv)
    assert "--kv-transfer-config" not in vllm
    assert flag(vllm, "--kv-cache-memory-bytes") == "50000000"  # G1 sized as with KVBM
    assert "--metrics-url" not in worker.argv
    assert worker.ports == {"http": 8100}
    assert worker.info.metrics_url is None
    assert not [k for k in worker.env if k.startswith("DYN_KVBM_")]
    # the same CPU pinning as with a connector (else the comparison lies)
    assert worker.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert worker.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_kvbm_on_is_the_default_and_keeps_the_connector():
    worker = plan_for().service("worker")
    assert "--kv-transfer-config" in vllm_part(worker.argv)
    assert worker.ports["kvbm_metrics"] == 6880


def test_no_tier_is_fine_without_kvbm_and_an_error_with_it():
    with pytest.raises(SettingsError, match="no KVBM tier"):
        resolve(env=NO_TIERS)
    resolved = resolve(env={**NO_TIERS, "DYNKV_KVBM": "false"})
    assert resolved.deployment.kvbm is False
    assert resolved.settings["DYNKV_KVBM"].source == "env"


def test_disagg_needs_the_connector():
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_KVBM": "false", "DYNKV_TOPOLOGY": "disagg"})
    assert "KVBM" in exc.value.cause and "--topology agg" in exc.value.fix


def test_doctor_sees_no_tiers_without_kvbm():
    resolved = resolve(env={"DYNKV_KVBM": "false", "DYNKV_DEVICE": "cpu"})
    ctx = DoctorContext(resolved=resolved, import_vllm=False)
    assert not (ctx.kvbm.has_host_tier or ctx.kvbm.has_disk_tier or ctx.kvbm.metrics)
    outcome = blocks(ctx)
    assert outcome.status.value == "ok" and "no KVBM connector" in outcome.detail


def test_up_no_kvbm_flag_in_the_dry_run(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(
        app, ["up", "--dry-run", "--json", "--device", "cpu", "--no-kvbm", "-p", "gpu-cpu"]
    )
    assert result.exit_code == 0, result.output
    worker = json.loads(result.stdout)["services"][2]
    assert "--kv-transfer-config" not in worker["argv"]
    assert worker["ports"] == {"http": 8100}
