"""`dynkv export` on the command line: the options `up` takes, YAML on stdout or files in -o DIR,
secrets generated into 0600 files and never printed, cause + fix and exit 2 for bad options."""

from __future__ import annotations

import stat

import pytest
import yaml
from export_support import API_KEY, assert_compose_valid, assert_k8s_valid
from typer.testing import CliRunner

from dynkv.cli.main import app

HF = ["--model", "Qwen/Qwen3-0.6B"]


@pytest.fixture
def run(clean_env):
    def invoke(*args: str, env: dict[str, str] | None = None):
        return CliRunner().invoke(app, ["export", *args], env=env)

    return invoke


def test_compose_to_stdout_is_the_compose_file_and_names_the_secret_files(run):
    result = run("compose", "--device", "cpu", *HF)
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.stdout)
    assert_compose_valid(doc)
    assert "frontend.env" in result.stderr and "workers.env" in result.stderr


def test_kubernetes_to_stdout_validates_and_says_how_to_create_the_secret(run):
    result = run("kubernetes", "--device", "cpu", "--workers", "2", *HF)
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert_k8s_valid(docs)
    assert "Secret" not in {d["kind"] for d in docs}  # no values without -o
    assert "kubectl create secret generic dynkv-default-keys" in result.stderr
    worker = next(d for d in docs if d["metadata"]["name"] == "dynkv-default-worker")
    assert worker["spec"]["replicas"] == 2


def test_the_same_options_as_up_shape_the_plan(run):
    result = run(
        "kubernetes",
        "--device",
        "cpu",
        "--topology",
        "disagg",
        "--decode-workers",
        "2",
        "--name",
        "prod",
        *HF,
    )
    assert result.exit_code == 0, result.output
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(result.stdout)}
    assert "dynkv-prod-disagg" in names


def test_a_gpu_host_found_through_nvml_gets_gpu_requests(run, monkeypatch):
    from doctor_support import gpus

    fake = gpus(2)
    monkeypatch.setattr("dynkv.hardware.nvidia_gpu_count", lambda: len(fake.snapshot().gpus))
    result = run("compose", "--workers", "2", *HF, env={"DYNKV_BLOCK_SIZE": "16"})
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.stdout)
    assert_compose_valid(doc)
    devices = [
        doc["services"][n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for n in ("worker-0", "worker-1")
    ]
    assert devices == [["0"], ["1"]]


def test_output_dir_gets_the_files_and_private_generated_secrets(run, tmp_path):
    out = tmp_path / "k8s"
    result = run(
        "kubernetes", "--device", "cpu", *HF, "-o", str(out), env={"DYNKV_API_KEY": API_KEY}
    )
    assert result.exit_code == 0, result.output
    manifests = out / "dynkv-default.yaml"
    secret = out / "dynkv-default-keys.yaml"
    assert_k8s_valid(list(yaml.safe_load_all(manifests.read_text())))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    values = yaml.safe_load(secret.read_text())["stringData"]
    assert set(values) == {"DYNKV_DEPLOYMENT_SECRET", "DYNKV_API_KEY"}
    assert values["DYNKV_API_KEY"] != API_KEY  # generated, never this host's key
    for value in (*values.values(), API_KEY):
        assert value not in result.output
        assert value not in manifests.read_text()
    # a second export keeps the secrets running containers use
    again = run("kubernetes", "--device", "cpu", *HF, "-o", str(out))
    assert again.exit_code == 0, again.output
    assert yaml.safe_load(secret.read_text())["stringData"] == values


def test_compose_output_dir_shares_one_deployment_secret(run, tmp_path):
    result = run("compose", "--device", "cpu", *HF, "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert_compose_valid(yaml.safe_load((tmp_path / "compose.yaml").read_text()))

    def read(name):
        path = tmp_path / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        return dict(line.split("=", 1) for line in path.read_text().splitlines())

    workers, frontend = read("workers.env"), read("frontend.env")
    assert workers["DYNKV_DEPLOYMENT_SECRET"] == frontend["DYNKV_DEPLOYMENT_SECRET"]
    assert set(workers) == {"DYNKV_DEPLOYMENT_SECRET"}  # no API key for the workers
    for value in (*workers.values(), *frontend.values()):
        assert value not in result.output


def test_the_live_deployment_secret_is_never_read(run, tmp_path):
    live = tmp_path / "state" / "dynkv" / "default"
    live.mkdir(parents=True)
    (live / "deployment.secret").write_text("f" * 64)
    (live / "deployment.secret").chmod(0o600)
    result = run("compose", "--device", "cpu", *HF, "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "f" * 64 not in (tmp_path / "out" / "workers.env").read_text()


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["swarm"], "'swarm' is not one of"),
        (["kubernetes", "--g3-volume", "nfs:/x"], "--g3-volume 'nfs:/x'"),
        (["compose", "--workers", "0"], "--workers"),
        (["compose", "--device", "cpu", "--prefill-workers", "2"], "counts disagg workers"),
        (["compose", "--device", "cpu"], "model cache"),  # the CPU default is a cached model
        (["compose", "--device", "cuda"], "no model given"),
        (
            ["compose", "--device", "cpu", *HF, "--host", "0.0.0.0"],
            "without an API key",
        ),
    ],
)
def test_bad_options_exit_2_with_cause_and_fix(run, args, cause):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert cause in result.stderr
    assert "fix:" in result.stderr
    assert result.stdout == ""


def test_tls_files_are_refused_with_a_fix(run, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    result = run(
        "compose",
        "--device",
        "cpu",
        *HF,
        env={"DYNKV_TLS_CERT": str(cert), "DYNKV_TLS_KEY": str(key)},
    )
    assert result.exit_code == 2, result.output
    assert "terminate TLS" in result.stderr
