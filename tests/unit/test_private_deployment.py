"""The private deployments of bench --compare, scripts/smoke, scripts/load and the e2e tests:
every port a deployment can listen on is given a free one, and no caller setting leaks in."""

from __future__ import annotations

from dynkv.kvbm.config import KvbmSettings
from dynkv.ports import port_is_free
from dynkv.private_deployment import (
    PER_WORKER_PORTS,
    dynkv_cli,
    fresh_ports,
    without_settings,
)
from dynkv.settings.deployment import DeploymentSettings


def test_every_port_setting_gets_a_free_port():
    settings = {
        f"DYNKV_{f.upper()}" for f in DeploymentSettings.model_fields if f.endswith("_port")
    }
    settings |= {f"DYN_KVBM_{f.upper()}" for f in KvbmSettings.model_fields if f.endswith("_port")}
    ports = fresh_ports()
    assert set(ports) == settings
    assert len(set(ports.values())) == len(ports)
    assert all(port_is_free(int(p)) for p in ports.values())


def test_per_worker_ports_leave_room_for_a_second_worker():
    for _ in range(5):
        ports = fresh_ports(workers=2)
        for var in PER_WORKER_PORTS:
            assert port_is_free(int(ports[var]) + 1)


def test_without_settings_drops_dynkv_and_kvbm_variables_in_any_case():
    environ = {"DYNKV_NAME": "x", "dyn_kvbm_cpu_cache_gb": "1", "DYN_KVBM_X": "1", "PATH": "/bin"}
    assert without_settings(environ) == {"PATH": "/bin"}


def test_dynkv_cli_runs_the_cli_with_this_interpreter_and_only_the_given_env(tmp_path):
    result = dynkv_cli("profiles", "--json", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert '"gpu-cpu-disk"' in result.stdout


def test_a_run_of_ports_never_reaches_past_65535(monkeypatch):
    """free_port may pick 65535 (above the ephemeral range); a run of two cannot start there."""
    import dynkv.private_deployment as pd
    from dynkv.ports import free_port

    picks = iter([65535, 65534])
    monkeypatch.setattr(pd, "free_port", lambda: next(picks, None) or free_port())
    base = pd.free_port_run(2)
    assert base + 1 <= 65535
    assert not port_is_free(65536) and not port_is_free(0)
