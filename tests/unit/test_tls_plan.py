"""`dynkv up --advertise ADDR` as a plan: etcd, NATS and the frontend on ADDR over TLS from the
deployment's CA, workers on https, every client given the CA (docs/multi-host.md); and a plan
without --advertise exactly as before."""

from __future__ import annotations

import json

import pytest
from plan_support import flag, plan_for, vllm_part

from dynkv.kvbm import event_settings
from dynkv.plan import PlanError
from dynkv.plan.model import EtcdKeyProbe, HttpProbe
from dynkv.settings import SettingsError
from dynkv.tls import model as tls_model

SECRET = "s" * 64
ADVERTISED = {"DYNKV_ADVERTISE": "127.0.0.2"}


def advertised(env=None, **facts):
    return plan_for({**ADVERTISED, **(env or {})}, secret=SECRET, **facts)


def test_loopback_plan_has_no_transport_security_and_no_tls():
    plan = plan_for(secret=SECRET)
    assert plan.transport_security is None
    text = json.dumps(plan.to_json())
    assert "transport_security" not in text
    assert "https://" not in text and "tls://" not in text and "DYNKV_CLIENT_" not in text
    assert plan.etcd_endpoints == ("http://127.0.0.1:2379",)


def test_etcd_serves_https_on_the_address_and_requires_client_certificates():
    plan = advertised()
    tls = plan.transport_security
    assert tls is not None and tls.advertise == "127.0.0.2"
    assert tls.dir == "/state/default/tls" and tls.ca_cert == "/state/default/tls/ca.crt"
    etcd = plan.service("etcd")
    assert plan.etcd_endpoints == ("https://127.0.0.2:2379",)
    assert flag(etcd.argv, "--listen-client-urls") == "https://127.0.0.2:2379"
    assert flag(etcd.argv, "--advertise-client-urls") == "https://127.0.0.2:2379"
    assert "--client-cert-auth" in etcd.argv
    assert flag(etcd.argv, "--trusted-ca-file") == tls.ca_cert
    assert flag(etcd.argv, "--cert-file") == tls.service("etcd").server.cert
    assert flag(etcd.argv, "--listen-peer-urls").startswith("http://127.0.0.1:")  # peer off
    (probe,) = etcd.probes
    assert probe.url == "https://127.0.0.2:2379/health"
    assert probe.tls == tls.client("cli") and probe.tls.cert


def test_nats_listens_with_tls_on_the_address_and_its_token_travels_by_environment():
    plan = advertised()
    tls = plan.transport_security
    nats = plan.service("nats")
    assert plan.nats_url == "tls://127.0.0.2:4222"
    assert nats.argv[1:3] == ("-c", "/state/default/nats.conf")
    config = nats.files["/state/default/nats.conf"]
    assert 'listen: "127.0.0.2:4222"' in config
    assert 'http: "127.0.0.1:8222"' in config  # monitoring stays on loopback
    assert "token: $DYNKV_NATS_TOKEN" in config and tls.service("nats").server.cert in config
    token = nats.env["DYNKV_NATS_TOKEN"]
    assert len(token) == 64 and token not in config and token not in " ".join(nats.argv)
    printed = json.dumps(plan.to_json())
    assert token not in printed and SECRET not in printed
    # every NATS client has the same token, by environment
    for svc in (*plan.workers, plan.service("frontend")):
        assert svc.env["DYNKV_NATS_TOKEN"] == token
        assert token not in " ".join(svc.argv)


def test_workers_serve_https_register_it_and_are_clients_of_etcd():
    plan = advertised({"DYNKV_TOPOLOGY": "disagg"}, cpus=(0, 1, 2, 3))
    tls = plan.transport_security
    assert len(plan.workers) == 2
    for worker in plan.workers:
        files = tls.service(worker.name)
        vllm = vllm_part(worker.argv)
        assert flag(vllm, "--ssl-certfile") == files.server.cert
        assert flag(vllm, "--ssl-keyfile") == files.server.key
        assert worker.info.url.startswith("https://127.0.0.1:")
        assert flag(worker.argv, "--url") == worker.info.url
        assert worker.env["DYNKV_CLIENT_CA"] == tls.ca_cert
        assert worker.env["DYNKV_CLIENT_CERT"] == files.client.cert
        assert worker.env["DYNKV_WORKER_ETCD_ENDPOINTS"] == "https://127.0.0.2:2379"
        assert worker.env["DYNKV_KV_EVENTS_NATS_URL"] == "tls://127.0.0.2:4222"
        http, key = worker.probes
        assert isinstance(http, HttpProbe) and http.url == worker.info.url + "/health"
        assert isinstance(key, EtcdKeyProbe) and key.tls == tls.client("cli")
        assert set(files.ips) >= {"127.0.0.2", "127.0.0.1"}


