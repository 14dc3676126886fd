"""Settings resolution: precedence, sources, every variable's parsing, and every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynkv.kvbm.config import KvbmSettings, blocks_for
from dynkv.settings import SettingsError, list_profiles, load_profile, resolve
from dynkv.settings.profiles import available_profile_names, profiles_dir

BASE = {"DYN_KVBM_CPU_CACHE_GB": "1"}  # one tier, so resolution does not stop at "no tier"


def write_profile(tmp_path: Path, body: str, name: str = "mine") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(body)
    return path


# ---- precedence: every pair of sources -------------------------------------------------------

PROFILE_BODY = '[kvbm]\ncpu_cache_gb = 3\n[deployment]\ntopology = "disagg"\n'


@pytest.mark.parametrize(
    "flag, env, in_profile, expected, source",
    [
        (7.0, "5", True, 7.0, "flag"),  # flag > env (> profile)
        (7.0, None, True, 7.0, "flag"),  # flag > profile
        (7.0, None, False, 7.0, "flag"),  # flag > default
        (None, "5", True, 5.0, "env"),  # env > profile
        (None, "5", False, 5.0, "env"),  # env > default
        (None, None, True, 3.0, "profile"),  # profile > default
        (None, None, False, None, "default"),
    ],
)
def test_precedence_for_every_pair(tmp_path, flag, env, in_profile, expected, source):
    body = PROFILE_BODY if in_profile else "[kvbm]\ndisk_cache_gb = 1\n"
    prof = write_profile(tmp_path, body)
    environ = {"DYN_KVBM_CPU_CACHE_GB": env} if env is not None else {}
    r = resolve(profile=str(prof), kvbm_flags={"cpu_cache_gb": flag}, env=environ)
    assert r.kvbm.cpu_cache_gb == expected
    assert r.settings["DYN_KVBM_CPU_CACHE_GB"].source == source
    assert r.settings["DYN_KVBM_CPU_CACHE_GB"].value == expected


@pytest.mark.parametrize(
    "flag, env, in_profile, expected, source",
    [
        ("agg", "disagg", True, "agg", "flag"),
        (None, "agg", True, "agg", "env"),
        (None, None, True, "disagg", "profile"),
        (None, None, False, "agg", "default"),
    ],
)
def test_deployment_precedence(tmp_path, flag, env, in_profile, expected, source):
    body = PROFILE_BODY if in_profile else "[kvbm]\ncpu_cache_gb = 1\n"
    prof = write_profile(tmp_path, body)
    environ = {"DYNKV_TOPOLOGY": env} if env else {}
    r = resolve(profile=str(prof), deployment_flags={"topology": flag}, env=environ)
    assert r.deployment.topology == expected
    assert r.settings["DYNKV_TOPOLOGY"].source == source


def test_profile_choice_precedence():
    assert resolve(env=BASE).profile.name == "gpu-cpu-disk"
    assert resolve(env={**BASE, "DYNKV_PROFILE": "gpu-cpu"}).profile_source == "env"
    r = resolve(profile="gpu-disk", env={**BASE, "DYNKV_PROFILE": "gpu-cpu"})
    assert (r.profile.name, r.profile_source) == ("gpu-disk", "flag")


# ---- every variable parsed --------------------------------------------------------------------

GOOD = [
    ("DYN_KVBM_CPU_CACHE_GB", "2.5", "cpu_cache_gb", 2.5),
    ("DYN_KVBM_DISK_CACHE_GB", "0", "disk_cache_gb", 0.0),
    ("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "64", "cpu_cache_override_num_blocks", 64),
    ("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "128", "disk_cache_override_num_blocks", 128),
    ("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "true", "disable_disk_offload_filter", True),
    ("DYN_KVBM_DISK_ZEROFILL_FALLBACK", "1", "disk_zerofill_fallback", True),
    ("DYN_KVBM_DISK_DISABLE_O_DIRECT", "YES", "disk_disable_o_direct", True),
    ("DYN_KVBM_METRICS", "False", "metrics", False),
    ("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "30", "leader_worker_init_timeout_secs", 30.0),
    ("DYN_KVBM_DISK_READ_TIMEOUT_MS", "250", "disk_read_timeout_ms", 250.0),
    ("DYN_KVBM_METRICS_PORT", "7001", "metrics_port", 7001),
    ("DYN_KVBM_DISK_CACHE_DIR", "/var/tmp/kv", "disk_cache_dir", Path("/var/tmp/kv")),
    ("DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS", "1.5", "cache_stats_log_interval_secs", 1.5),
    ("DYN_KVBM_DISK_OFFLOAD_FILTER_DECAY_SECS", "60", "disk_offload_filter_decay_secs", 60.0),
    ("DYN_KVBM_DISK_OFFLOAD_FILTER_MAX_ENTRIES", "10", "disk_offload_filter_max_entries", 10),
    ("DYN_KVBM_HANDOFF_DIR", "/dev/shm/dynkv-x", "handoff_dir", Path("/dev/shm/dynkv-x")),
    ("DYN_KVBM_HANDOFF_POOL", "prefill-1", "handoff_pool", "prefill-1"),
    ("DYN_KVBM_HANDOFF_POOLS", "prefill-0, prefill-1", "handoff_pools", "prefill-0,prefill-1"),
    ("DYN_KVBM_HANDOFF_GB", "0.5", "handoff_gb", 0.5),
    ("DYN_KVBM_HANDOFF_TTL_SECS", "30", "handoff_ttl_secs", 30.0),
    ("DYN_KVBM_ONBOARD_POLICY", "always", "onboard_policy", "always"),
    ("DYN_KVBM_ONBOARD_MARGIN", "0.8", "onboard_margin", 0.8),
    ("DYN_KVBM_ONBOARD_PROBE_SECS", "10", "onboard_probe_secs", 10.0),
    ("DYN_KVBM_HOST_VERIFY", "always", "host_verify", "always"),
    ("DYN_KVBM_HOST_PREFAULT", "false", "host_prefault", False),
]


@pytest.mark.parametrize("var, raw, field, expected", GOOD, ids=[g[0] for g in GOOD])
def test_every_kvbm_variable_parses(var, raw, field, expected):
    r = resolve(env={**BASE, var: raw})
    assert getattr(r.kvbm, field) == expected
    assert r.settings[var].source == "env"
    # and the runtime inside vLLM reads the same variable the same way
    assert getattr(KvbmSettings.model_validate({field: raw}), field) == expected


def test_every_kvbm_field_is_covered_by_the_table_above():
    assert {g[2] for g in GOOD} | {"metrics_host"} == set(KvbmSettings.model_fields)


@pytest.mark.parametrize(
    "raw, expected",
    [(v, True) for v in ("true", "TRUE", "True", "1", "yes", "Yes")]
    + [(v, False) for v in ("false", "FALSE", "False", "0", "no", "NO")],
)
def test_booleans_mean_what_they_say(raw, expected):
    assert resolve(env={**BASE, "DYN_KVBM_METRICS": raw}).kvbm.metrics is expected


BAD = [
    ("DYN_KVBM_CPU_CACHE_GB", "abc", "decimal GB"),
    ("DYN_KVBM_CPU_CACHE_GB", "-1", "decimal GB"),
    ("DYN_KVBM_DISK_CACHE_GB", "nan", "decimal GB"),
    ("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "1.5", "whole number"),
    ("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "-4", "whole number"),
    ("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "maybe", "boolean"),
    ("DYN_KVBM_DISK_ZEROFILL_FALLBACK", "2", "boolean"),
    ("DYN_KVBM_DISK_DISABLE_O_DIRECT", "si", "boolean"),
    ("DYN_KVBM_METRICS", "enabled", "boolean"),
    ("DYN_KVBM_HOST_PREFAULT", "lazy", "boolean"),
    ("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "0", "seconds"),
    ("DYN_KVBM_METRICS_PORT", "70000", "TCP port"),
    ("DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS", "-5", "seconds"),
    ("DYN_KVBM_HANDOFF_POOL", "../prefill-0", "no dots or slashes"),
    ("DYN_KVBM_HANDOFF_POOLS", "prefill-0,prefill-0", "pool ids separated by commas"),
    ("DYNKV_TOPOLOGY", "mesh", "agg or disagg"),
    ("DYNKV_FRONTEND_PORT", "http", "TCP port"),
    ("DYNKV_INFRA", "k8s", "embedded, docker or external"),
    ("DYNKV_NAME", "../etc", "letters, digits"),
    ("DYNKV_BLOCK_SIZE", "0", "whole number"),
]


@pytest.mark.parametrize("var, raw, expect", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_values_name_the_variable_the_value_and_what_is_expected(var, raw, expect):
    with pytest.raises(SettingsError) as info:
        resolve(env={**BASE, var: raw})
    assert var in info.value.cause
    assert repr(raw) in info.value.cause
    assert expect in info.value.cause
    assert var in info.value.fix and "\n" not in info.value.cause


def test_empty_variable_counts_as_unset():
    r = resolve(env={**BASE, "DYN_KVBM_METRICS_PORT": ""})
    assert r.kvbm.metrics_port == 6880 and r.settings["DYN_KVBM_METRICS_PORT"].source == "default"


def test_api_key_is_never_shown():
    r = resolve(env={**BASE, "DYNKV_API_KEY": "sk-very-secret"})
    assert r.deployment.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in str(r.to_json())


# ---- tiers and sizing -------------------------------------------------------------------------


def test_no_tier_at_all_is_an_error():
    with pytest.raises(SettingsError, match="no KVBM tier"):
        resolve(profile="gpu-disk", env={"DYN_KVBM_DISK_CACHE_GB": "0"})


def test_override_blocks_win_over_gb():
    r = resolve(env={"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "9"})
    assert r.kvbm.host_blocks(bytes_per_block=1000) == 9
    assert blocks_for(1.0, 0, 1_000_000) == 1000  # decimal GB, as Dynamo
    assert blocks_for(None, None, 10) == 0


def test_filter_only_when_both_tiers_exist():
    both = resolve(profile="gpu-cpu-disk", env={})
    assert both.kvbm.disk_filter_enabled
    off = resolve(profile="gpu-cpu-disk", env={"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1"})
    assert not off.kvbm.disk_filter_enabled
    assert not resolve(profile="gpu-disk", env={}).kvbm.disk_filter_enabled


def test_worker_env_round_trips_through_the_runtime_parser():
    r = resolve(env={**BASE, "DYN_KVBM_METRICS": "yes", "DYN_KVBM_DISK_CACHE_GB": "0.5"})
    env = r.worker_env()
    assert env["DYN_KVBM_METRICS"] == "true" and env["DYN_KVBM_CPU_CACHE_GB"] == "1"
    again = resolve(profile="gpu-cpu", env=env).kvbm
    assert again == r.kvbm


# ---- profiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu-cpu", "gpu-cpu-disk", "gpu-disk"])
def test_each_shipped_profile_loads(name):
    prof = load_profile(name)
    assert prof.description
    r = resolve(profile=name, env={})
    assert r.profile.name == name


def test_profile_tiers_and_experimental_flag():
    by_name = {p.name: p for p in list_profiles()}
    assert by_name["gpu-cpu"].tiers == ["G1", "G2"]
    assert by_name["gpu-cpu-disk"].tiers == ["G1", "G2", "G3"]
    assert by_name["gpu-disk"].tiers == ["G1", "G3"] and by_name["gpu-disk"].experimental
    assert set(available_profile_names()) >= {"gpu-cpu", "gpu-cpu-disk", "gpu-disk"}
    assert profiles_dir().is_dir()


def test_profile_by_path(tmp_path):
    prof = write_profile(tmp_path, "[kvbm]\ncpu_cache_gb = 0.25\n")
    assert resolve(profile=str(prof), env={}).kvbm.cpu_cache_gb == 0.25


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(SettingsError) as info:
        load_profile("gpu-cpu-dsk")
    assert "gpu-cpu-disk" in info.value.cause and "gpu-disk" in info.value.cause


@pytest.mark.parametrize("name", ["9" * 400, "/tmp/" + "x" * 400 + ".toml"])
def test_a_profile_name_too_long_for_the_file_system_is_unknown(name):
    # Path.is_file raises ENAMETOOLONG on Python 3.11 instead of answering False (found by
    # test_cli_fuzz's environment values: DYNKV_PROFILE=999…)
    with pytest.raises(SettingsError, match="profile"):
        load_profile(name)


def test_malformed_toml(tmp_path):
    prof = write_profile(tmp_path, "[kvbm\ncpu_cache_gb = 1\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_profile(str(prof))


def test_unknown_key_in_profile_suggests_the_right_one(tmp_path):
    prof = write_profile(tmp_path, "[kvbm]\ncpu_cache_gbs = 1\n")
    with pytest.raises(SettingsError) as info:
        load_profile(str(prof))
    assert "cpu_cache_gbs" in info.value.cause and "cpu_cache_gb" in info.value.fix


def test_unknown_top_level_key(tmp_path):
    prof = write_profile(tmp_path, "tiers = 3\n")
    with pytest.raises(SettingsError, match="unknown key 'tiers'"):
        load_profile(str(prof))


def test_bad_value_in_profile_names_file_and_key(tmp_path):
    prof = write_profile(tmp_path, '[kvbm]\ncpu_cache_gb = "lots"\n')
    with pytest.raises(SettingsError) as info:
        resolve(profile=str(prof), env={})
    assert "[kvbm] cpu_cache_gb" in info.value.cause and str(prof) in info.value.cause


# ---- unknown variables ------------------------------------------------------------------------


def test_unknown_kvbm_variable_warns_with_closest_name():
    r = resolve(env={**BASE, "DYN_KVBM_CPU_CACHE_G": "1"})
    assert r.warnings == [
        "DYN_KVBM_CPU_CACHE_G is not a dynkv KVBM variable and is ignored; "
        "did you mean DYN_KVBM_CPU_CACHE_GB?"
    ]


def test_unrelated_dynkv_variables_are_ignored():
    r = resolve(env={**BASE, "DYNKV_INJECTED_BY_K8S": "x"})
    assert r.warnings == []
