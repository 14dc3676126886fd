"""The frontend on a real stack, and scripts/smoke on the same one: `scripts/smoke --keep` brings
up the generated tiny model on vLLM (CPU) the way command A does (`scripts/up -d`, here with an API
key), checks a chat completion and a host-tier (G2) hit in `dynkv status --json`, and leaves the
stack to this module; `scripts/smoke --down` takes it down at the end and checks that no process
is left. One stack for both (each `up` costs a minute or more here). On it, driven with the
official `openai` client: models, chat and completions streamed and not, every error shape, the
KVBM host-tier hit visible in `dynkv status --json`, the frontend's metrics, Prometheus scraping
the worker's KVBM metrics (`--observability`, when a prometheus binary is installed: CI installs
it), and last, a killed worker (503 at once, out of the pool within the lease TTL)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from stack_support import assert_nothing_left, dynkv, stack_env

from dynkv.bench.workloads import text
from dynkv.infra.etcd_client import EtcdClient
from dynkv.plan.build import find_prometheus
from dynkv.supervisor import read_state
from dynkv.worker.record import worker_api_key

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e
MODEL = "dynkv-tiny"
KEY = "sk-e2e-frontend-secret"
TTL = 4  # DYNKV_LEASE_TTL_SECS of this stack
ROOT = Path(__file__).resolve().parents[2]


class Stack:
    def __init__(self, env: dict[str, str], ddir: Path, summary: dict, output: str) -> None:
        self.env, self.ddir, self.summary, self.up_output = env, ddir, summary, output
        self.base = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
        port = env["DYNKV_PROMETHEUS_PORT"]
        self.prometheus = f"http://127.0.0.1:{port}" if find_prometheus() else None
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0)

    def status(self) -> dict:
        result = dynkv("status", "--json", env=self.env)
        return json.loads(result.stdout)


def smoke(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "scripts" / "smoke"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory, e2e_cache):
    tmp = tmp_path_factory.mktemp("frontend-e2e")
    env = stack_env(
        tmp,
        "fe2e",
        cache=e2e_cache,
        DYNKV_VENV=sys.prefix,  # scripts/smoke and scripts/up: this interpreter, no set-up step
        DYNKV_API_KEY=KEY,  # to `up`, and the smoke sends it
        # one more service on the same stack (a second `up` costs a minute)
        DYNKV_OBSERVABILITY="true" if find_prometheus() else "false",
        DYNKV_PROFILE="gpu-cpu",
        DYN_KVBM_CPU_CACHE_GB="0.1",
        # G1 small enough that five ~1,400-token prompts push the first out (the tiny
        # model's 65,536-byte blocks → ~152 of them in 0.01 GB), so its repeat needs KVBM
        DYNKV_DEVICE_KV_GB="0.01",
        DYNKV_LEASE_TTL_SECS=str(TTL),
        DYNKV_RESTART_LIMIT="0",  # the killed worker stays down (restarts: test_faults_stack)
    )
    ddir = tmp / "state" / "fe2e"
    started = time.monotonic()
    kept = smoke("--keep", env=env, timeout=900)
    print(f"\nscripts/smoke --keep: {time.monotonic() - started:.1f} s\n{kept.stderr[-3000:]}")
    assert kept.returncode == 0, kept.stderr[-6000:]  # a failed smoke took its stack down
    try:
        state = read_state(ddir)
        summary = json.loads(kept.stdout.strip().splitlines()[-1])
        yield Stack(env, ddir, summary, kept.stdout + kept.stderr)
    finally:
        down = smoke("--down", env=env, timeout=300)
    assert down.returncode == 0, down.stderr[-4000:]
    assert "no process left" in down.stderr
    assert_nothing_left(state.services, ddir)
    assert not (ddir / "prometheus").exists()  # its config, key file and TSDB went with it


def test_smoke_script_kept_the_stack_after_its_checks(stack):
    """scripts/smoke: exit 0 (the fixture), a chat completion and a host-tier hit in its JSON
    summary, and what `up` said passed on without the key."""
    summary = stack.summary
    assert summary["onboard_blocks_h2d"] > 0 and summary["host_cache_hit_rate"] > 0
    assert (summary["name"], summary["state_dir"]) == ("fe2e", stack.env["DYNKV_STATE_DIR"])
    assert "smoke: chat completion ok" in stack.up_output
    assert KEY not in stack.up_output
    assert f"{stack.env['DYNKV_FRONTEND_PORT']}/v1/chat/completions" in stack.up_output  # curl
    print(f"\nscripts/up -d (tiny model, frontend): {summary['up_s']} s")


def test_models(stack):
    assert [m.id for m in stack.client.models.list()] == [MODEL]
    assert stack.client.models.retrieve(MODEL).owned_by == "dynkv"


def test_chat_completion(stack):
    raw = stack.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
    )
    assert raw.headers["x-dynkv-worker"] == "agg-0"
    done = raw.parse()
    assert done.model == MODEL and isinstance(done.choices[0].message.content, str)
    assert done.usage.completion_tokens == 8


def stream_chat(client, **extra) -> tuple[list[str], int]:
    """(the content pieces, the completion tokens the usage chunk reports) of a streamed chat."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=16,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **extra,
    )
    pieces, tokens = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return pieces, tokens