def test_frontend_binds_the_address_over_https_and_trusts_the_ca():
    plan = advertised()
    tls = plan.transport_security
    frontend = plan.service("frontend")
    assert flag(frontend.argv, "--host") == "127.0.0.2"
    assert flag(frontend.argv, "--tls-cert") == tls.service("frontend").server.cert
    assert frontend.info.openai_url == "https://127.0.0.2:8000/v1"
    assert frontend.env["DYNKV_FRONTEND_ETCD_ENDPOINTS"] == "https://127.0.0.2:2379"
    assert frontend.env["DYNKV_CLIENT_CA"] == tls.ca_cert
    assert frontend.env["DYNKV_CLIENT_KEY"] == tls.service("frontend").client.key
    (probe,) = frontend.probes
    assert probe.url == "https://127.0.0.2:8000/health" and probe.tls is not None


def test_the_dry_run_shows_paths_only():
    data = advertised().to_json()
    security = data["transport_security"]
    assert security["advertise"] == "127.0.0.2"
    assert security["nats_token_env"] == "DYNKV_NATS_TOKEN"
    assert security["services"]["cli"]["client"]["cert"].endswith("/tls/cli-client.crt")
    paths = json.dumps(security)
    assert SECRET not in paths and "BEGIN" not in paths


def test_prometheus_scrapes_the_workers_and_frontend_against_the_ca():
    plan = advertised({"DYNKV_OBSERVABILITY": "true"}, prometheus_binary="/bin/prometheus")
    config = next(t for p, t in plan.service("prometheus").files.items() if p.endswith(".yml"))
    ca = plan.transport_security.ca_cert
    assert config.count(f"ca_file: '{ca}'") == 2 or config.count(f'ca_file: "{ca}"') == 2
    assert "server_name" not in config  # the CA's certificates name the address scraped


def test_advertise_runs_its_own_infra_and_wants_an_address():
    with pytest.raises(PlanError, match="--advertise"):
        advertised({"DYNKV_INFRA": "external"})
    with pytest.raises(SettingsError):
        plan_for({"DYNKV_ADVERTISE": "0.0.0.0"})
    with pytest.raises(SettingsError):
        plan_for({"DYNKV_ADVERTISE": "node-a"})


def test_a_non_loopback_address_still_wants_an_api_key():
    with pytest.raises(SettingsError, match="API key"):
        advertised({"DYNKV_ADVERTISE": "10.1.2.3"})
    plan = advertised({"DYNKV_ADVERTISE": "10.1.2.3", "DYNKV_API_KEY": "k" * 20})
    assert plan.service("frontend").info.url == "https://10.1.2.3:8000"


def test_the_kvbm_package_reads_the_same_variables_as_everyone_else(monkeypatch, tmp_path):
    # dynkv/kvbm may not import dynkv.tls (it runs inside vLLM): the names are kept in step here
    assert event_settings.TLS_CA_ENV == tls_model.CA_ENV
    assert event_settings.NATS_TOKEN_ENV == tls_model.NATS_TOKEN_ENV
    from dynkv.tls.ca import DeploymentCA

    DeploymentCA.ensure(tmp_path / "tls", "d")
    monkeypatch.setenv("DYNKV_CLIENT_CA", str(tmp_path / "tls" / "ca.crt"))
    monkeypatch.setenv("DYNKV_NATS_TOKEN", "tok-value")
    settings = event_settings.KvEventsSettings()
    assert "tok-value" not in repr(settings)
    options = settings.nats_options()
    assert options["token"] == "tok-value" and options["tls"].verify_mode.name == "CERT_REQUIRED"
    monkeypatch.delenv("DYNKV_CLIENT_CA")
    monkeypatch.delenv("DYNKV_NATS_TOKEN")
    assert event_settings.KvEventsSettings().nats_options() == {}
