"""Engine arguments checked against the real vLLM parser (docs/engine-args.md), read in a child
process the way `dynkv up` does, and cached by vLLM version. Skips where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.plan import vllm_parser

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """One cache for the module: importing vLLM to read its parser costs up to a minute here."""
    return tmp_path_factory.mktemp("vllm-args-cache")


@pytest.fixture
def env(clean_env, cache_home, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(cache_home))
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "state"))
    return clean_env


def test_the_parser_is_read_once_and_cached_by_version(env, monkeypatch):
    spec = vllm_parser.load_spec(sys.executable)
    assert spec is not None
    assert spec.options["--max-num-seqs"] == "max_num_seqs"
    assert spec.options["-tp"] == "tensor_parallel_size"
    assert spec.kinds["enforce_eager"] == "bool"  # --enforce-eager / --no-enforce-eager
    assert spec.options["--block-size"] == "block_size"
    version = vllm_parser.installed_version(sys.executable)
    assert version and vllm_parser.cache_file(version).is_file()

    def no_second_import(python):
        raise AssertionError("the cached parser should have been used")

    monkeypatch.setattr(vllm_parser, "_read_parser", no_second_import)
    assert vllm_parser.load_spec(sys.executable) == spec


def test_misspelt_argument_exits_2_naming_the_closest(env, tmp_path):
    result = CliRunner().invoke(
        app, ["up", "--dry-run", "--device", "cpu", "--", "--max-num-seq", "8"]
    )
    assert result.exit_code == 2, result.output
    assert "--max-num-seq " in result.output and "did you mean --max-num-seqs?" in result.output
    assert not (tmp_path / "state").exists()


def test_valid_arguments_pass_and_the_plan_says_nothing_about_checking(env):
    result = CliRunner().invoke(
        app,
        [
            "up",
            "--dry-run",
            "--json",
            "--device",
            "cpu",
            "--",
            "--max-num-seqs",
            "8",
            "--no-enforce-eager",
            "-tp",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "not checked" not in result.stdout
    assert '"--no-enforce-eager"' in result.stdout
