"""vLLM engine arguments (docs/engine-args.md): profile [vllm] tables and the words after `--`
reach each worker's vLLM command line with their precedence; options dynkv owns and names vLLM
does not know are refused with exit 2 and the fix. No vLLM import here: the parser is a small
hand-written `VllmArgSpec`, or absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plan_support import host, vllm_part
from typer.testing import CliRunner

from dynkv import vllm_args as vllm_parser
from dynkv.cli.main import app
from dynkv.plan import build_plan
from dynkv.plan.engine_args import OPTIONAL_SETTING, OWNED_FIX, arg_key, owned_options
from dynkv.settings import SettingsError, resolve
from dynkv.settings.engine_args import parse_command_line
from dynkv.vllm_args import VllmArgSpec

SPEC = VllmArgSpec(
    version="0.test",
    options={
        "--max-num-seqs": "max_num_seqs",
        "--max-num-batched-tokens": "max_num_batched_tokens",
        "--max-model-len": "max_model_len",
        "--tensor-parallel-size": "tensor_parallel_size",
        "-tp": "tensor_parallel_size",
        "--enforce-eager": "enforce_eager",
        "--no-enforce-eager": "enforce_eager",
        "--disable-log-stats": "disable_log_stats",
        "--compilation-config": "compilation_config",
        "--port": "port",
        "--block-size": "block_size",
    },
    kinds={
        "max_num_seqs": "value",
        "max_num_batched_tokens": "value",
        "max_model_len": "value",
        "tensor_parallel_size": "value",
        "enforce_eager": "bool",
        "disable_log_stats": "flag",
        "compilation_config": "value",
        "port": "value",
        "block_size": "value",
    },
)

PROFILE = """
description = "engine args"
[kvbm]
cpu_cache_gb = 1
[vllm]
max_num_seqs = 8
enforce_eager = true
compilation_config = { level = 0 }
[vllm.prefill]
max_num_seqs = 4
enforce_eager = false
[vllm.decode]
max-num-batched-tokens = 512
"""


def _profile(tmp_path: Path, text: str = PROFILE) -> str:
    path = tmp_path / "engine.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _plan(tmp_path, words=(), *, topology="agg", env=None, spec=None, **facts):
    environ = {"DYNKV_STATE_DIR": str(tmp_path / "state"), "DYNKV_TOPOLOGY": topology}
    resolved = resolve(profile=_profile(tmp_path), env=environ | (env or {}), engine_args=words)
    return build_plan(resolved, host(vllm_args=spec, **facts))


BARE_FLAGS = {"--enable-prompt-tokens-details"}  # owned options that take no value


def _engine_words(plan, name="worker"):
    """The worker's vLLM argv without the options dynkv sets (each takes one value)."""
    argv = vllm_part(plan.service(name).argv)[3:]  # python -m module
    owned, out, i = set(owned_options()), [], 0
    while i < len(argv):
        if argv[i] in owned:
            i += 1 if argv[i] in BARE_FLAGS else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def test_profile_table_reaches_the_agg_worker_in_the_order_written(tmp_path):
    plan = _plan(tmp_path, spec=SPEC)
    assert _engine_words(plan) == [
        "--max-num-seqs",
        "8",
        "--enforce-eager",
        "--compilation-config",
        '{"level":0}',
    ]


def test_role_tables_extend_and_override_the_shared_table_per_role(tmp_path):
    plan = _plan(tmp_path, topology="disagg", spec=SPEC)
    prefill, decode = _engine_words(plan, "prefill-0"), _engine_words(plan, "decode-0")
    assert prefill[:3] == ["--max-num-seqs", "4", "--no-enforce-eager"]
    assert decode[:3] == ["--max-num-seqs", "8", "--enforce-eager"]
    assert decode[-2:] == ["--max-num-batched-tokens", "512"]
    assert "--max-num-batched-tokens" not in prefill


def test_command_line_wins_over_every_profile_table(tmp_path):
    words = ["--max-num-seqs", "16", "--enforce-eager", "-tp", "1"]
    plan = _plan(tmp_path, words, topology="disagg", spec=SPEC)
    for name in ("prefill-0", "decode-0"):
        engine = _engine_words(plan, name)
        assert (
            engine.count("--max-num-seqs") == 1
            and engine[engine.index("--max-num-seqs") + 1] == "16"
        )
        assert "--no-enforce-eager" not in engine and engine.count("--enforce-eager") == 1
        assert engine[-2:] == ["-tp", "1"]


def test_no_flag_and_profile_bool_share_one_destination(tmp_path):
    plan = _plan(tmp_path, ["--no-enforce-eager", "--max_num_seqs=2"], spec=SPEC)
    engine = _engine_words(plan)
    assert "--enforce-eager" not in engine and "--no-enforce-eager" in engine
    assert engine[:2] == ["--max-num-seqs", "2"]  # placed where [vllm] first set it


