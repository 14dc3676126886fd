"""The frontend in the plan and in `up`'s output: argv without secrets, the key in the
environment only (masked wherever printed), ports and their settings, the URL and the curl
`up` prints, and the preflight check of its bind address."""

from __future__ import annotations

import json
import shlex

import plan_support
import pytest
from doctor_support import plan_check
from plan_support import flag, vllm_part
from typer.testing import CliRunner

from dynkv.cli.display import curl_example, frontend_lines
from dynkv.cli.main import app
from dynkv.doctor import Status
from dynkv.plan import PlanError
from dynkv.plan.frontend import connect_host
from dynkv.plan.model import MASK
from dynkv.settings import SettingsError
from dynkv.supervisor.state import DeploymentState, ServiceRecord


def plan_for(env: dict[str, str] | None = None, **flags):
    return plan_support.plan_for(env, flags=flags, environ={"PYTHONPATH": "/wt"})


def test_frontend_service_runs_after_the_workers_on_loopback():
    fe = plan_for().service("frontend")
    assert fe.argv[:3] == ("/venv/bin/python", "-m", "dynkv.frontend")
    assert flag(fe.argv, "--host") == "127.0.0.1" and flag(fe.argv, "--port") == "8000"
    assert flag(fe.argv, "--deployment") == "default"
    assert "--etcd-endpoints" not in fe.argv  # by environment: a URL may carry a password
    assert fe.env["DYNKV_FRONTEND_ETCD_ENDPOINTS"] == "http://127.0.0.1:2379"
    assert flag(fe.argv, "--router") == "round_robin"
    assert flag(fe.argv, "--model") == "dynkv-tiny"  # 503, not 404, while no worker serves it
    assert fe.ports == {"http": 8000} and fe.depends_on == ("worker",)
    (probe,) = fe.probes
    assert probe.url == "http://127.0.0.1:8000/health" and dict(probe.expect_json) == {
        "status": "ok"
    }
    assert fe.env == {
        "PYTHONPATH": "/wt",
        "DYNKV_FRONTEND_ETCD_ENDPOINTS": "http://127.0.0.1:2379",
        "DYNKV_FRONTEND_NATS_URL": "nats://127.0.0.1:4222",  # the KV router's events
    }
    assert fe.env_unset == ("DYNKV_API_KEY",)
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


def test_the_kv_router_gets_nats_the_workers_tokenizer_and_its_settings():
    plan = plan_for()
    fe = plan.service("frontend")
    model = flag(vllm_part(plan.service("worker").argv), "--model")
    assert flag(fe.argv, "--tokenizer") == model  # it renders prompts as the workers do
    assert "--router-temperature" not in fe.argv and "--router-tier-weights" not in fe.argv
    plan = plan_for(
        {
            "DYNKV_ROUTER": "kv",
            "DYNKV_ROUTER_TEMPERATURE": "0.25",
            "DYNKV_ROUTER_TIER_WEIGHTS": "dynamo",
        }
    )
    fe = plan.service("frontend")
    assert flag(fe.argv, "--router") == "kv" and flag(fe.argv, "--router-temperature") == "0.25"
    assert flag(fe.argv, "--router-tier-weights") == "1,0.75,0.25"
    worker = plan.service("worker")
    assert "--enable-prompt-tokens-details" in worker.argv  # usage reports cached tokens
    with pytest.raises(SettingsError):
        plan_for({"DYNKV_ROUTER_TIER_WEIGHTS": "1,2"})


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
    fe = plan_for({"DYNKV_FRONTEND_HOST": "0.0.0.0", "DYNKV_API_KEY": "k"}).service("frontend")
    assert flag(fe.argv, "--host") == "0.0.0.0"
    assert fe.info.url == "http://127.0.0.1:8000" and fe.info.bind_host == "0.0.0.0"
    assert connect_host("::") == "[::1]" and connect_host("fe80::1") == "[fe80::1]"


def test_a_frontend_port_clash_names_its_setting():
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_FRONTEND_PORT": "8100"})
    assert "8100" in exc.value.cause and "DYNKV_FRONTEND_PORT" in exc.value.fix


def test_preflight_reports_an_address_that_cannot_be_bound():
    from dynkv.ports import free_port

    plan = plan_for(
        {
            "DYNKV_FRONTEND_HOST": "192.0.2.1",
            "DYNKV_FRONTEND_PORT": str(free_port()),
            "DYNKV_API_KEY": "k",  # a non-loopback frontend needs one
        }
    )
    result = plan_check("ports.frontend", plan)
    assert result.status is Status.FAIL and "192.0.2.1" in result.detail
    assert result.fix == "export DYNKV_FRONTEND_HOST=127.0.0.1"  # loopback, never 0.0.0.0


def test_an_unbindable_address_whose_port_is_taken_on_loopback_gets_a_free_loopback_port():
    import socket

    from dynkv.settings import resolve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = {"DYNKV_FRONTEND_HOST": "192.0.2.1", "DYNKV_FRONTEND_PORT": str(port)}
        result = plan_check("ports.frontend", None, resolved=resolve(env=env))  # `dynkv doctor`
    assert result.status is Status.FAIL and "0.0.0.0" not in result.fix
    assert result.fix.startswith("export DYNKV_FRONTEND_HOST=127.0.0.1 DYNKV_FRONTEND_PORT=")
    assert int(result.fix.rsplit("=", 1)[1]) > port


