"""The CLI shell: help, version, completion, JSON shapes, exit codes for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynkv import __version__
from dynkv.cli.main import app

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def test_help_lists_commands(clean_env):
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("config", "profiles"):
        assert command in result.stdout


def test_version(clean_env):
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"dynkv {__version__}"


def test_shell_completion_is_offered(clean_env):
    result = invoke("--show-completion", "bash")
    assert result.exit_code == 0 and "dynkv" in result.stdout


def test_config_json_shape(clean_env):
    clean_env.setenv("DYN_KVBM_CPU_CACHE_GB", "2")
    result = invoke("config", "--profile", "gpu-cpu-disk", "--topology", "disagg", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["profile"] == "gpu-cpu-disk"
    assert data["settings"]["DYN_KVBM_CPU_CACHE_GB"] == {"value": 2.0, "source": "env"}
    assert data["settings"]["DYN_KVBM_DISK_CACHE_GB"] == {"value": 8.0, "source": "profile"}
    assert data["settings"]["DYNKV_TOPOLOGY"] == {"value": "disagg", "source": "flag"}
    assert data["settings"]["DYNKV_FRONTEND_PORT"] == {"value": 8000, "source": "default"}
    assert data["worker_env"]["DYN_KVBM_CPU_CACHE_GB"] == "2"
    assert data["worker_env"]["DYN_KVBM_DISK_CACHE_GB"] == "8"


def test_config_human_output_goes_to_stderr(clean_env):
    result = invoke("config")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "DYN_KVBM_CPU_CACHE_GB" in result.stderr


def test_profiles_json(clean_env):
    result = invoke("profiles", "--json")
    assert result.exit_code == 0
    rows = {p["name"]: p for p in json.loads(result.stdout)["profiles"]}
    assert rows["gpu-cpu-disk"]["tiers"] == ["G1", "G2", "G3"]
    assert rows["gpu-disk"]["experimental"] is True
    assert rows["gpu-cpu"]["cpu_cache_gb"] == 4


def test_unknown_variable_warns_on_stderr(clean_env):
    clean_env.setenv("DYN_KVBM_CPU_CACHE_G", "1")
    result = invoke("config")
    assert result.exit_code == 0
    assert "did you mean DYN_KVBM_CPU_CACHE_GB?" in result.stderr


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["config", "--profile", "nope"], {}, "available: gpu-cpu, gpu-cpu-disk, gpu-disk"),
        (["config"], {"DYN_KVBM_CPU_CACHE_GB": "abc"}, "DYN_KVBM_CPU_CACHE_GB='abc'"),
        (["config"], {"DYN_KVBM_CPU_CACHE_GB": "-1"}, "DYN_KVBM_CPU_CACHE_GB='-1'"),
        (["config", "--profile", "gpu-disk"], {"DYN_KVBM_DISK_CACHE_GB": "0"}, "no KVBM tier"),
        (["config", "--topology", "mesh"], {}, "mesh"),
    ],
)
def test_bad_input_exits_2_with_a_cause_and_a_fix(clean_env, args, env, needle):
    for key, value in env.items():
        clean_env.setenv(key, value)
    result = invoke(*args)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    if needle != "mesh":  # typer's own usage errors have their own layout
        assert "fix:" in result.stderr


@pytest.mark.parametrize(
    "body, needle",
    [
        ("[kvbm\n", "not valid TOML"),
        ("[kvbm]\ncpu_cache_gbs = 1\n", "unknown key 'cpu_cache_gbs'"),
        ('[kvbm]\ncpu_cache_gb = "x"\n', "[kvbm] cpu_cache_gb"),
    ],
)
def test_bad_profile_files_exit_2(clean_env, tmp_path, body, needle):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    result = invoke("config", "--profile", str(path))
    assert result.exit_code == 2 and needle in result.stderr


def _console_script() -> str:
    script = Path(sys.executable).parent / "dynkv"
    return str(script) if script.exists() else (shutil.which("dynkv") or "dynkv")


def test_installed_console_script_exit_codes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_KVBM_", "DYNKV_"))}
    env.update(XDG_STATE_HOME=str(tmp_path), DYN_KVBM_CPU_CACHE_GB="abc", NO_COLOR="1")
    proc = subprocess.run(
        [_console_script(), "config"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: DYN_KVBM_CPU_CACHE_GB='abc' is invalid")
    assert lines[1].strip().startswith("fix: export DYN_KVBM_CPU_CACHE_GB=")
    ok = subprocess.run(
        [_console_script(), "--version"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and ok.stdout.startswith("dynkv ")


def test_every_settings_flag_gives_a_setting_and_reaches_it(clean_env):
    """The commands hand their flags to `resolve_from_options` through one table
    (dynkv.cli.options): each entry names a real setting, and a flag's value arrives there."""
    from dynkv.cli.options import (
        DEPLOYMENT_FLAGS,
        KVBM_FLAGS,
        SETTINGS_OPTIONS,
        resolve_from_options,
        settings_options,
    )
    from dynkv.kvbm.config import KvbmSettings
    from dynkv.settings.deployment import DeploymentSettings

    assert set(DEPLOYMENT_FLAGS.values()) <= DeploymentSettings.model_fields.keys()
    assert set(KVBM_FLAGS.values()) <= KvbmSettings.model_fields.keys()
    assert SETTINGS_OPTIONS.keys() == {"profile", "engine_args", *KVBM_FLAGS, *DEPLOYMENT_FLAGS}

    @settings_options("port", "cpu_cache_gb")
    def command(flags, json_out=False, detach=False):
        assert json_out is True and detach is False
        return resolve_from_options(**flags, quiet=True)

    resolved = command(port=9001, cpu_cache_gb=2.0, json_out=True, detach=False)
    assert resolved.deployment.frontend_port == 9001 and resolved.kvbm.cpu_cache_gb == 2.0
    with pytest.raises(TypeError, match="not a settings flag: detach"):
        resolve_from_options(detach=True)


def test_settings_options_stand_where_the_command_puts_them():
    """`@settings_options` builds the signature typer reads: the shared options where `flags`
    stands, a command's own parameter where the list names it, the others around them."""
    import typer

    commands = typer.main.get_command(app).commands
    up = [p.name for p in commands["up"].params]
    assert up[:9] == [
        "profile",
        "topology",
        "workers",
        "prefill_workers",
        "decode_workers",
        "gpus",
        "model",
        "served_model_name",
        "name",
    ]
    export = [p.name for p in commands["export"].params]
    assert export[:2] == ["target", "profile"] and export.index("engine_args") < export.index(
        "output"
    )
    join = {p.name: p for p in commands["join"].params}
    assert list(join)[:4] == ["token", "advertise", "node", "profile"]
    assert "name" not in join and "(required)" in join["advertise"].help  # join's own --advertise
