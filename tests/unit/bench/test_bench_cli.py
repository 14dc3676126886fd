"""`dynkv bench serve` from the command line: bad input exits 2 with a cause and a fix, an
unreachable server exits 1, and a run against a small local SSE server writes the JSON shape, the
markdown and the plot."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.ports import free_port

runner = CliRunner()


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
        (["--workload", "chatty"], ["unknown workload 'chatty'", "multi-turn, long-doc"]),
        (["--url", "localhost:8000"], ["is not an http(s) URL", "http://127.0.0.1:8000"]),
        (["--url", "not a url"], ["is not an http(s) URL"]),
        (["--url", "ftp://host/"], ["is not an http(s) URL"]),
        (["--metrics-url", "nope"], ["--metrics-url 'nope'", "/metrics"]),
        (["--concurrency", "0"], ["--concurrency must be ≥ 1, got 0"]),
        (["-c", "-3"], ["--concurrency must be ≥ 1, got -3"]),
        (["--rate", "0"], ["--rate must be > 0"]),
        (["--warmup", "-1"], ["--warmup must be ≥ 0"]),
        (["--endpoint", "embeddings"], ["unknown endpoint 'embeddings'"]),
        (["--docs", "3"], ["--docs applies to --workload long-doc, not multi-turn"]),
        (["-w", "long-doc", "--users", "2", "--rounds", "2"], ["--users, --rounds apply"]),
        (["-w", "long-doc", "--mode", "zigzag"], ["unknown repeat mode 'zigzag'"]),
        (["--users", "0"], ["users must be ≥ 1, got 0", "--users 1"]),
        (["--tokenizer", "/nonexistent/dir"], ["tokenizer directory /nonexistent/dir"]),
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