def test_preflight_names_the_frontend_port_setting():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        plan = plan_for({"DYNKV_FRONTEND_PORT": str(port)})
        result = plan_check("ports.frontend", plan)
    assert result.status is Status.FAIL
    assert f"frontend http port {port} is taken" in result.detail
    assert "DYNKV_FRONTEND_PORT=" in result.fix


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


def test_up_dry_run_keeps_the_etcd_password_off_every_argv(clean_env, tmp_path):
    """An external etcd URL with a password reaches the frontend and the worker wrappers by
    environment (private to the user), never argv (ps shows it to everyone): docs/security.md."""
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "state"))
    clean_env.setenv("DYNKV_NATS_URL", "nats://127.0.0.1:4222")
    url = "http://root:hunter2@127.0.0.1:2379"
    result = CliRunner().invoke(
        app,
        ["up", "--dry-run", "--json", "--device", "cpu", "--infra", "external",
         "--etcd-endpoints", url],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    services = {s["name"]: s for s in json.loads(result.stdout)["services"]}
    assert not [n for n, s in services.items() if "--etcd-endpoints" in s["argv"]]
    assert services["frontend"]["env"]["DYNKV_FRONTEND_ETCD_ENDPOINTS"] == (
        "http://root:***@127.0.0.1:2379"
    )
    assert services["worker"]["env"]["DYNKV_WORKER_ETCD_ENDPOINTS"] == (
        "http://root:***@127.0.0.1:2379"
    )
    plan = plan_for({"DYNKV_INFRA": "external", "DYNKV_ETCD_ENDPOINTS": url,
                     "DYNKV_NATS_URL": "nats://127.0.0.1:4222"})  # fmt: skip
    assert not [s.name for s in plan.services if "hunter2" in " ".join(s.argv)]


def test_frontend_reads_its_etcd_endpoints_where_the_plan_puts_them():
    from dynkv.frontend.config import ENV_PREFIX, parse_args
    from dynkv.plan.frontend import ETCD_ENDPOINTS_ENV

    assert ETCD_ENDPOINTS_ENV == ENV_PREFIX + "ETCD_ENDPOINTS"
    config = parse_args([], {ETCD_ENDPOINTS_ENV: "http://u:p@127.0.0.1:1"})
    assert config.etcd_endpoints == ("http://u:p@127.0.0.1:1",)


def test_up_router_flag(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "state"))
    result = CliRunner().invoke(
        app, ["up", "--dry-run", "--json", "--device", "cpu", "--router", "least_outstanding"]
    )
    assert result.exit_code == 0, result.output
    argv = json.loads(result.stdout)["services"][-1]["argv"]
    assert flag(argv, "--router") == "least_outstanding"


# ---- exposure (docs/security.md) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {"DYNKV_FRONTEND_HOST": "0.0.0.0"},
        {"DYNKV_FRONTEND_HOST": "192.168.1.5"},
        {"DYN_KVBM_METRICS_HOST": "0.0.0.0"},
        {"DYN_KVBM_METRICS_HOST": "0.0.0.0", "DYNKV_API_KEY": "k"},  # metrics have no key
    ],
)
def test_a_network_bind_without_a_key_is_refused_before_anything_starts(env):
    with pytest.raises(SettingsError) as exc:
        plan_for(env)
    assert "not loopback" in exc.value.cause and "--insecure" in exc.value.fix


def test_insecure_or_a_key_allows_a_network_bind():
    fe = plan_for({"DYNKV_FRONTEND_HOST": "0.0.0.0", "DYNKV_INSECURE": "true"}).service("frontend")
    assert "--insecure" in fe.argv
    fe = plan_for({"DYNKV_FRONTEND_HOST": "0.0.0.0", "DYNKV_API_KEY": "k"}).service("frontend")
    assert "--insecure" not in fe.argv


def test_the_api_key_file_is_read_into_the_environment_never_argv(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-from-file\n")
    plan = plan_for({"DYNKV_API_KEY_FILE": str(key), "DYNKV_FRONTEND_HOST": "0.0.0.0"})
    fe = plan.service("frontend")
    assert fe.env["DYNKV_API_KEY"] == "sk-from-file" and "sk-from-file" not in fe.argv
    assert "sk-from-file" not in json.dumps(plan.to_json())
    with pytest.raises(SettingsError) as exc:
        plan_for({"DYNKV_API_KEY_FILE": str(tmp_path / "missing")})
    assert "cannot read the API key file" in exc.value.cause


def test_tls_reaches_the_frontend_and_its_urls(tmp_path):
    plan = plan_for({"DYNKV_TLS_CERT": "/c.pem", "DYNKV_TLS_KEY": "/k.pem"})
    fe = plan.service("frontend")
    assert flag(fe.argv, "--tls-cert") == "/c.pem" and flag(fe.argv, "--tls-key") == "/k.pem"
    assert fe.info.openai_url == "https://127.0.0.1:8000/v1"
    assert fe.probes[0].kind == "tcp"
    with pytest.raises(SettingsError):
        plan_for({"DYNKV_TLS_CERT": "/c.pem"})


def test_the_deployment_secret_reaches_workers_and_frontend_masked():
    plan = plan_support.plan_for(None, flags={}, environ={}, secret="f" * 64)
    fe, worker = plan.service("frontend"), plan.service("worker")
    assert fe.env["DYNKV_DEPLOYMENT_SECRET"] == worker.env["DYNKV_DEPLOYMENT_SECRET"] == "f" * 64
    assert "f" * 64 not in json.dumps(plan.to_json())
    assert list(fe.files) == [f"{plan.deployment_dir}/deployment.secret"]
    assert all("f" * 64 not in arg for s in plan.services for arg in s.argv)