def test_false_for_a_bare_flag_is_omitted_and_without_a_parser_is_a_no_flag(tmp_path):
    text = "[kvbm]\ncpu_cache_gb = 1\n[vllm]\ndisable_log_stats = false\nenforce_eager = false\n"
    path = _profile(tmp_path, text)
    env = {"DYNKV_STATE_DIR": str(tmp_path / "s")}
    with_spec = build_plan(resolve(profile=path, env=env), host(vllm_args=SPEC))
    assert _engine_words(with_spec) == ["--no-enforce-eager"]
    without = build_plan(resolve(profile=path, env=env), host())
    assert _engine_words(without) == ["--no-disable-log-stats", "--no-enforce-eager"]
    assert any("not checked against vLLM's parser" in n for n in without.notes)
    assert not any("vLLM's parser" in n for n in with_spec.notes)


def test_no_engine_arguments_change_nothing_in_the_plan(tmp_path):
    env = {"DYNKV_STATE_DIR": str(tmp_path / "s")}
    plain = build_plan(resolve(env=env), host())
    assert not any("engine arguments" in n for n in plain.notes)
    assert plain.to_json() == build_plan(resolve(env=env, engine_args=[]), host()).to_json()


def test_every_option_dynkv_sets_is_refused_with_a_fix():
    owned = owned_options()
    assert {"--model", "--host", "--port", "--block-size", "--served-model-name"} <= set(owned)
    assert {"--kv-transfer-config", "--api-key"} <= set(owned)
    for option in owned:
        dest = option[2:].replace("-", "_")
        assert dest in OWNED_FIX or dest in OPTIONAL_SETTING, (
            f"{option} has no 'use this instead' text"
        )


@pytest.mark.parametrize(
    ("words", "fix"),
    [
        (["--port", "9000"], "DYNKV_WORKER_PORT"),
        (["--block-size", "64"], "DYNKV_BLOCK_SIZE"),
        (["--block_size=64"], "DYNKV_BLOCK_SIZE"),
        (["--model", "x"], "--model"),
        (["--kv-transfer-config", "{}"], "--kvbm"),
        (["--api-key", "k"], "DYNKV_API_KEY"),
        (["--kv-cache-memory-bytes", "1"], "--device-kv-gb"),
    ],
)
def test_owned_options_after_dashdash_are_refused(tmp_path, words, fix):
    with pytest.raises(SettingsError) as info:
        _plan(tmp_path, words)
    assert "set by dynkv itself" in info.value.cause and fix in info.value.fix


def test_owned_option_in_a_profile_role_table_names_the_table(tmp_path):
    text = "[kvbm]\ncpu_cache_gb = 1\n[vllm.decode]\nport = 9000\n"
    with pytest.raises(SettingsError) as info:
        resolve_and_plan(tmp_path, text)
    assert "[vllm.decode]" in info.value.cause and "DYNKV_WORKER_PORT" in info.value.fix


def resolve_and_plan(tmp_path, text, **kw):
    env = {"DYNKV_STATE_DIR": str(tmp_path / "s")}
    return build_plan(resolve(profile=_profile(tmp_path, text), env=env, **kw), host())


def test_max_model_len_passes_through_unless_dynkv_setting_also_sets_it(tmp_path):
    plan = _plan(tmp_path, ["--max-model-len", "1024"])
    argv = vllm_part(plan.service("worker").argv)
    assert argv.count("--max-model-len") == 1 and argv[-2:] == ["--max-model-len", "1024"]
    with pytest.raises(SettingsError) as info:
        _plan(tmp_path, ["--max-model-len", "1024"], env={"DYNKV_MAX_MODEL_LEN": "2048"})
    assert "DYNKV_MAX_MODEL_LEN" in info.value.cause and "unset" in info.value.fix


def test_unknown_name_names_the_closest_one(tmp_path):
    with pytest.raises(SettingsError) as info:
        _plan(tmp_path, ["--max-num-seq", "8"], spec=SPEC)
    assert "--max-num-seq" in info.value.cause and "did you mean --max-num-seqs?" in info.value.fix
    text = "[kvbm]\ncpu_cache_gb = 1\n[vllm]\nmax_num_seq = 8\n"
    env = {"DYNKV_STATE_DIR": str(tmp_path / "s")}
    with pytest.raises(SettingsError) as info:
        build_plan(resolve(profile=_profile(tmp_path, text), env=env), host(vllm_args=SPEC))
    assert "[vllm]" in info.value.cause and "max_num_seqs" in info.value.fix


def test_kinds_are_checked_against_the_parser(tmp_path):
    cases = [
        ("[vllm]\nmax_num_seqs = true\n", "takes a value"),
        ('[vllm]\nenforce_eager = "yes"\n', "true or false"),
    ]
    env = {"DYNKV_STATE_DIR": str(tmp_path / "s")}
    for body, message in cases:
        path = _profile(tmp_path, "[kvbm]\ncpu_cache_gb = 1\n" + body)
        with pytest.raises(SettingsError) as info:
            build_plan(resolve(profile=path, env=env), host(vllm_args=SPEC))
        assert message in info.value.cause
    with pytest.raises(SettingsError) as info:
        _plan(tmp_path, ["--enforce-eager", "false"], spec=SPEC)
    assert "takes no value" in info.value.cause and "--no-enforce-eager" in info.value.fix


