"""`dynkv join` and `dynkv join-token` refusals, and `join --dry-run` (nothing contacted, nothing
written): exit 2 with a one-line cause and a one-line fix."""

from __future__ import annotations

import json

from join_support import first_host_dir, make
from typer.testing import CliRunner

from dynkv.cli.main import app

runner = CliRunner()


def test_join_dry_run_prints_the_nodes_plan(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "b"))
    _, token = make(first_host_dir(tmp_path / "a"), now=None)
    args = ["join", token, "--advertise", "127.0.0.2", "--node", "gpu-1", "--dry-run", "--json"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [s["name"] for s in plan["services"]] == ["worker"]
    assert plan["joined"]["node"] == "gpu-1" and plan["infra"] == "joined"
    assert plan["services"][0]["meta"]["worker_id"] == "gpu-1-agg-0"
    assert "s" * 64 not in result.stdout and "n" * 32 not in result.stdout
    assert not (tmp_path / "b").exists()  # a dry run writes nothing


def test_join_refusals(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "b"))
    _, token = make(first_host_dir(tmp_path / "a"), now=None)
    cases = [
        (["join", "nonsense", "--advertise", "127.0.0.2"], "not a dynkv join token"),
        (["join", token], "--advertise"),
        (["join", token, "--advertise", "0.0.0.0"], "advertise"),
        (["join", token, "--advertise", "127.0.0.2", "--node", "Bad_Name"], "node name"),
    ]
    for args, words in cases:
        result = runner.invoke(app, [*args, "--dry-run", "--device", "cpu"])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and "fix:" in result.output, result.output
        assert result.stdout == ""


def test_join_token_needs_a_running_deployment_and_a_valid_ttl(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path))
    result = runner.invoke(app, ["join-token"])
    assert result.exit_code == 2 and "no deployment named 'default'" in result.output
    assert "--advertise" in result.output and result.stdout == ""
    result = runner.invoke(app, ["join-token", "--ttl", "forever"])
    assert result.exit_code == 2 and "--ttl" in result.output
