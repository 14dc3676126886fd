"""Engine arguments checked against the real vLLM parser (docs/engine-args.md), read in a child
process the way `dynkv up` does, and cached by vLLM version. Skips where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dynkv import vllm_args as vllm_parser
from dynkv.cli.main import app

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]
DRY_RUN = ("up", "--dry-run", "--device", "cpu")  # the plan of a CPU stack, nothing started


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
    result = CliRunner().invoke(app, [*DRY_RUN, "--", "--max-num-seq", "8"])
    assert result.exit_code == 2, result.output
    assert "--max-num-seq " in result.output and "did you mean --max-num-seqs?" in result.output
    assert not (tmp_path / "state").exists()


def test_valid_arguments_pass_and_the_plan_says_nothing_about_checking(env):
    words = ["--", "--max-num-seqs", "8", "--no-enforce-eager", "-tp", "1"]
    result = CliRunner().invoke(app, [*DRY_RUN, "--json", *words])
    assert result.exit_code == 0, result.output
    assert "not checked" not in result.stdout
    assert '"--no-enforce-eager"' in result.stdout


_PARSE = """
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
engine = AsyncEngineArgs.from_cli_args(args)
print("DYNKV-PARSED " + json.dumps({k: getattr(engine, k) for k in
      ("max_model_len", "max_num_seqs", "enforce_eager", "block_size", "tensor_parallel_size")}))
"""


def test_vllm_parses_the_planned_worker_argv_into_the_engine_arguments(env, tmp_path):
    """The worker's vLLM command line, as planned, read by vLLM's own parser into its engine
    arguments: the user's values arrive, dynkv's own stay dynkv's."""
    profile = tmp_path / "p.toml"
    profile.write_text(
        "[kvbm]\ncpu_cache_gb = 1\n[vllm]\nmax_num_seqs = 3\nenforce_eager = true\n",
        encoding="utf-8",
    )
    words = ["--", "--max-model-len", "1024", "--no-enforce-eager", "-tp", "1"]
    result = CliRunner().invoke(app, [*DRY_RUN, "--json", "-p", str(profile), *words])
    assert result.exit_code == 0, result.output
    worker = next(s for s in json.loads(result.stdout)["services"] if s["name"] == "worker")
    argv = worker["argv"]
    vllm_words = argv[argv.index(vllm_parser_module()) + 1 :]
    child = subprocess.run(
        [sys.executable, "-c", _PARSE, *vllm_words],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    line = next((x for x in child.stdout.splitlines() if x.startswith("DYNKV-PARSED ")), None)
    assert line, child.stderr[-3000:]
    parsed = json.loads(line.split(" ", 1)[1])
    assert parsed == {
        "max_model_len": 1024,
        "max_num_seqs": 3,
        "enforce_eager": False,
        "block_size": 32,
        "tensor_parallel_size": 1,
    }


def vllm_parser_module() -> str:
    from dynkv.plan.worker import VLLM_MODULE

    return VLLM_MODULE
