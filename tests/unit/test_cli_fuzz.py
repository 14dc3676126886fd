"""Bad input through the CLI: fuzzed environment values and profile files.

Expected behaviour, asserted for every generated case: `dynkv config --json`, `dynkv up --dry-run
--json` and `dynkv status --json` either work (exit 0; status: 1, no deployment) or stop with the
house error — one `error:` line naming the cause, one `fix:` line, exit 2 — and never a traceback
or an exception escaping the command. Values: every `DYN_KVBM_*` / `DYNKV_*` setting given random
text, numbers as text (huge, negative, NaN, inf, hex, padded), booleans in odd spellings, unicode;
profile files built from valid TOML with wrong keys, types and values, plus broken TOML, random
bytes and invalid UTF-8. A few cases run the real console in a subprocess with environment bytes
that are not UTF-8 (what Python then sees are lone surrogates).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.kvbm.config import KvbmSettings
from dynkv.settings.deployment import DeploymentSettings

runner = CliRunner()
KVBM_VARS = sorted(KvbmSettings.env_name(f) for f in KvbmSettings.model_fields)
DEPLOYMENT_VARS = sorted(DeploymentSettings.env_name(f) for f in DeploymentSettings.model_fields)
ALL_VARS = [*KVBM_VARS, *DEPLOYMENT_VARS, "DYNKV_PROFILE"]
# set by the test itself (a private state dir); fuzzing them would write outside the sandbox
SANDBOX_VARS = {"DYNKV_STATE_DIR", "DYN_KVBM_DISK_CACHE_DIR", "DYN_KVBM_HANDOFF_DIR"}
FUZZED_VARS = [v for v in ALL_VARS if v not in SANDBOX_VARS]

numberish = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.sampled_from(
        ["1e308", "1e-320", "-0", "nan", "NaN", "inf", "-inf", "0x10", " 5 ", "1_000", "4GB", ""]
        + ["9" * 400, "1e999", "0.0000001", "+3", "٣", "１"]  # Arabic-Indic and full-width digits
    ),
)
boolish = st.sampled_from(["true", "FALSE", "Yes", "no", "1", "0", "on", "off", "", "maybe", "ü"])
env_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)
env_values = st.one_of(numberish, boolish, env_text)


def _plausible(var: str) -> st.SearchStrategy[str]:
    """Values of the variable's own type, often valid, so that fuzzing also reaches the plan."""
    model = KvbmSettings if var.startswith("DYN_KVBM_") else DeploymentSettings
    field = model.model_fields.get(
        var.split("_", 2)[-1].lower()
        if model is KvbmSettings
        else var.removeprefix("DYNKV_").lower()
    )
    kind = repr(field.annotation) if field is not None else "str"
    if "bool" in kind:
        return boolish
    if "int" in kind:
        return st.integers(-5, 70_000).map(str)
    if "float" in kind:
        return st.floats(-1, 50, allow_nan=False).map(lambda x: f"{x:.3g}")
    if "Topology" in kind:
        return st.sampled_from(["agg", "disagg", "AGG", "both"])
    if "Device" in kind:
        return st.sampled_from(["auto", "cpu", "cuda", "tpu"])
    if "Infra" in kind:
        return st.sampled_from(["embedded", "external", "docker", "cloud"])
    if "Router" in kind:
        return st.sampled_from(["round_robin", "least_outstanding", "random"])
    return env_text


def _value(var: str) -> st.SearchStrategy[str]:
    return st.one_of(_plausible(var), _plausible(var), env_values)


envs = st.lists(st.sampled_from(FUZZED_VARS), max_size=5, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: _value(name) for name in names})
)


@contextlib.contextmanager
def sandbox(env: dict[str, str]) -> Iterator[Path]:
    """A clean environment (no DYNKV_*/DYN_KVBM_* from the developer's shell) plus `env`, private
    XDG dirs and state dir, and a private cwd, restored afterwards."""
    saved = dict(os.environ)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="dynkv-fuzz-") as tmp:
        try:
            for key in list(os.environ):
                if key.upper().startswith(("DYNKV_", "DYN_KVBM_")):
                    del os.environ[key]
            os.environ.update(
                {
                    "XDG_STATE_HOME": f"{tmp}/state",
                    "XDG_CACHE_HOME": f"{tmp}/cache",
                    "DYNKV_STATE_DIR": f"{tmp}/state/dynkv",
                    "DYN_KVBM_DISK_CACHE_DIR": f"{tmp}/g3",
                }
            )
            os.environ.update(env)
            os.chdir(tmp)
            yield Path(tmp)
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved)


def check(result, ok: tuple[int, ...] = (0,)) -> None:
    """Exit `ok`, or the house error with exit 2; never a traceback."""
    out = (result.stdout or "") + (result.stderr or "")
    assert "Traceback" not in out, out[-3000:]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{type(result.exception).__name__} escaped: {result.exception}")
    assert result.exit_code in (*ok, 2), (result.exit_code, out[-2000:])
    event(f"exit {result.exit_code}")
    if result.exit_code == 2:
        assert "error:" in result.stderr and "fix:" in result.stderr, result.stderr[-2000:]


SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@SETTINGS
@given(env=envs)
def test_fuzzed_environment_values(env):
    with sandbox(env):
        check(runner.invoke(app, ["config", "--json"]))
        check(runner.invoke(app, ["up", "--dry-run", "--json", "--device", "cpu"]))
        check(runner.invoke(app, ["status", "--json"]), ok=(1,))


# ---- profile files -----------------------------------------------------------------------------

toml_keys = st.sampled_from(
    [*KvbmSettings.model_fields, *DeploymentSettings.model_fields, "nope", "cpu-cache-gb", "é"]
)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


toml_values = st.recursive(
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=20),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=5,
)


def _toml_plausible(model, name: str) -> st.SearchStrategy:
    kind = repr(model.model_fields[name].annotation)
    if "bool" in kind:
        return st.booleans()
    if "int" in kind:
        return st.integers(-5, 70_000)
    if "float" in kind:
        return st.floats(-1, 50, allow_nan=False) | st.integers(0, 20)
    plausible = {"topology": ["agg", "disagg"], "device": ["cpu", "auto"], "router": ["x"]}
    return st.sampled_from(plausible.get(name, ["x"])) | st.text(max_size=12)


def _section(model) -> st.SearchStrategy[dict]:
    names = st.lists(st.sampled_from(sorted(model.model_fields)), max_size=4, unique=True)
    typed = names.flatmap(
        lambda ns: st.fixed_dictionaries(
            {n: _toml_plausible(model, n) | toml_values for n in ns if n not in SANDBOX_FIELDS}
        )
    )
    return st.one_of(typed, typed, typed, st.dictionaries(toml_keys, toml_values, max_size=3))


SANDBOX_FIELDS = {"state_dir", "disk_cache_dir", "handoff_dir"}
profiles = st.fixed_dictionaries(
    {},
    optional={
        "description": st.text(max_size=20) | toml_values,
        "experimental": st.booleans() | toml_values,
        "kvbm": _section(KvbmSettings),
        "deployment": _section(DeploymentSettings),
    },
)


def _with_a_tier(profile: dict) -> dict:
    """Most real profiles name a tier; without one every case stops at the same error."""
    kvbm = profile.get("kvbm")
    kvbm = dict(kvbm) if isinstance(kvbm, dict) else {}
    kvbm.setdefault("cpu_cache_gb", 1)
    return {**profile, "kvbm": kvbm}


profiles = st.one_of(
    profiles.map(_with_a_tier),
    profiles,
    st.tuples(profiles, toml_values).map(lambda t: {**t[0], "extra": t[1]}),  # unknown key
)


def _render(profile: dict) -> bytes:
    lines = []
    for key, value in profile.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in profile.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f'"{k}" = {_toml_value(v)}' for k, v in value.items()]
    return "\n".join(lines).encode()


profile_bytes = st.one_of(
    profiles.map(_render),
    profiles.map(_render),
    profiles.map(_render).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
    st.binary(max_size=80),
    st.sampled_from(
        [
            b"[kvbm]\ncpu_cache_gb = \xff\n",
            b'description = "\xff\xfe"\n',
            b"[kvbm\n",
            b"kvbm = 3\n",
            b"[kvbm]\ncpu_cache_gb = 1e400\n",
            b"[deployment]\nname = '../../etc'\n",
            b"[deployment]\nfrontend_port = 99999999999999999999\n",
            b"\xef\xbb\xbf[kvbm]\ncpu_cache_gb = 1\n",
        ]
    ),
)


@SETTINGS
@given(body=profile_bytes)
def test_fuzzed_profile_files(body):
    with sandbox({}) as tmp:
        path = tmp / "fuzz.toml"
        path.write_bytes(body)
        check(runner.invoke(app, ["config", "--json", "--profile", str(path)]))
        check(runner.invoke(app, ["up", "--dry-run", "--json", "--profile", str(path)]))


@pytest.mark.parametrize(
    "name, value",
    [
        (b"DYN_KVBM_CPU_CACHE_GB", b"\xff"),
        (b"DYNKV_NAME", b"caf\xe9"),
        (b"DYNKV_MODEL", b"\xc3\x28"),
        (b"DYNKV_PROFILE", b"\xfe\xff"),
    ],
)
def test_environment_bytes_that_are_not_utf8(tmp_path, name, value):
    env = {
        k.encode(): v.encode()
        for k, v in os.environ.items()
        if not k.upper().startswith(("DYNKV_", "DYN_KVBM_"))
    }
    env |= {
        b"XDG_STATE_HOME": str(tmp_path / "state").encode(),
        b"XDG_CACHE_HOME": str(tmp_path / "cache").encode(),
        name: value,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "dynkv.cli.main", "config"],
        env=env,
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode in (0, 2), err[-2000:]
    if proc.returncode == 2:
        assert "error:" in err and "fix:" in err