def test_words_after_dashdash_must_start_with_an_option():
    with pytest.raises(SettingsError) as info:
        parse_command_line(["max-num-seqs", "8"])
    assert "--max-num-seqs 8" in info.value.fix
    args = parse_command_line(["--seed", "-1", "--x=a=b", "--list", "a", "b", "-q", "fp8"])
    assert [(a.option, a.value) for a in args] == [
        ("--seed", ("-1",)),
        ("--x", ("a=b",)),
        ("--list", ("a", "b")),
        ("-q", ("fp8",)),
    ]


def test_arg_key_without_a_parser_folds_no_prefix_and_underscores():
    a, b = parse_command_line(["--no-enforce-eager", "--max_num_seqs", "2"])
    assert arg_key(a, None) == "enforce_eager" and arg_key(b, None) == "max_num_seqs"
    assert arg_key(a, SPEC) == "enforce_eager"


def test_vllm_table_must_be_a_table_and_role_keys_must_be_tables(tmp_path):
    env = {"DYNKV_STATE_DIR": str(tmp_path / "s")}
    for text, message in (
        ("vllm = 3\n[kvbm]\ncpu_cache_gb = 1\n", "must be a table"),
        ("[kvbm]\ncpu_cache_gb = 1\n[vllm]\nprefill = 3\n", "names a role"),
    ):
        with pytest.raises(SettingsError) as info:
            resolve(profile=_profile(tmp_path, text), env=env)
        assert message in info.value.cause
    with pytest.raises(SettingsError):  # other tables still refuse unknown keys
        resolve(profile=_profile(tmp_path, "[kvbm]\ncpu_cache_gb = 1\n[vlm]\nx = 1\n"), env=env)


# ---- the CLI: exit 2 with cause + fix, nothing started; `config` shows the sources ----


@pytest.fixture
def no_vllm(clean_env, tmp_path):
    """`up` on a host without vLLM: the parser is not read (and never imported here)."""
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "state"))
    clean_env.setattr(vllm_parser, "installed_version", lambda python: None)
    return clean_env


def test_up_refuses_owned_option_with_exit_2_and_the_fix(no_vllm, tmp_path):
    result = CliRunner().invoke(app, ["up", "--dry-run", "--", "--block-size", "64"])
    assert result.exit_code == 2, result.output
    assert "set by dynkv itself" in result.output and "DYNKV_BLOCK_SIZE" in result.output
    assert not (tmp_path / "state").exists()


def test_up_dry_run_passes_words_after_dashdash_and_says_they_were_not_checked(no_vllm):
    result = CliRunner().invoke(
        app, ["up", "--dry-run", "--json", "--device", "cpu", "--", "--max-num-seqs", "8"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    worker = next(s for s in data["services"] if s["name"] == "worker")
    assert worker["argv"][-2:] == ["--max-num-seqs", "8"]
    assert any("not checked against vLLM's parser" in n for n in data["notes"])


def test_up_max_model_len_flag_reaches_every_worker_and_conflicts_with_the_words(no_vllm):
    result = CliRunner().invoke(
        app, ["up", "--dry-run", "--json", "--device", "cpu", "--workers", "2",
              "--max-model-len", "1024"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    workers = [s for s in json.loads(result.stdout)["services"] if s["role"] == "agg"]
    assert len(workers) == 2
    for worker in workers:
        argv = vllm_part(worker["argv"])
        assert argv[argv.index("--max-model-len") + 1] == "1024"
    both = ["up", "--dry-run", "--max-model-len", "1024", "--", "--max-model-len", "2048"]
    result = CliRunner().invoke(app, both)
    assert result.exit_code == 2 and "both set it" in result.output
    result = CliRunner().invoke(app, ["up", "--dry-run", "--max-model-len", "8"])
    assert result.exit_code == 2 and "--max-model-len 16 or more" in result.output


def test_up_refuses_a_positional_word_after_dashdash(no_vllm):
    result = CliRunner().invoke(app, ["up", "--dry-run", "--", "max-num-seqs", "8"])
    assert result.exit_code == 2 and "is not an option" in result.output


def test_config_shows_engine_arguments_with_their_source(clean_env, tmp_path):
    path = _profile(tmp_path)
    result = CliRunner().invoke(app, ["config", "--json", "-p", path, "--", "--max-num-seqs", "16"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["engine_args"]
    assert {(r["name"], r["value"], r["role"], r["source"]) for r in rows} >= {
        ("max-num-seqs", "8", "all", "profile"),
        ("max-num-seqs", "4", "prefill", "profile-role"),
        ("max-num-batched-tokens", "512", "decode", "profile-role"),
        ("max-num-seqs", "16", "all", "command-line"),
    }
    text = CliRunner().invoke(app, ["config", "-p", path, "--topology", "disagg", "--", "-tp", "2"])
    assert text.exit_code == 0, text.output
    for shown in ("profile [vllm]", "profile [vllm.prefill]", "command line", "decode workers get"):
        assert shown in text.output


def test_docs_list_every_refused_option():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine-args.md").read_text()
    missing = [o for o in owned_options() if f"`{o}`" not in doc]
    assert missing == []
