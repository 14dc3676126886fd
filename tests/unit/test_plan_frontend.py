"""The frontend in the plan and in `up`'s output: argv without secrets, the key in the
environment only (masked wherever printed), ports and their settings, the URL and the curl
`up` prints, and the preflight check of its bind address."""

from __future__ import annotations

import json
import shlex

import plan_support
import pytest
from plan_support import flag
from typer.testing import CliRunner

from dynkv.cli.display import curl_example, frontend_lines
from dynkv.cli.main import app
from dynkv.plan import PlanError
from dynkv.plan.frontend import connect_host
from dynkv.plan.model import MASK
from dynkv.preflight import check_ports
from dynkv.supervisor.state import DeploymentState, ServiceRecord


def plan_for(env: dict[str, str] | None = None, **flags):
    return plan_support.plan_for(env, flags=flags, environ={"PYTHONPATH": "/wt"})


def test_frontend_service_runs_after_the_workers_on_loopback():
    fe = plan_for().service("frontend")
    assert fe.argv[:3] == ("/venv/bin/python", "-m", "dynkv.frontend")
    assert flag(fe.argv, "--host") == "127.0.0.1" and flag(fe.argv, "--port") == "8000"
    assert flag(fe.argv, "--deployment") == "default"
    assert flag(fe.argv, "--etcd-endpoints") == "http://127.0.0.1:2379"
    assert flag(fe.argv, "--router") == "round_robin"
    assert flag(fe.argv, "--model") == "dynkv-tiny"  # 503, not 404, while no worker serves it
    assert fe.ports == {"http": 8000} and fe.depends_on == ("worker",)
    (probe,) = fe.probes
    assert probe.url == "http://127.0.0.1:8000/health" and dict(probe.expect_json) == {
        "status": "ok"
    }
    assert fe.env == {"PYTHONPATH": "/wt"} and fe.env_unset == ("DYNKV_API_KEY",)
    assert fe.log_file == "/state/default/logs/frontend.log"
    assert fe.info.openai_url == "http://127.0.0.1:8000/v1" and fe.info.auth == "none"


def test_settings_reach_the_frontend():
    plan = plan_for(
        {"DYNKV_FRONTEND_PORT": "9000", "DYNKV_ROUTER": "least_outstanding", "DYNKV_NAME": "p"}
    )
    fe = plan.service("frontend")
    assert flag(fe.argv, "--port") == "9000" and flag(fe.argv, "--router") == "least_outstanding"
    assert flag(fe.argv, "--deployment") == "p"
    assert any("http://127.0.0.1:9000/v1" in note for note in plan.notes)


def test_the_api_key_travels_in_the_environment_only():
    plan = plan_for(api_key="sk-flag-secret")
    fe = plan.service("frontend")
    assert "sk-flag-secret" not in " ".join(fe.argv)
    assert fe.env["DYNKV_API_KEY"] == "sk-flag-secret" and fe.env_unset == ()
    assert fe.info.auth == "bearer"
    assert "sk-flag-secret" not in json.dumps(plan.to_json())
    assert plan.to_json()["services"][-1]["env"]["DYNKV_API_KEY"] == MASK
    assert "DYNKV_API_KEY" in plan.service("worker").env_unset


def test_a_wildcard_bind_is_reached_on_loopback():
    fe = plan_for({"DYNKV_FRONTEND_HOST": "0.0.0.0"}).service("frontend")
    assert flag(fe.argv, "--host") == "0.0.0.0"
    assert fe.info.url == "http://127.0.0.1:8000" and fe.info.bind_host == "0.0.0.0"
    assert connect_host("::") == "[::1]" and connect_host("fe80::1") == "[fe80::1]"


def test_a_frontend_port_clash_names_its_setting():
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_FRONTEND_PORT": "8100"})
    assert "8100" in exc.value.cause and "DYNKV_FRONTEND_PORT" in exc.value.fix


def test_preflight_reports_an_address_that_cannot_be_bound():
    from dynkv.ports import free_port

    plan = plan_for({"DYNKV_FRONTEND_HOST": "192.0.2.1", "DYNKV_FRONTEND_PORT": str(free_port())})
    problems = [p for p in check_ports(plan) if "frontend" in p.cause]
    assert problems and "192.0.2.1" in problems[0].cause
    assert "DYNKV_FRONTEND_HOST" in problems[0].fix


def test_preflight_names_the_frontend_port_setting():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        plan = plan_for({"DYNKV_FRONTEND_PORT": str(port)})
        (problem,) = [p for p in check_ports(plan) if "frontend" in p.cause]
    assert f"port {port} (frontend http)" in problem.cause
    assert "DYNKV_FRONTEND_PORT" in problem.fix


def test_curl_example_pastes_into_a_shell():
    line = curl_example("http://127.0.0.1:8000/v1", "org/it's-a-model", bearer=True)
    argv = shlex.split(line)
    assert argv[:3] == ["curl", "-s", "http://127.0.0.1:8000/v1/chat/completions"]
    assert "Authorization: Bearer $DYNKV_API_KEY" in argv
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["model"] == "org/it's-a-model" and body["messages"][0]["role"] == "user"
    assert "Authorization" not in curl_example("http://h/v1", "m", bearer=False)


def test_frontend_lines_after_up():
    rec = ServiceRecord(
        name="frontend",
        role="frontend",
        meta={"openai_url": "http://127.0.0.1:8000/v1", "model": "dynkv-tiny", "auth": "bearer"},
    )
    state = DeploymentState(name="d", instance="i", infra="embedded", services=[rec])
    text = "\n".join(frontend_lines(state))
    assert "OpenAI API: http://127.0.0.1:8000/v1" in text and "curl -s" in text
    assert "export DYNKV_API_KEY" in text


def test_up_dry_run_masks_the_api_key_flag(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "state"))
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(
            app,
            ["up", "--dry-run", "--device", "cpu", "--api-key", "sk-never-shown", *extra],
        )
        assert result.exit_code == 0, result.output
        assert "sk-never-shown" not in result.output
    data = json.loads(result.stdout)
    fe = data["services"][-1]
    assert fe["name"] == "frontend" and fe["env"]["DYNKV_API_KEY"] == MASK


def test_up_router_flag(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "state"))
    result = CliRunner().invoke(
        app, ["up", "--dry-run", "--json", "--device", "cpu", "--router", "least_outstanding"]
    )
    assert result.exit_code == 0, result.output
    argv = json.loads(result.stdout)["services"][-1]["argv"]
    assert flag(argv, "--router") == "least_outstanding"
