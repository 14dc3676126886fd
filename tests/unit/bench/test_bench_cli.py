"""`dynkv bench serve` from the command line: bad input exits 2 with a cause and a fix, an
unreachable server exits 1, and a run against a small local SSE server writes the JSON shape, the
markdown and the plot."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from dynkv.bench import target
from dynkv.cli.main import app
from dynkv.ports import free_port
from dynkv.supervisor.state import DeploymentState, ServiceRecord, StateStore

runner = CliRunner(env={"COLUMNS": "300"})  # the cause is one line; no wrapping inside it


def invoke(*args: str):
    return runner.invoke(app, ["bench", "serve", *args])


def assert_usage_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("  fix: "), result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--workload", "chatty"], ["'chatty' is not one of 'multi-turn', 'long-doc'"]),
        (["--url", "localhost:8000"], ["is not an http(s) URL", "http://127.0.0.1:8000/v1"]),
        (["--url", "not a url"], ["is not an http(s) URL"]),
        (["--url", "ftp://host/"], ["is not an http(s) URL"]),
        (["--metrics-url", "nope"], ["--metrics-url 'nope'", "/metrics"]),
        (["--concurrency", "0"], ["'--concurrency'", "pass --concurrency 1 or more"]),
        (["-c", "-3"], ["'--concurrency'", "pass --concurrency 1 or more"]),
        (["--rate", "0"], ["'--rate'", "pass --rate 0.001 or more"]),
        (["--warmup", "-1"], ["'--warmup'", "pass --warmup 0 or more"]),
        (["--timeout", "0"], ["'--timeout'", "pass --timeout 0.001 or more"]),
        (["--endpoint", "embeddings"], ["'embeddings' is not one of 'chat', 'completions'"]),
        (["--docs", "3"], ["--docs applies to --workload long-doc, not multi-turn"]),
        (["-w", "long-doc", "--users", "2", "--rounds", "2"], ["--users, --rounds apply"]),
        (["-w", "long-doc", "--mode", "zigzag"], ["'zigzag' is not one of 'tile'"]),
        (["--users", "0"], ["'--users'", "pass --users 1 or more"]),
        (["--answer-tokens", "0"], ["pass --answer-tokens 1 or more"]),
        (["--tokenizer", "/nonexistent/dir"], ["tokenizer directory /nonexistent/dir"]),
        (["--compare", "gpu-cpu"], ["dynkv bench compare --profiles"]),
    ],
)
def test_bad_input_exits_2_with_cause_and_fix(args, needles):
    assert_usage_error(invoke(*args), *needles)


def test_unreachable_server_exits_1_with_cause_and_fix():
    result = invoke("--url", f"http://127.0.0.1:{free_port()}", "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert "cannot list the models" in result.stderr and "fix:" in result.stderr


def test_json_markdown_and_plot_from_a_local_server(fake_server, tmp_path):
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    result = invoke(
        "--url",
        fake_server,
        "--users",
        "2",
        "--rounds",
        "2",
        "--system-tokens",
        "16",
        "--question-tokens",
        "8",
        "--answer-tokens",
        "2",
        "--warmup",
        "1",
        "--label",
        "fake",
        "--markdown",
        str(md),
        "--plot",
        str(png),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("ttft_ms", "itl_ms", "latency_ms"):
        assert set(data[key]) == {"p50", "p90", "p99"} and data[key]["p50"] > 0
    assert data["requests_per_s"] > 0 and data["hit_rates"] == {"host": None, "disk": None}
    assert (data["requests"], data["errors"], data["output_tokens"]) == (4, 0, 8)
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert data["config"]["model"] == "fake-model" and data["config"]["concurrency"] == 1
    assert data["warmup"] == {"requests": 1, "errors": 0}
    assert md.read_text().startswith("## dynkv bench serve: multi-turn\n")
    assert "| fake | 4 | 0 |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_human_output_goes_to_stderr(fake_server):
    result = invoke("--url", fake_server, "-w", "long-doc", "--docs", "2", "--doc-tokens", "40")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "TTFT ms" in result.stderr and "4/4 ok" in result.stderr
    assert "round 2: TTFT p50" in result.stderr


def test_bench_is_listed_in_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "bench" in result.stdout


# ---- the server's URL and its workers' metrics ---------------------------------------------


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000"),
        ("https://example.test/proxy/v1", "https://example.test/proxy"),
        ("http://h:1/v10", "http://h:1/v10"),
    ],
)
def test_base_url_drops_v1(given, base):
    assert target.base_url(given) == base


SMALL = ("--users", "1", "--rounds", "1", "--system-tokens", "8", "--question-tokens", "4")


def test_url_with_v1_reaches_the_same_server(fake_server):
    result = invoke("--url", f"{fake_server}/v1", *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["config"]["url"] == fake_server and data["completed"] == 1


def _deployment(state_dir, name: str, frontend: str, metrics: list[str]) -> None:
    """The state file `dynkv up` writes, with a frontend at `frontend` and one worker per
    metrics URL."""
    workers = [
        ServiceRecord(name=f"w{i}", role="agg", meta={"metrics_url": url})
        for i, url in enumerate(metrics)
    ]
    front = ServiceRecord(name="frontend", role="frontend", meta={"url": frontend})
    state = DeploymentState(name=name, instance="x", infra="embedded", services=[*workers, front])
    StateStore(state_dir / name).write(state)


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith(("DYNKV_", "DYN_KVBM_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("DYNKV_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    return tmp_path / "state"


def test_metrics_are_found_from_the_deployment_that_serves_the_url(fake_server, state_dir):
    port = fake_server.rsplit(":", 1)[1]
    _deployment(state_dir, "other", "http://127.0.0.1:1", ["http://127.0.0.1:1/metrics"])
    _deployment(state_dir, "mine", f"http://127.0.0.1:{port}", [f"{fake_server}/metrics"])
    result = invoke("--url", f"http://localhost:{port}/v1", *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["config"]["metrics_urls"] == [f"{fake_server}/metrics"]
    assert data["config"]["deployment"] == "mine"
    assert data["hit_rates"] == {"host": 0.5, "disk": 0.25}


def test_name_picks_the_deployment_its_frontend_and_its_metrics(fake_server, state_dir):
    _deployment(state_dir, "mine", fake_server, [f"{fake_server}/metrics"])
    result = invoke("--name", "mine", *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["config"]["url"] == fake_server and data["hit_rates"]["host"] == 0.5


def test_metrics_url_wins_over_the_deployment(fake_server, state_dir):
    _deployment(state_dir, "mine", fake_server, ["http://127.0.0.1:1/metrics"])
    result = invoke("--url", fake_server, "--metrics-url", f"{fake_server}/metrics", *SMALL)
    assert result.exit_code == 0, result.stderr
    assert "hit rates host 50" in result.stderr


def test_name_of_no_deployment_exits_1_with_cause_and_fix(state_dir):
    result = invoke("--name", "nothere")
    assert result.exit_code == 1
    assert "no deployment named 'nothere'" in result.stderr
    assert "dynkv up -d --name nothere" in result.stderr


def test_send_session_is_recorded_in_the_config_only_when_on(fake_server):
    on = invoke("--url", fake_server, *SMALL, "--send-session", "--json")
    assert on.exit_code == 0, on.stderr
    assert json.loads(on.stdout)["config"]["send_session"] is True
    off = json.loads(invoke("--url", fake_server, *SMALL, "--json").stdout)
    assert "send_session" not in off["config"]  # reports of runs without it keep their shape
