"""`dynkv model create`: JSON and human output, and exit 2 with a cause and a fix on bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.model import PRESETS

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_cli_create_json(clean_env, tmp_path):
    out = tmp_path / "mine"
    result = invoke("model", "create", "mine", "--out", str(out), "--seed", "7", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == str(out) and data["preset"] == "tiny" and data["seed"] == 7
    assert data["params"] == PRESETS["tiny"].params
    assert data["kv_bytes_per_token"] == 2_048
    assert data["random_weights"] is True
    assert (out / "model.safetensors").is_file()


def test_cli_create_bench_json_reports_design_numbers(clean_env, tmp_path):
    result = invoke(
        "model", "create", "b", "--out", str(tmp_path / "b"), "--preset", "bench", "--json"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["params"], data["kv_bytes_per_token"]) == (75_909_888, 9_216)
    weights = tmp_path / "b" / "model.safetensors"
    with open(weights, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    assert weights.stat().st_size == 8 + header_len + 2 * 75_909_888


def test_cli_human_output_says_weights_are_random(clean_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("model", "create", "demo")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "weights are random" in result.stderr and "gibberish" in result.stderr
    assert (tmp_path / "demo" / "config.json").is_file()  # --out defaults to ./NAME


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "huge"], "unknown model preset 'huge'"),
        (["--seed", "-1"], "invalid seed"),
    ],
)
def test_cli_bad_input_exits_2(clean_env, tmp_path, args, needle):
    result = invoke("model", "create", "m", "--out", str(tmp_path / "m"), *args)
    assert result.exit_code == 2
    assert needle in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_cli_refuses_a_non_empty_out_without_force(clean_env, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("model", "create", "m", "--out", str(out))
    assert result.exit_code == 2
    assert "exists and is not empty" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    forced = invoke("model", "create", "m", "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.stderr
    assert not (out / "keep.txt").exists()


def test_cli_refuses_a_file_and_a_bad_name(clean_env, tmp_path):
    (tmp_path / "f").write_text("x")
    result = invoke("model", "create", "f", "--out", str(tmp_path / "f"))
    assert result.exit_code == 2 and "not a directory" in result.stderr
    result = invoke("model", "create", "bad/name", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "invalid model name" in result.stderr


def test_cli_model_help_lists_create(clean_env):
    result = invoke("model", "--help")
    assert result.exit_code == 0 and "create" in result.stdout
    assert "model" in invoke("--help").stdout
