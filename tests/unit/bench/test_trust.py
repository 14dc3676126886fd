"""`bench serve`/`bench load` against an https frontend whose certificate is from a deployment's
own CA (`dynkv up --advertise`, docs/multi-host.md): which CA is trusted (`--ca-cert`, then
`DYNKV_CLIENT_CA`, then the found deployment's), the workload and the router comparison's
/metrics reads verified with it, the report naming the CA file, and verification never off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from frontend_mimic import FrontendMimic, Serving
from typer.testing import CliRunner

from dynkv.bench import trust
from dynkv.bench.trust import Trust, TrustError
from dynkv.cli.main import app
from dynkv.tls.ca import DeploymentCA
from dynkv.tls.model import CA_ENV, CERT_ENV, ClientTLS

cli = CliRunner()
WORKLOAD = ["--users", "1", "--rounds", "2", "--system-tokens", "16", "--question-tokens", "4"]
WORKLOAD += ["--answer-tokens", "2"]


@pytest.fixture
def ca(tmp_path) -> tuple[str, tuple[str, str]]:
    """A deployment CA (its ca.crt) and a frontend certificate it issued for 127.0.0.1."""
    tls_dir = tmp_path / "tls"
    deployment_ca = DeploymentCA.ensure(tls_dir, "bench")
    issued = deployment_ca.issue("frontend", ips=("127.0.0.1",), server=True)
    cert, key = issued.write(tls_dir, "frontend")
    return str(tls_dir / "ca.crt"), (str(cert), str(key))


def test_the_named_ca_wins_then_the_environment_then_the_deployment(ca):
    ca_file, _ = ca
    env = {CA_ENV: ca_file, CERT_ENV: "/c.crt"}
    chosen = trust.choose(Path(ca_file), env, deployment_ca="/dep/ca.crt", deployment="d")
    assert chosen == Trust(ClientTLS(ca=ca_file), "--ca-cert")
    from_env = trust.choose(None, {CA_ENV: ca_file}, deployment_ca="/dep/ca.crt")
    assert from_env == Trust(ClientTLS(ca=ca_file), "DYNKV_CLIENT_CA")
    found = trust.choose(None, {}, deployment_ca=ca_file, deployment="prod")
    assert found is not None and found.record() == {
        "ca_cert": ca_file,
        "ca_cert_from": "deployment prod",
    }
    assert trust.choose(None, {}) is None  # the system's store, verification on


def test_a_ca_file_that_does_not_load_is_refused(tmp_path, ca):
    _, (cert, key) = ca
    for bad in (tmp_path / "missing.crt", Path(key)):
        with pytest.raises(TrustError) as exc:
            trust.choose(bad, {})
        assert str(bad) in exc.value.cause and "--ca-cert" in exc.value.fix
    result = cli.invoke(app, ["bench", "serve", "--ca-cert", str(tmp_path / "no.crt")])
    assert result.exit_code == 2 and "cannot be used as a CA certificate" in result.stderr


def test_serve_verifies_an_https_frontend_against_the_named_ca(ca, tmp_path):
    ca_file, server = ca
    with Serving(FrontendMimic(), tls=server) as url:
        result = cli.invoke(
            app, ["bench", "serve", "--url", url, "--ca-cert", ca_file, *WORKLOAD, "--json"]
        )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["completed"] == data["requests"] == 2
    assert data["config"]["ca_cert"] == ca_file and data["config"]["ca_cert_from"] == "--ca-cert"
    assert "PRIVATE KEY" not in result.stdout


def test_the_router_comparison_reads_the_frontends_metrics_with_the_same_trust(ca, monkeypatch):
    ca_file, server = ca
    monkeypatch.setenv(CA_ENV, ca_file)
    with Serving(FrontendMimic(), tls=server) as url:
        result = cli.invoke(
            app, ["bench", "serve", "--url", url, "--compare-router", "kv", *WORKLOAD, "--json"]
        )
    assert result.exit_code == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert run["completed"] == 2 and run["config"]["ca_cert_from"] == "DYNKV_CLIENT_CA"
    assert run["router"].get("error") is None and run["router"]["workers"]


def test_without_the_ca_or_with_another_the_handshake_fails(ca, tmp_path):
    ca_file, server = ca
    other = DeploymentCA.ensure(tmp_path / "other", "other")
    assert other.fingerprint != DeploymentCA.load(Path(ca_file).parent).fingerprint
    with Serving(FrontendMimic(), tls=server) as url:
        plain = cli.invoke(app, ["bench", "serve", "--url", url, *WORKLOAD])
        wrong = cli.invoke(
            app,
            ["bench", "serve", "--url", url, "--ca-cert", str(tmp_path / "other" / "ca.crt")]
            + WORKLOAD,
        )
    for result in (plain, wrong):
        assert result.exit_code == 1, result.output
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr and "--ca-cert" in result.stderr


def test_bench_load_sends_and_reports_with_the_same_trust(ca):
    from dynkv.bench import load

    ca_file, server = ca
    options = load.LoadOptions(
        clients=1, duration=0.2, max_tokens=2, system_words=4, question_words=2, sample=0.1,
        warmup=0.0, trust=trust.choose(Path(ca_file), {}),
    )  # fmt: skip
    with Serving(FrontendMimic(), tls=server) as url:
        rep = load.run(options, url, {})
    assert rep.requests and rep.completed == rep.requests, rep.error_samples
    config = rep.model_dump(mode="json")["config"]
    assert config["ca_cert"] == ca_file and config["ca_cert_from"] == "--ca-cert"
    plain = load.report(load.LoadOptions(), [], 1.0, load.RssSampler({}, interval=1.0))
    assert "ca_cert" not in plain.model_dump(mode="json")["config"]  # a loopback load as before
