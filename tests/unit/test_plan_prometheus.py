"""`up --observability`: Prometheus as one more planned service, as data (argv, ports, loopback,
the generated config), its two backends (binary, docker image), the preflight that stops `up`
when it has neither, and the supervisor writing the generated files privately."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import plan_support
import pytest
import yaml
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.doctor.check_plan import observability
from dynkv.doctor.result import Status
from dynkv.infra.docker import DockerUnavailable
from dynkv.plan import HostFacts, build_plan
from dynkv.plan.model import MASK
from dynkv.plan.prometheus import PROMETHEUS_IMAGE
from dynkv.settings import resolve
from dynkv.supervisor.process import prepare

PROM = "/usr/bin/prometheus"


def host(prometheus: str | None = PROM) -> HostFacts:
    return plan_support.host(prometheus_binary=prometheus, user="1000:1000")


def plan_for(env: dict[str, str] | None = None, prometheus: str | None = PROM):
    base = {"DYNKV_STATE_DIR": "/state", "DYNKV_OBSERVABILITY": "true"}
    return build_plan(resolve(env={**base, **(env or {})}), host(prometheus))


def flags(argv) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))


def config_of(svc) -> dict:
    return yaml.safe_load(svc.files[svc.info.config])


def test_off_by_default():
    plan = build_plan(resolve(env={"DYNKV_STATE_DIR": "/state"}), host())
    assert "prometheus" not in [s.name for s in plan.services]


def test_prometheus_runs_last_on_loopback_with_its_data_under_the_state_dir():
    plan = plan_for({"DYNKV_NAME": "obs"})
    assert [s.name for s in plan.services][-2:] == ["frontend", "prometheus"]
    prom = plan.service("prometheus")
    assert prom.kind == "process" and prom.argv[0] == PROM
    assert flags(prom.argv) == {
        "config.file": "/state/obs/prometheus/prometheus.yml",
        "storage.tsdb.path": "/state/obs/prometheus/data",
        "web.listen-address": "127.0.0.1:9090",
    }
    assert prom.ports == {"http": 9090}
    assert [(p.kind, p.url) for p in prom.probes] == [("http", "http://127.0.0.1:9090/-/ready")]
    assert prom.depends_on == ("frontend",)
    assert prom.data_dirs == ("/state/obs/prometheus",)  # created 0700, removed by down
    assert prom.log_file == "/state/obs/logs/prometheus.log"
    assert prom.info.prometheus_url == "http://127.0.0.1:9090"


def test_port_setting_and_its_clash_check():
    prom = plan_for({"DYNKV_PROMETHEUS_PORT": "19090"}).service("prometheus")
    assert flags(prom.argv)["web.listen-address"] == "127.0.0.1:19090"
    assert prom.ports == {"http": 19090}
    with pytest.raises(Exception, match="DYNKV_PROMETHEUS_PORT"):
        plan_for({"DYNKV_PROMETHEUS_PORT": "8000"})  # the frontend's


def test_config_scrapes_the_frontend_and_every_worker():
    plan = plan_for(
        {
            "DYNKV_TOPOLOGY": "disagg",
            "DYNKV_FRONTEND_PORT": "18000",
            "DYNKV_WORKER_PORT": "18100",
            "DYN_KVBM_METRICS_PORT": "16880",
        }
    )
    config = config_of(plan.service("prometheus"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"dynkv-frontend", "kvbm", "vllm"}
    assert jobs["dynkv-frontend"]["static_configs"] == [{"targets": ["127.0.0.1:18000"]}]
    assert "authorization" not in jobs["dynkv-frontend"]
    assert jobs["kvbm"]["static_configs"] == [
        {"targets": ["127.0.0.1:16880"], "labels": {"worker": "prefill-0"}},
        {"targets": ["127.0.0.1:16881"], "labels": {"worker": "decode-0"}},
    ]
    assert [c["targets"] for c in jobs["vllm"]["static_configs"]] == [
        ["127.0.0.1:18100"],
        ["127.0.0.1:18101"],
    ]
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())


def test_a_frontend_on_all_interfaces_is_scraped_on_loopback():
    prom = plan_for({"DYNKV_FRONTEND_HOST": "0.0.0.0", "DYNKV_INSECURE": "true"}).service(
        "prometheus"
    )
    jobs = {j["job_name"]: j for j in config_of(prom)["scrape_configs"]}
    assert jobs["dynkv-frontend"]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]


def test_workers_without_kvbm_are_scraped_by_vllm_only():
    prom = plan_for({"DYNKV_KVBM": "false"}).service("prometheus")
    jobs = {j["job_name"] for j in config_of(prom)["scrape_configs"]}
    assert jobs == {"dynkv-frontend", "vllm"}


def test_the_api_key_reaches_prometheus_through_a_private_file_never_the_config():
    plan = plan_for({"DYNKV_API_KEY": "sk-obs-secret", "DYNKV_NAME": "k"})
    prom = plan.service("prometheus")
    key_file = "/state/k/prometheus/frontend_api_key"
    assert prom.files[key_file] == "sk-obs-secret"
    frontend_job = config_of(prom)["scrape_configs"][0]
    assert frontend_job["authorization"] == {"type": "Bearer", "credentials_file": key_file}
    assert "sk-obs-secret" not in prom.files[prom.info.config]
    assert "sk-obs-secret" not in " ".join(prom.argv)
    shown = json.dumps(plan.to_json())
    assert "sk-obs-secret" not in shown
    assert plan.to_json()["services"][-1]["files"][key_file] == MASK


def test_without_a_binary_the_docker_image_takes_the_same_flags():
    binary = plan_for({"DYNKV_NAME": "d"}).service("prometheus")
    prom = plan_for({"DYNKV_NAME": "d"}, prometheus=None).service("prometheus")
    assert prom.kind == "container" and prom.argv == ()
    c = prom.container
    assert c.image == PROMETHEUS_IMAGE
    assert c.command == binary.argv[1:]
    # host network: it scrapes the loopback-only services and binds 127.0.0.1 itself
    assert c.network_mode == "host" and dict(c.ports) == {}
    assert dict(c.volumes) == {"/state/d/prometheus": "/state/d/prometheus"}
    assert c.user == "1000:1000"  # reads the 0700 deployment dir
    assert c.labels == {"dynkv.deployment": "d", "dynkv.service": "prometheus"}
    assert prom.probes == binary.probes and prom.files == binary.files


class _NoEngine:
    @property
    def client(self):
        raise DockerUnavailable("no socket")


def test_neither_binary_nor_docker_fails_before_anything_starts():
    plan = plan_for(prometheus=None)
    outcome = observability(plan, docker=_NoEngine())
    assert outcome.status is Status.FAIL
    assert "no prometheus binary" in outcome.detail and "no socket" in outcome.detail
    assert outcome.fix.startswith("apt-get install -y prometheus")
    assert observability(plan_for(), docker=_NoEngine()) is None  # the binary needs no engine


def test_up_observability_without_prometheus_exits_1_with_cause_and_fix(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path))
    clean_env.setattr("dynkv.plan.host.find_prometheus", lambda: None)
    clean_env.setattr(
        "dynkv.doctor.check_plan.DockerBackend", lambda: _NoEngine()
    )  # no engine either
    result = CliRunner().invoke(
        app,
        [
            "up",
            "-d",
            "--observability",
            "--skip-checks",
            "--device",
            "cpu",
            "--model",
            "dynkv-tiny",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "no prometheus binary" in result.stderr and "apt-get install" in result.stderr
    assert not (tmp_path / "default" / "state.json").exists()  # nothing started


def test_dry_run_shows_the_prometheus_service(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(
        app, ["up", "--dry-run", "--json", "--device", "cpu", "--observability"]
    )
    assert result.exit_code == 0, result.output
    prom = json.loads(result.stdout)["services"][-1]
    assert prom["name"] == "prometheus" and prom["ports"] == {"http": 9090}
    assert not (tmp_path / "default").exists()


def test_prepare_writes_the_generated_files_privately(tmp_path):
    prom = plan_for({"DYNKV_API_KEY": "k", "DYNKV_STATE_DIR": str(tmp_path)}).service("prometheus")
    prepare(prom)
    pdir = Path(prom.data_dirs[0])
    assert stat.S_IMODE(pdir.stat().st_mode) == 0o700
    for name, text in prom.files.items():
        assert Path(name).read_text() == text
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o600


# ---- a frontend serving HTTPS (docs/security.md) -------------------------------------------------


def _frontend_job(svc) -> dict:
    return next(j for j in config_of(svc)["scrape_configs"] if j["job_name"] == "dynkv-frontend")


def test_https_frontend_is_scraped_over_https_verifying_its_own_certificate(tmp_path):
    from tls_support import self_signed

    cert, key = self_signed(tmp_path)  # names 127.0.0.1, the address scraped
    prom = plan_for({"DYNKV_TLS_CERT": cert, "DYNKV_TLS_KEY": key}).service("prometheus")
    job = _frontend_job(prom)
    assert job["scheme"] == "https"
    assert job["tls_config"] == {"ca_file": cert}  # verified: no insecure_skip_verify, no name
    others = [j for j in config_of(prom)["scrape_configs"] if j["job_name"] != "dynkv-frontend"]
    assert others and all("scheme" not in j and "tls_config" not in j for j in others)
    assert key not in prom.files[prom.info.config]  # Prometheus never sees the private key


def test_https_frontend_certificate_for_a_name_sets_the_server_name(tmp_path):
    from tls_support import self_signed

    cert, key = self_signed(tmp_path, ips=(), dns=("*.example", "frontend.example"))
    env = {"DYNKV_TLS_CERT": cert, "DYNKV_TLS_KEY": key, "DYNKV_API_KEY": "k"}
    job = _frontend_job(plan_for(env).service("prometheus"))
    assert job["tls_config"] == {"ca_file": cert, "server_name": "frontend.example"}
    assert job["authorization"]["credentials_file"].endswith("frontend_api_key")


def test_https_frontend_with_the_docker_backend_mounts_the_certificate(tmp_path):
    from tls_support import self_signed

    cert, key = self_signed(tmp_path)
    prom = plan_for({"DYNKV_TLS_CERT": cert, "DYNKV_TLS_KEY": key}, prometheus=None).service(
        "prometheus"
    )
    assert prom.container.volumes[cert] == cert
    assert _frontend_job(prom)["tls_config"]["ca_file"] == cert


def test_plain_http_frontend_config_is_unchanged():
    job = _frontend_job(plan_for().service("prometheus"))
    assert "scheme" not in job and "tls_config" not in job


def test_unreadable_certificate_plans_without_a_server_name():
    # the frontend loads the same file and fails at start with the reason; the plan still builds
    env = {"DYNKV_TLS_CERT": "/nonexistent/c.pem", "DYNKV_TLS_KEY": "/nonexistent/k.pem"}
    job = _frontend_job(plan_for(env).service("prometheus"))
    assert job["tls_config"] == {"ca_file": "/nonexistent/c.pem"}