def test_chat_completion_streamed_chunk_by_chunk(stack):
    """Tokens are counted from the usage chunk, never from chunks: vLLM may merge tokens into one
    chunk (its detokenizer holds back an incomplete UTF-8 sequence, which a random-weights model
    produces at random, and it merges the deltas of steps not yet read). Through the frontend the
    stream carries the same greedy text as straight from the worker, in more than one event."""
    pieces, tokens = stream_chat(stack.client)
    assert tokens == 16
    secret = (stack.ddir / "deployment.secret").read_text().strip()
    worker = openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.env['DYNKV_WORKER_PORT']}/v1",
        api_key=worker_api_key(secret),  # the key only the frontend sends (docs/security.md)
        max_retries=0,
    )
    direct, direct_tokens = stream_chat(worker)
    assert direct_tokens == 16
    # The same greedy text; where vLLM cuts it into chunks depends on timing (its output
    # collector merges the deltas of steps its consumer has not read yet), so only the text and
    # more than one chunk are asserted: the first one is sent right after the prefill.
    assert "".join(pieces) == "".join(direct) and len(pieces) > 1


def test_completions_streamed_and_not(stack):
    done = stack.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert done.usage.completion_tokens == 5 and isinstance(done.choices[0].text, str)
    chunks = list(
        stack.client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    # tokens from the usage chunk (the last one, with no choices), not by counting chunks
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == "length" and len(finished) > 1


def test_error_shapes(stack):
    def shape(body: dict) -> dict:
        assert set(body["error"]) == {"message", "type", "param", "code", "request_id"}, body
        return body["error"]

    anonymous = openai.OpenAI(base_url=stack.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        anonymous.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "invalid_api_key" and shape({"error": info.value.body})
    no_key = httpx.post(f"{stack.base}/v1/chat/completions", json={}, timeout=10)
    assert no_key.status_code == 401 and shape(no_key.json())["code"] == "invalid_api_key"
    assert httpx.get(f"{stack.base}/health", timeout=5).status_code == 200  # open

    with pytest.raises(openai.NotFoundError) as info:
        stack.client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == 404 and info.value.code == "model_not_found"

    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    bad = httpx.post(f"{stack.base}/v1/chat/completions", content=b"{nope", headers=auth)
    assert bad.status_code == 400 and shape(bad.json())["code"] == "invalid_json"
    missing = httpx.post(f"{stack.base}/v1/completions", json={"model": MODEL}, headers=auth)
    assert missing.status_code == 400 and shape(missing.json())["param"] == "prompt"

    with pytest.raises(openai.BadRequestError) as info:  # vLLM's own 400, passed through
        stack.client.completions.create(model=MODEL, prompt=" ".join(["word"] * 3000), max_tokens=4)
    err = info.value.body  # the client hands over the inner error object: vLLM's own, as it is
    assert {"message", "type", "param", "code"} <= set(err)
    assert info.value.status_code == 400 and err["type"] == "BadRequestError"  # vLLM's type
    assert "2048" in err["message"]  # the model's context length, in vLLM's words


def test_kvbm_host_hit_visible_in_status(stack):
    docs = [text(random.Random(f"e2e-doc-{i}"), 1150) for i in range(5)]
    before = _worker(stack.status())["kvbm"]
    ttft = []
    for doc in [*docs, docs[0]]:
        t0 = time.monotonic()
        done = stack.client.completions.create(model=MODEL, prompt=doc, max_tokens=1)
        ttft.append(time.monotonic() - t0)
        assert 1200 < done.usage.prompt_tokens < 2000
    after = _worker(stack.status())["kvbm"]
    print(f"\nlatency ms: first sends {[round(t * 1000) for t in ttft[:-1]]}, "
          f"repeat {ttft[-1] * 1000:.0f}; kvbm {after}")  # fmt: skip
    assert after["reachable"] is True
    assert after["onboard_blocks_h2d"] > (before["onboard_blocks_h2d"] or 0)
    assert after["host_cache_hit_rate"] > 0
    assert after["matched_tokens"] > (before["matched_tokens"] or 0)


def test_status_logs_and_metrics(stack):
    assert "random weights" in stack.up_output  # the generated model is announced as such
    with EtcdClient(f"http://127.0.0.1:{stack.env['DYNKV_ETCD_PORT']}") as etcd:
        record = etcd.get("/dynkv/fe2e/workers/agg-0").json()
    assert record["model"] == MODEL
    assert record["url"] == f"http://127.0.0.1:{stack.env['DYNKV_WORKER_PORT']}"
    assert "signature" in record  # signed with the deployment secret (docs/security.md)
    # vLLM's /v1 answers only the frontend (the key derived from the secret); /health is open
    direct = f"http://127.0.0.1:{stack.env['DYNKV_WORKER_PORT']}"
    assert httpx.get(f"{direct}/v1/models", timeout=5).status_code == 401
    assert httpx.get(f"{direct}/health", timeout=5).status_code == 200
    data = stack.status()
    assert data["name"] == "fe2e" and all(s["healthy"] for s in data["services"])
    assert _worker(data)["kvbm"]["reachable"] is True
    worker_logs = dynkv("logs", "worker", "--tail", "400", env=stack.env)
    assert worker_logs.returncode == 0 and "worker | " in worker_logs.stdout
    assert "registered /dynkv/fe2e/workers/agg-0" in worker_logs.stdout
    frontend = next(s for s in data["services"] if s["name"] == "frontend")
    assert frontend["healthy"] and frontend["url"] == stack.base
    logs = dynkv("logs", "frontend", env=stack.env)
    assert logs.returncode == 0 and "worker joined: agg-0" in logs.stdout
    assert "GET /health" not in logs.stdout  # probes are not logged
    for path in [stack.ddir / "state.json", *(stack.ddir / "logs").glob("*.log")]:
        assert KEY not in path.read_text(errors="replace"), path
    metrics = httpx.get(
        f"{stack.base}/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=5
    ).text
    assert f'dynkv_frontend_ttft_seconds_count{{model="{MODEL}",worker="agg-0"}}' in metrics
    assert 'kind="model_not_found"' in metrics


def test_prometheus_scrapes_the_worker_kvbm_metrics_and_the_frontend(stack):
    if stack.prometheus is None:
        pytest.skip("no prometheus binary: apt-get install -y prometheus (.ci/run does)")
    prom = next(s for s in stack.status()["services"] if s["name"] == "prometheus")
    assert prom["healthy"] and prom["url"] == stack.prometheus

    def query(expr: str) -> list[dict]:
        url = f"{stack.prometheus}/api/v1/query"
        body = httpx.get(url, params={"query": expr}, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    deadline = time.monotonic() + 30  # the scrape interval is 5 s
    while not (found := query("kvbm_host_blocks_total")) and time.monotonic() < deadline:
        time.sleep(1)
    (series,) = found
    assert series["metric"]["job"] == "kvbm" and series["metric"]["worker"] == "agg-0"
    assert float(series["value"][1]) > 0  # the worker's G2 size in blocks
    # the frontend wants the API key on /metrics too: Prometheus has it from its key file
    while not (up := query('up{job="dynkv-frontend"}')) and time.monotonic() < deadline:
        time.sleep(1)
    assert up and up[0]["value"][1] == "1"
    config = (stack.ddir / "prometheus" / "prometheus.yml").read_text()
    assert KEY not in config and "credentials_file" in config


def bench(stack: Stack, *args: str) -> dict:
    proc = dynkv(
        "bench", "serve", "--url", stack.base, "--api-key", KEY, *args, "--json",
        env=stack.env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert KEY not in proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_bench_serve_multi_turn_chat_through_the_frontend(stack, tmp_path):
    tokenizer = Path(stack.env["XDG_CACHE_HOME"]) / "dynkv" / "models" / "tiny"
    data = bench(
        stack, "--users", "2", "--rounds", "2", "--system-tokens", "128",
        "--question-tokens", "32", "--answer-tokens", "4", "--ignore-eos", "--warmup", "1",
        "--concurrency", "2", "--tokenizer", str(tokenizer), "--plot", str(tmp_path / "p.png"),
    )  # fmt: skip
    for key in ("ttft_ms", "itl_ms", "latency_ms"):
        assert set(data[key]) == {"p50", "p90", "p99"}
        assert 0 < data[key]["p50"] <= data[key]["p90"] <= data[key]["p99"]
    assert data["requests_per_s"] > 0
    # no --metrics-url: the worker's KVBM metrics are found from the deployment serving --url
    kvbm = f"http://127.0.0.1:{stack.env['DYN_KVBM_METRICS_PORT']}/metrics"
    assert data["config"]["metrics_urls"] == [kvbm]
    assert data["hit_rates"]["host"] is not None and data["hit_rates"]["disk"] is None
    assert (data["requests"], data["completed"], data["errors"]) == (4, 4, 0)
    assert data["output_tokens"] == 16  # --ignore-eos: exactly max_tokens each
    assert [r["requests"] for r in data["rounds"]] == [2, 2]
    assert data["config"]["model"] == MODEL  # asked of the frontend's /v1/models
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_serve_long_doc_scrapes_kvbm_and_a_target_without_it(stack):
    kvbm = f"http://127.0.0.1:{stack.env['DYN_KVBM_METRICS_PORT']}/metrics"
    plain = f"http://127.0.0.1:{stack.env['DYNKV_WORKER_PORT']}/metrics"  # vLLM's own
    data = bench(
        stack, "-w", "long-doc", "--docs", "2", "--doc-tokens", "300", "--repeats", "2",
        "--mode", "interleave", "--endpoint", "completions", "--rate", "20",
        "--metrics-url", kvbm, "--metrics-url", plain,
    )  # fmt: skip
    assert (data["requests"], data["errors"]) == (4, 0)
    assert data["prompt_tokens"] > 4 * 300 * 0.9
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    with_kvbm, without = data["kvbm"]["targets"]
    assert with_kvbm["error"] is None and with_kvbm["kvbm_matched_tokens"] is not None
    assert without["error"] is None and without["kvbm_matched_tokens"] is None
    assert data["hit_rates"]["host"] is not None and data["hit_rates"]["disk"] is None


def test_zz_killed_worker_is_503_then_leaves_the_pool(stack):
    """Last: it kills the stack's worker (the fixture's `down` still has to clean up)."""
    state = read_state(stack.ddir)
    os.killpg(state.service("worker").pgid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        stack.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert info.value.status_code == 503 and info.value.code == "no_worker_available"
    # The registration's lease expires TTL s after its last keep-alive; etcd checks expiries
    # every 500 ms and the frontend's watch sees the delete at once, but a loaded 2-core box can
    # delay any of those by seconds, so the bound is the TTL plus a margin, not a race with it.
    bound = TTL + 10
    auth = {"authorization": f"Bearer {KEY}"}  # without the key: healthy or not, no more
    while time.monotonic() - killed < bound:
        if httpx.get(f"{stack.base}/health", headers=auth, timeout=5).json()["workers"] == 0:
            break
        time.sleep(0.2)
    left = time.monotonic() - killed
    print(f"\nkilled worker left the pool after {left:.1f} s (lease TTL {TTL} s)")
    assert left <= bound
    with pytest.raises(openai.InternalServerError):
        stack.client.completions.create(model=MODEL, prompt="x", max_tokens=2)


def _worker(status: dict) -> dict:
    return next(s for s in status["services"] if s["name"] == "worker")
