"""Compare mode with the stacks injected: which configurations run and in what order, every stack
taken down whatever happens, a stack that does not come up recorded and skipped, the same
workload for each; the real launcher's environment (isolation, pass-through, tier sizes); and
`bench compare` end to end against a local fake server standing in for each stack."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from dynkv.bench import compare, runner, stacks
from dynkv.bench.compare import (
    BASELINE_LABEL,
    CompareError,
    RunningStack,
    StackConfig,
    StackFailed,
    plan_configs,
    run_compare,
)
from dynkv.bench.summary import BenchSummary, RunConfig
from dynkv.cli.main import app


class FakeLauncher:
    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.events: list[tuple[str, str]] = []
        self.fail = fail

    def check(self, config: StackConfig) -> None:
        self.events.append(("check", config.label))

    def up(self, config: StackConfig) -> RunningStack:
        self.events.append(("up", config.label))
        if config.label in self.fail:
            raise StackFailed(config.label, "worker exited with code 1\nlast log line")
        return RunningStack(f"http://{config.label}", "m", [], {"name": config.label})

    def down(self, stack: RunningStack) -> None:
        self.events.append(("down", stack.info["name"]))


def fake_measure(seen: list):
    def measure(config: StackConfig, stack: RunningStack) -> BenchSummary:
        seen.append((config.label, stack.url))
        return BenchSummary(label=config.label, requests=1, completed=1)

    return measure


# ---- which configurations ----------------------------------------------------------------------


def test_profiles_come_after_the_no_offload_baseline():
    configs = plan_configs(["gpu-cpu", "gpu-cpu-disk"], [])
    assert [(c.label, c.profile, c.kvbm) for c in configs] == [
        (BASELINE_LABEL, None, False),
        ("gpu-cpu", "gpu-cpu", True),
        ("gpu-cpu-disk", "gpu-cpu-disk", True),
    ]
    assert configs[0].topology == "agg"
    assert [c.label for c in plan_configs(["gpu-cpu"], [], baseline=False)] == ["gpu-cpu"]


def test_topologies_of_one_profile_without_a_baseline_by_default():
    configs = plan_configs([], ["agg", "disagg"], profile="gpu-cpu")
    assert [(c.label, c.profile, c.topology) for c in configs] == [
        ("agg (gpu-cpu)", "gpu-cpu", "agg"),
        ("disagg (gpu-cpu)", "gpu-cpu", "disagg"),
    ]
    with_baseline = plan_configs([], ["agg"], baseline=True)
    assert [c.kvbm for c in with_baseline] == [False, True]


@pytest.mark.parametrize(
    ("profiles", "topologies", "kw", "needle"),
    [
        (["gpu-cpu"], ["agg"], {}, "cannot be combined"),
        ([], [], {}, "nothing to compare"),
        ([], ["mesh"], {}, "unknown topology 'mesh'"),
        (["gpu-cpu", "gpu-cpu"], [], {}, "listed twice"),
        (["gpu-cpu"], [], {"profile": "gpu-cpu"}, "--profile names the one profile"),
    ],
)
def test_bad_comparisons_are_usage_errors(profiles, topologies, kw, needle):
    with pytest.raises(CompareError) as exc:
        plan_configs(profiles, topologies, **kw)
    assert needle in exc.value.cause and exc.value.fix


def test_split_values_takes_repeats_and_commas():
    assert compare.split_values(["a,b", " c ", ""]) == ["a", "b", "c"]


# ---- running them ------------------------------------------------------------------------------


def test_each_stack_up_measured_down_in_order_after_all_checks():
    launcher, seen = FakeLauncher(), []
    configs = plan_configs(["gpu-cpu"], [])
    summaries = [
        s.model_dump(mode="json") for s in run_compare(configs, launcher, fake_measure(seen))
    ]
    assert launcher.events == [
        ("check", BASELINE_LABEL),
        ("check", "gpu-cpu"),
        ("up", BASELINE_LABEL),
        ("down", BASELINE_LABEL),
        ("up", "gpu-cpu"),
        ("down", "gpu-cpu"),
    ]
    assert seen == [(BASELINE_LABEL, f"http://{BASELINE_LABEL}"), ("gpu-cpu", "http://gpu-cpu")]
    assert [s["stack"]["error"] for s in summaries] == [None, None]
    assert summaries[1]["stack"]["profile"] == "gpu-cpu" and summaries[1]["stack"]["kvbm"]


def test_a_stack_that_does_not_come_up_is_recorded_and_the_next_runs():
    launcher, seen = FakeLauncher(fail={"gpu-cpu"}), []
    configs = plan_configs(["gpu-cpu", "gpu-cpu-disk"], [], baseline=False)
    summaries = [
        s.model_dump(mode="json")
        for s in run_compare(configs, launcher, fake_measure(seen), run_config=RunConfig(seed=3))
    ]
    assert [label for label, _ in seen] == ["gpu-cpu-disk"]
    failed = summaries[0]
    assert failed["label"] == "gpu-cpu" and failed["requests"] == 0
    assert failed["ttft_ms"] == {"p50": None, "p90": None, "p99": None}
    assert failed["stack"]["error"].startswith("worker exited") and failed["config"]["seed"] == 3
    assert ("down", "gpu-cpu") not in launcher.events  # never came up: `up` cleaned after itself


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_the_stack_goes_down_when_its_run_fails_or_is_interrupted(error):
    launcher = FakeLauncher()

    def measure(config, stack):
        raise error

    with pytest.raises(type(error)):
        run_compare(plan_configs(["gpu-cpu"], [], baseline=False), launcher, measure)
    assert launcher.events[-1] == ("down", "gpu-cpu")


def test_a_bad_configuration_stops_everything_before_the_first_stack():
    class Picky(FakeLauncher):
        def check(self, config):
            if config.profile == "nope":
                raise CompareError("nope: unknown profile", "use gpu-cpu")

    launcher = Picky()
    with pytest.raises(CompareError):
        run_compare(plan_configs(["gpu-cpu", "nope"], []), launcher, fake_measure([]))
    assert not [e for e in launcher.events if e[0] == "up"]


# ---- the real launcher's settings --------------------------------------------------------------


def launcher(tmp_path, environ=None, **options) -> stacks.UpLauncher:
    return stacks.UpLauncher(stacks.StackOptions(**options), tmp_path, environ=environ or {})


def test_stacks_do_not_inherit_the_callers_settings(tmp_path):
    environ = {"PATH": "/bin", "DYN_KVBM_DISK_CACHE_GB": "8", "DYNKV_NAME": "prod", "HOME": "/h"}
    up = launcher(tmp_path, environ)
    assert up.base_env == {"PATH": "/bin", "HOME": "/h"}


def test_tier_sizes_resize_only_the_tiers_a_profile_has(tmp_path):
    up = launcher(tmp_path, cpu_cache_gb=0.5, disk_cache_gb=2, device_kv_gb=0.04, model="/m")
    gpu_cpu = up.settings_env(StackConfig("gpu-cpu", "gpu-cpu"))
    assert gpu_cpu["DYN_KVBM_CPU_CACHE_GB"] == "0.5" and "DYN_KVBM_DISK_CACHE_GB" not in gpu_cpu
    assert gpu_cpu["DYNKV_PROFILE"] == "gpu-cpu" and gpu_cpu["DYNKV_KVBM"] == "true"
    assert gpu_cpu["DYNKV_DEVICE_KV_GB"] == "0.04" and gpu_cpu["DYNKV_MODEL"] == "/m"
    assert gpu_cpu["DYN_KVBM_DISK_CACHE_DIR"] == str(tmp_path / "kvbm-disk")
    both = up.settings_env(StackConfig("gpu-cpu-disk", "gpu-cpu-disk"))
    assert both["DYN_KVBM_CPU_CACHE_GB"] == "0.5" and both["DYN_KVBM_DISK_CACHE_GB"] == "2"
    baseline = up.settings_env(StackConfig(BASELINE_LABEL, None, kvbm=False, topology="agg"))
    assert baseline["DYNKV_KVBM"] == "false" and baseline["DYNKV_DEVICE_KV_GB"] == "0.04"
    assert not [k for k in baseline if k.startswith("DYN_KVBM_")]


def test_stack_env_wins_and_is_validated(tmp_path):
    env = stacks.parse_env_pairs(["DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER=true", "A=b=c"])
    assert env == {"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true", "A": "b=c"}
    up = launcher(tmp_path, env={"DYNKV_DEVICE_KV_GB": "1"}, device_kv_gb=0.5)
    assert up.settings_env(StackConfig("x", "gpu-cpu"))["DYNKV_DEVICE_KV_GB"] == "1"
    with pytest.raises(CompareError, match="NAME=VALUE"):
        stacks.parse_env_pairs(["nope"])


def test_check_resolves_each_configuration_as_up_will(tmp_path):
    up = launcher(tmp_path, device_kv_gb=0.04)
    up.check(StackConfig("gpu-cpu", "gpu-cpu"))
    with pytest.raises(CompareError) as exc:
        launcher(tmp_path, env={"DYNKV_DEVICE_KV_GB": "lots"}).check(StackConfig("g", "gpu-cpu"))
    assert exc.value.cause.startswith("g: DYNKV_DEVICE_KV_GB='lots' is invalid")
    with pytest.raises(CompareError, match="no-such-profile"):
        up.check(StackConfig("bad", "no-such-profile"))


def test_ctrl_c_while_a_stack_starts_stops_what_it_started(tmp_path, monkeypatch):
    """subprocess.run kills `dynkv up` on KeyboardInterrupt, mid-start: its services would stay."""
    up = launcher(tmp_path)
    stopped = []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stacks.subprocess, "run", interrupted)
    monkeypatch.setattr(up, "_stop", lambda name, state_dir: stopped.append((name, state_dir)))
    with pytest.raises(KeyboardInterrupt):
        up.up(StackConfig("gpu-cpu", "gpu-cpu"))
    assert stopped == [("cmp1-gpu-cpu", tmp_path / "state")]


def test_running_stack_from_up_json(tmp_path):
    state = {
        "services": [
            {"name": "etcd", "role": "etcd", "meta": {}},
            {
                "name": "worker",
                "role": "agg",
                "meta": {"metrics_url": "http://127.0.0.1:7/metrics", "url": "http://w"},
            },
            {"name": "frontend", "role": "frontend", "meta": {"url": "http://f:1", "model": "m"}},
        ]
    }
    stack = launcher(tmp_path)._running(state, "cmp1-x", tmp_path, 12.34, {"DYNKV_KVBM": "true"})
    assert (stack.url, stack.model, stack.metrics_urls) == (
        "http://f:1",
        "m",
        ["http://127.0.0.1:7/metrics"],
    )
    assert stack.info["up_s"] == 12.3 and stack.info["workers"] == ["worker"]


# ---- the CLI, with each stack a local fake server ----------------------------------------------


@pytest.fixture
def fake_stacks(monkeypatch, fake_server):
    """UpLauncher replaced by one that 'starts' every configuration at the fake server."""
    started: list[StackConfig] = []
    real = stacks.UpLauncher

    class Launcher(FakeLauncher):
        def __init__(self, options, root, **kw):
            super().__init__(fail={"gpu-cpu-disk"})
            self.real = real(options, root, environ={})
            self.warnings: list[str] = []

        def check(self, config):
            self.real.check(config)  # the real validation, no real stacks

        def up(self, config):
            started.append(config)
            super().up(config)
            return RunningStack(fake_server, "fake-model", [], {"name": config.label})

    monkeypatch.setattr(stacks, "UpLauncher", Launcher)
    return started


def test_compare_cli_writes_one_combined_report(fake_stacks, tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app,
        ["bench", "compare", "--profiles", "gpu-cpu,gpu-cpu-disk", "--users", "2", "--rounds", "2"]
        + ["--system-tokens", "16", "--question-tokens", "8", "--answer-tokens", "2"]
        + ["--device-kv-gb", "0.04", "--stack-env", "X=1", "--seed", "5", "--out", str(out)]
        + ["--json"],
    )
    # gpu-cpu-disk does not come up: the report is still written, and the exit code says so
    assert result.exit_code == 1, result.stderr
    assert "gpu-cpu-disk" in result.stderr.splitlines()[-2]
    data = json.loads(result.stdout)
    assert [r["label"] for r in data["runs"]] == [BASELINE_LABEL, "gpu-cpu", "gpu-cpu-disk"]
    base, cpu, disk = data["runs"]
    assert (base["completed"], cpu["completed"], disk["requests"]) == (4, 4, 0)
    assert base["config"]["seed"] == cpu["config"]["seed"] == 5
    assert base["prompt_tokens"] == cpu["prompt_tokens"]  # the same prompts for each
    assert disk["stack"]["error"] and base["stack"]["kvbm"] is False
    assert data["compare"]["stack_options"]["device_kv_gb"] == 0.04
    assert data["compare"]["stack_options"]["env"] == {"X": "1"}
    assert json.loads((out / "report.json").read_text()) == data
    md = (out / "report.md").read_text()
    assert re.search(r"- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", md) and "- command: `dynkv " in md
    assert "| no offload | 4 | 0 |" in md and "gpu-cpu-disk: the stack did not come up" in md
    assert (out / "ttft.png").read_bytes()[:4] == b"\x89PNG"
    assert [c.label for c in fake_stacks] == [BASELINE_LABEL, "gpu-cpu", "gpu-cpu-disk"]


def test_compare_topology_cli_human_output(fake_stacks, tmp_path):
    result = CliRunner().invoke(
        app,
        ["bench", "compare", "--topologies", "agg", "--topologies", "disagg"]
        + ["--profile", "gpu-cpu", "-w", "long-doc", "--docs", "2", "--doc-tokens", "40"]
        + ["--concurrency", "2", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "agg (gpu-cpu)" in result.stderr and "disagg (gpu-cpu)" in result.stderr
    assert "comparison" in result.stderr and "report.md" in result.stderr
    assert [(c.topology, c.profile) for c in fake_stacks] == [
        ("agg", "gpu-cpu"),
        ("disagg", "gpu-cpu"),
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--profiles", "gpu-cpu", "--url", "http://x:1"], "an option of `dynkv bench serve`"),
        (["--profiles", "gpu-cpu", "--model", "m"], "--stack-model m"),
        (["--profiles", "gpu-cpu", "--metrics-url", "http://x/metrics"], "bench serve"),
        (["--profiles", "gpu-cpu", "--topologies", "agg"], "cannot be combined"),
        (["--topologies", "ring"], "unknown topology 'ring'"),
        (["--profiles", "no-such-profile"], "no-such-profile"),
        (["--profiles", "gpu-cpu", "--stack-env", "oops"], "NAME=VALUE"),
        (["--profiles", "gpu-cpu", "--device-kv-gb", "-1"], "pass --device-kv-gb 0 or more"),
        ([], "nothing to compare"),
    ],
)
def test_compare_usage_errors_exit_2(args, needle, fake_stacks):
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["bench", "compare", *args])
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and "fix:" in result.stderr
    assert fake_stacks == []  # nothing started


@pytest.mark.parametrize("flag", ["--compare", "--compare-topology"])
def test_serve_points_the_old_compare_flags_at_bench_compare(flag, fake_stacks):
    result = CliRunner().invoke(app, ["bench", "serve", flag, "gpu-cpu"])
    assert result.exit_code == 2 and "dynkv bench compare --profiles" in result.stderr
    assert fake_stacks == []


def test_a_stack_option_given_to_serve_names_bench_compare():
    result = CliRunner().invoke(app, ["bench", "serve", "--stack-model", "m"])
    assert result.exit_code == 2
    assert "--stack-model is an option of `dynkv bench compare`" in result.stderr


# ---- the transport axis (docs/multi-host.md#measuring-tls-overhead) ---------------------------


def test_transports_alone_bring_up_the_one_profile_per_transport():
    configs = plan_configs([], [], profile="gpu-cpu", transports=["loopback", "tls"])
    assert [(c.label, c.profile, c.transport, c.kvbm) for c in configs] == [
        ("loopback (gpu-cpu)", "gpu-cpu", "loopback", True),
        ("tls (gpu-cpu)", "gpu-cpu", "tls", True),
    ]
    default = plan_configs([], [], transports=["tls"])
    assert [c.label for c in default] == ["tls (default profile)"]


def test_transports_run_each_configuration_side_by_side():
    configs = plan_configs(["gpu-cpu"], [], transports=["loopback", "tls"])
    assert [(c.label, c.kvbm, c.transport) for c in configs] == [
        (f"{BASELINE_LABEL}, loopback", False, "loopback"),
        (f"{BASELINE_LABEL}, tls", False, "tls"),
        ("gpu-cpu, loopback", True, "loopback"),
        ("gpu-cpu, tls", True, "tls"),
    ]
    topo = plan_configs([], ["agg", "disagg"], profile="gpu-cpu", transports=["tls"])
    assert [(c.label, c.topology) for c in topo] == [
        ("agg (gpu-cpu), tls", "agg"),
        ("disagg (gpu-cpu), tls", "disagg"),
    ]
    # without --transports a configuration records no transport, as before
    assert "transport" not in plan_configs(["gpu-cpu"], [])[0].to_json()
    assert configs[1].to_json()["transport"] == "tls"


@pytest.mark.parametrize(
    ("transports", "needle"),
    [(["quic"], "unknown transport 'quic'"), (["tls", "tls"], "listed twice")],
)
def test_bad_transports_are_usage_errors(transports, needle):
    with pytest.raises(CompareError) as exc:
        plan_configs([], [], transports=transports)
    assert needle in exc.value.cause and exc.value.fix


def test_a_tls_stack_is_started_with_advertise_and_verified_against_its_ca(tmp_path):
    up = launcher(tmp_path, advertise="127.0.0.3")
    assert up.settings_env(StackConfig("t", "gpu-cpu", transport="tls"))["DYNKV_ADVERTISE"] == (
        "127.0.0.3"
    )
    assert "DYNKV_ADVERTISE" not in up.settings_env(StackConfig("l", transport="loopback"))
    default = launcher(tmp_path).settings_env(StackConfig("t", transport="tls"))
    assert default["DYNKV_ADVERTISE"] == compare.DEFAULT_ADVERTISE == "127.0.0.2"
    up.check(StackConfig("t", "gpu-cpu", transport="tls"))  # resolves as `up --advertise` will
    with pytest.raises(CompareError, match="DYNKV_ADVERTISE"):
        launcher(tmp_path, advertise="nowhere").check(StackConfig("t", transport="tls"))
    frontend = {"url": "https://127.0.0.3:9", "model": "m", "ca_cert": "/s/cmp1/tls/ca.crt"}
    state = {"services": [{"name": "frontend", "role": "frontend", "meta": frontend}]}
    stack = up._running(state, "cmp1-t", tmp_path, 1.0, {})
    assert stack.trust is not None
    assert stack.trust.record() == {
        "ca_cert": "/s/cmp1/tls/ca.crt",
        "ca_cert_from": "deployment cmp1-t",
    }
    opts = compare.stack_options(runner.RunOptions(url="", model=""), stack)
    assert (opts.url, opts.model, opts.trust) == ("https://127.0.0.3:9", "m", stack.trust)


def test_compare_transports_cli_labels_each_run(fake_stacks, tmp_path):
    result = CliRunner().invoke(
        app,
        ["bench", "compare", "--transports", "loopback,tls", "--profile", "gpu-cpu"]
        + ["--users", "1", "--rounds", "1", "--answer-tokens", "2", "--out", str(tmp_path)]
        + ["--json"],
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["label"] for r in data["runs"]] == ["loopback (gpu-cpu)", "tls (gpu-cpu)"]
    assert [r["stack"]["transport"] for r in data["runs"]] == ["loopback", "tls"]
    assert data["compare"]["stack_options"]["advertise"] == "127.0.0.2"
    assert [c["transport"] for c in data["compare"]["configurations"]] == ["loopback", "tls"]
    assert [c.transport for c in fake_stacks] == ["loopback", "tls"]


def test_a_comparison_without_transports_keeps_its_report_shape(fake_stacks, tmp_path):
    result = CliRunner().invoke(
        app,
        ["bench", "compare", "--topologies", "agg", "--users", "1", "--rounds", "1"]
        + ["--answer-tokens", "2", "--out", str(tmp_path), "--json"],
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert "transport" not in data["runs"][0]["stack"]
    assert "advertise" not in data["compare"]["stack_options"]
    assert data["compare"]["stack_options"]["model"] is None  # the other keys as they were
    assert "transport" not in data["compare"]["configurations"][0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--transports", "loopback,quic"], "unknown transport 'quic'"),
        (["--profiles", "gpu-cpu", "--advertise-addr", "127.0.0.3"], "--transports tls"),
        (["--routers", "kv", "--transports", "tls"], "--routers compares policies on one fleet"),
        (["--transports", "tls", "--advertise-addr", "0.0.0.0"], "DYNKV_ADVERTISE"),
    ],
)
def test_compare_transports_usage_errors_exit_2(args, needle, fake_stacks):
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["bench", "compare", *args])
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and "fix:" in result.stderr
    assert fake_stacks == []  # nothing started
