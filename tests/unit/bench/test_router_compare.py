"""`bench serve --compare-router` against a real local HTTP server standing in for the frontend
(`frontend_mimic`): each policy runs the same workload with its header, the affinity key and a
cache salt of its own; the router's numbers are the differences of the frontend's counters over
each run; the combined report, its markdown and the CLI's usage errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from frontend_mimic import FrontendMimic, Serving
from typer.testing import CliRunner

from dynkv import router_metrics
from dynkv.bench import compare, report, router_compare, runner, stacks, workloads
from dynkv.bench.summary import BenchSummary, CompareReport, RunConfig
from dynkv.cli.main import app
from dynkv.ports import free_port

cli = CliRunner(env={"COLUMNS": "300"})
POLICIES = ["kv", "round_robin", "least_outstanding", "session"]


def run_all(url: str, work: workloads.Workload, policies=POLICIES, api_key=None):
    options = runner.RunOptions(url=url, model="fake-model", api_key=api_key)
    stack = compare.RunningStack(url, "fake-model")
    cfg = RunConfig(workload=work.name)
    return router_compare.run_policies(policies, stack, work, None, options, cfg, run_id="t1")


def test_each_policy_runs_the_same_workload_with_its_header_session_and_own_salt():
    mimic = FrontendMimic()
    work = workloads.multi_turn(
        users=3, rounds=4, system_tokens=40, question_tokens=4, answer_tokens=2,
        per_user_system=True,
    )  # fmt: skip
    with Serving(mimic) as url:
        summaries = run_all(url, work)
    n = len(work.requests)
    assert [s.label for s in summaries] == POLICIES and len(mimic.seen) == 4 * n
    for i, policy in enumerate(POLICIES):
        seen = mimic.seen[i * n : (i + 1) * n]
        assert {s.router for s in seen} == {policy}
        assert {s.salt for s in seen} == {f"dynkv-bench-t1-{policy}"}  # fresh per policy run
        assert [s.session for s in seen] == [spec.session for spec in work.requests]
        summary = summaries[i]
        assert summary.completed == n and summary.config.router == policy
        assert summary.config.cache_salt == f"dynkv-bench-t1-{policy}"
        assert summary.config.session_header is True
        assert [r.round for r in summary.rounds] == [1, 2, 3, 4]
        assert summary.later_rounds_ttft_ms.p50 is not None
    # no run profited from another's cache: every policy's round 1 found nothing cached
    for i in range(4):
        assert all(s.cached == 0 for s in mimic.seen[i * n : i * n + 3])

    kv, rr, lo, session = (s.router for s in summaries)
    # kv and session keep each user on the worker holding its prompt: every later round hits
    # (the mimic's cached tokens are the prompt's words)
    words = sum(len(spec.system.split()) for spec in work.requests[:3])
    assert kv.actual_cached_tokens == 3 * words and session.accuracy is None
    assert kv.predicted_cached_tokens == kv.actual_cached_tokens and kv.accuracy == 1.0
    # the others predict nothing (the frontend counts kv-routed requests only): no accuracy
    assert rr.accuracy is None and rr.predicted_cached_tokens == rr.actual_cached_tokens == 0
    for stats in (kv, rr, lo, session):
        assert stats.error is None and stats.load_source == "dynkv_router_routed_total"
        assert sum(w.requests for w in stats.workers) == n
        assert sum(w.share for w in stats.workers) == pytest.approx(1.0)
        assert stats.nats_fallbacks == 0 and stats.index_blocks is not None
    assert {w.worker: w.share for w in rr.workers} == {"agg-0": 0.5, "agg-1": 0.5}
    assert rr.decisions == {"round_robin:turn": n}
    assert lo.decisions == {"least_outstanding:fewest_outstanding": n}
    assert sum(kv.decisions.values()) == n and "kv:kv_hit" in kv.decisions


def test_shared_prefix_session_affinity_piles_every_request_on_one_worker():
    mimic = FrontendMimic()
    work = workloads.shared_prefix(users=6, rounds=2, system_tokens=30, question_tokens=4)
    with Serving(mimic) as url:
        kv, session, rr = run_all(url, work, ["kv", "session", "round_robin"])
    shares = sorted(w.share for w in session.router.workers)
    assert session.router.max_share == 1.0 and shares[-1] == 1.0 and sum(shares) == 1.0
    assert rr.router.max_share == 0.5
    assert {s.session for s in mimic.seen} == {"prefix-0"}
    # the mimic's kv sends every request to the worker holding the prefix: only the first misses
    words = len(work.requests[0].system.split())
    assert kv.router.actual_cached_tokens == (len(work.requests) - 1) * words


def test_without_router_counters_accuracy_is_na_and_load_comes_from_finished_requests():
    mimic = FrontendMimic(router_metrics=False)
    work = workloads.shared_prefix(users=2, rounds=1, system_tokens=10, question_tokens=2)
    with Serving(mimic) as url:
        (kv,) = run_all(url, work, ["kv"])
    stats = kv.router
    assert stats.accuracy is None and stats.predicted_cached_tokens is None
    assert stats.actual_cached_tokens is None and stats.nats_fallbacks is None
    assert stats.load_source == "dynkv_frontend_requests_total"
    assert sum(w.requests for w in stats.workers) == 2
    assert report.fmt_ratio(stats.accuracy) == "n/a"


def test_a_frontend_with_an_api_key_is_read_with_it():
    mimic = FrontendMimic(api_key="sekret")
    work = workloads.shared_prefix(users=1, rounds=1, system_tokens=10, question_tokens=2)
    with Serving(mimic) as url:
        (ok,) = run_all(url, work, ["kv"], api_key="sekret")
    assert ok.completed == 1 and ok.router.error is None and ok.router.workers


def test_unreadable_frontend_metrics_are_an_error_in_the_report_not_a_crash():
    reading = router_compare.read_router(f"http://127.0.0.1:{free_port()}/metrics", None, 1.0)
    assert isinstance(reading, str) and "ConnectError" in reading
    stats = router_compare.router_stats("kv", "s", "u", reading, reading)
    assert stats.error == reading and stats.workers == [] and stats.accuracy is None
    line = report.router_markdown([BenchSummary(label="kv", router=stats)])[-1]
    assert "frontend metrics: ConnectError" in line and "| n/a |" in line


def test_policies_are_parsed_once_each_from_known_names():
    assert router_compare.parse_policies(["kv,round_robin", "session"]) == [
        "kv",
        "round_robin",
        "session",
    ]
    for bad, needle in ((["kv,random"], "'random'"), (["kv,kv"], "twice"), ([""], "no policy")):
        with pytest.raises(compare.CompareError) as exc:
            router_compare.parse_policies(bad)
        assert needle in str(exc.value) and exc.value.fix


def test_cli_json_markdown_and_plot(tmp_path):
    mimic = FrontendMimic()
    md, png = tmp_path / "routers.md", tmp_path / "ttft.png"
    with Serving(mimic) as url:
        result = cli.invoke(
            app,
            [
                "bench", "serve", "--url", f"{url}/v1", "-w", "shared-prefix", "--users", "4",
                "--rounds", "2", "--system-tokens", "20", "--question-tokens", "4",
                "--answer-tokens", "2", "--compare-router", "kv,session", "--compare-router",
                "round_robin", "--markdown", str(md), "--plot", str(png), "--json",
            ],
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = CompareReport.model_validate(json.loads(result.stdout))
    assert [r.label for r in data.runs] == ["kv", "session", "round_robin"]
    assert data.compare is not None and data.compare.command.startswith("dynkv ")
    salts = [c["cache_salt"] for c in data.compare.configurations]
    assert len(set(salts)) == 3 and all(s.startswith("dynkv-bench-") for s in salts)
    raw = json.loads(result.stdout)["runs"][0]
    assert raw["router"]["policy"] == "kv" and raw["config"]["router"] == "kv"
    assert "stack" not in raw
    text = md.read_text()
    assert "| policy | TTFT p50 ms |" in text and "| session |" in text
    assert "TTFT p50 / p90 / p99 (ms) per round" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Counter(s.router for s in mimic.seen) == {"kv": 8, "session": 8, "round_robin": 8}


def test_each_repeat_starts_one_policy_later():
    assert router_compare.schedule(["kv", "rr", "s"], 1) == [(1, "kv"), (1, "rr"), (1, "s")]
    assert [p for _, p in router_compare.schedule(["kv", "rr", "s"], 4)] == [
        "kv", "rr", "s", "rr", "s", "kv", "s", "kv", "rr", "kv", "rr", "s",
    ]  # fmt: skip


def test_repeated_policies_get_salts_and_labels_of_their_own_and_medians(tmp_path):
    mimic = FrontendMimic()
    md = tmp_path / "routers.md"
    with Serving(mimic) as url:
        result = cli.invoke(
            app,
            [
                "bench", "serve", "--url", url, "-w", "multi-turn", "--users", "3",
                "--rounds", "3", "--system-tokens", "20", "--question-tokens", "4",
                "--answer-tokens", "2", "--compare-router", "kv,round_robin", "--repeat", "3",
                "--markdown", str(md), "--json",
            ],
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = CompareReport.model_validate(json.loads(result.stdout))
    assert [r.label for r in data.runs] == [
        "kv #1", "round_robin #1", "round_robin #2", "kv #2", "kv #3", "round_robin #3",
    ]  # fmt: skip
    assert [r.router.policy for r in data.runs if r.router] == [
        "kv", "round_robin", "round_robin", "kv", "kv", "round_robin",
    ]  # fmt: skip
    salts = {r.config.cache_salt for r in data.runs}
    assert len(salts) == 6  # no repeat reuses an earlier run's cache
    assert Counter(s.salt for s in mimic.seen) == {salt: 9 for salt in salts}
    kv, rr = data.repeats
    assert (kv.policy, kv.runs, rr.policy, rr.runs) == ("kv", 3, "round_robin", 3)
    runs_kv = [r.later_rounds_ttft_ms.p50 for r in data.runs if r.label.startswith("kv")]
    assert kv.later_rounds_p50_ms == sorted(runs_kv)[1]  # the median of three
    assert kv.later_rounds_p50_vs_first == 1.0
    assert rr.later_rounds_p50_vs_first == round(rr.later_rounds_p50_ms / kv.later_rounds_p50_ms, 3)
    assert "Medians over repeats (ratios to kv)" in md.read_text()
    assert "| round_robin | 3 |" in md.read_text()


def test_a_comparison_without_repeats_keeps_its_report_shape():
    assert "repeats" not in CompareReport().model_dump(mode="json")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--compare-router", "kv,fastest"], "unknown routing policy 'fastest'"),
        (["--compare-router", "kv", "--label", "x"], "--label names one run"),
        (
            ["-w", "long-doc", "--affinity", "user"],
            "--affinity applies to --workload shared-prefix",
        ),
        (["--per-user-system", "-w", "shared-prefix"], "--per-user-system applies"),
        (["--repeat", "2"], "--repeat repeats a router comparison"),
    ],
)
def test_cli_usage_errors(args, needle):
    result = cli.invoke(app, ["bench", "serve", *args])
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and "fix:" in result.stderr


def test_plain_serve_runs_keep_their_report_shape():
    summary = report.summarize(report.LabelledRun("x", runner.RunResult([], 0.0)))
    data = summary.model_dump(mode="json")
    assert "router" not in data and "stack" not in data
    assert RunConfig(workload="w").model_dump(mode="json") == {"workload": "w"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--routers", "kv", "--profiles", "gpu-cpu"], "--routers compares policies on one fleet"),
        (["--workers", "2", "--profiles", "gpu-cpu"], "--workers is the fleet of --routers"),
        (["--repeat", "3"], "--repeat repeats the policies of --routers"),
        (["--routers", "kv,nope"], "unknown routing policy 'nope'"),
    ],
)
def test_bench_compare_routers_usage_errors(args, needle):
    result = cli.invoke(app, ["bench", "compare", *args])
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and "fix:" in result.stderr


def test_a_started_fleet_gets_its_workers():
    fleet = stacks.UpLauncher(stacks.StackOptions(workers=3), Path("/nonexistent"), environ={})
    env = fleet.settings_env(compare.StackConfig("fleet", None, topology="agg"))
    assert env["DYNKV_WORKERS"] == "3" and env["DYNKV_TOPOLOGY"] == "agg"
    plain = stacks.UpLauncher(stacks.StackOptions(), Path("/nonexistent"), environ={})
    assert "DYNKV_WORKERS" not in plain.settings_env(compare.StackConfig("p", "gpu-cpu"))


def test_blocks_held_twice_over_a_run_come_from_the_index_counters():
    def reading(n: int) -> router_metrics.RouterReading:
        return router_metrics.parse(
            "# TYPE dynkv_router_acquired_blocks_total counter\n"
            f'dynkv_router_acquired_blocks_total{{worker="agg-0"}} {30 * n}\n'
            f'dynkv_router_acquired_blocks_total{{worker="agg-1"}} {10 * n}\n'
            "# TYPE dynkv_router_duplicated_blocks_total counter\n"
            f'dynkv_router_duplicated_blocks_total{{worker="agg-1"}} {10 * n}\n'
        )

    stats = router_compare.router_stats("round_robin", "s", "u", reading(1), reading(3))
    assert (stats.computed_blocks, stats.held_twice_blocks) == (80, 20)
    assert stats.held_twice_share == 0.25
    line = report.router_markdown([BenchSummary(label="round_robin", router=stats)])[-1]
    assert "| 25.0% |" in line
    older = router_compare.router_stats(
        "kv", "s", "u", router_metrics.parse(""), router_metrics.parse("")
    )
    assert older.computed_blocks is None and older.held_twice_share is None
