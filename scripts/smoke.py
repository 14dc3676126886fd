"""The smoke test behind scripts/smoke: command A end to end, as a user runs it.

Steps: `scripts/up -d --json` with a private state dir, deployment name and free ports → a chat
completion through the frontend → long prompts sent until the device KV cache (G1, sized small
here) cannot hold them, then the first one again, which `dynkv status --json` must show as a
host-tier hit (`onboard_blocks_h2d` > 0) → `dynkv down` → no process of the run left (recorded
pids, their process groups, the run's DYNKV_INSTANCE marker). `dynkv down` runs whatever happens.

Why several prompts: vLLM's own prefix cache serves an exact repeat from G1 before KVBM is asked;
the tiny model stores 65,536 bytes per 32-token block, so DYNKV_DEVICE_KV_GB=0.01 holds ~152
blocks, and five prompts of ~1,400 tokens (~45 blocks each) push the first one out of G1 while G2
(0.1 GB, ~1,500 blocks) keeps it all.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dynkv.bench.workloads import text
from dynkv.private_deployment import dynkv_cli, fresh_ports
from dynkv.supervisor import DeploymentState, processes_left

ROOT = Path(__file__).resolve().parents[1]
DOCS, DOC_WORDS = 5, 1150  # ~1,400 tokens each with the tiny model's 2,048-token vocabulary
UP_TIMEOUT = float(os.environ.get("SMOKE_UP_TIMEOUT", "600"))


def say(message: str) -> None:
    print(f"smoke: {message}", file=sys.stderr, flush=True)


def smoke_env(state_dir: Path) -> dict[str, str]:
    defaults = {
        "DYNKV_NAME": f"smoke-{os.getpid()}",
        "DYNKV_STATE_DIR": str(state_dir),
        "DYNKV_PROFILE": "gpu-cpu",
        "DYN_KVBM_CPU_CACHE_GB": "0.1",
        "DYNKV_DEVICE_KV_GB": "0.01",
        "DYNKV_MAX_MODEL_LEN": "2048",
        "DYNKV_MODEL": "dynkv-tiny",  # the sizes above are the tiny model's
        "DYNKV_STARTUP_TIMEOUT_SECS": "300",
    }
    defaults |= fresh_ports()
    env = dict(os.environ)
    env.pop("DYNKV_API_KEY", None)
    for key, value in defaults.items():
        env.setdefault(key, value)
    env["DYNKV_STATE_DIR"] = str(state_dir)  # always private
    return env


def worker_kvbm(env: dict[str, str]) -> dict:
    status = dynkv_cli("status", "--json", env=env)
    if status.returncode != 0:
        raise SystemExit(f"dynkv status failed: {status.stderr[-2000:]}")
    services = json.loads(status.stdout)["services"]
    return next(s for s in services if s["role"] in ("agg", "decode"))["kvbm"] or {}


def run(env: dict[str, str]) -> dict:
    started = time.monotonic()
    up = subprocess.run(
        [str(ROOT / "scripts" / "up"), "-d", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT,
    )
    if up.returncode != 0:
        raise SystemExit(f"scripts/up -d failed ({up.returncode}):\n{up.stderr[-4000:]}")
    state = json.loads(up.stdout)
    result = {"up_s": round(time.monotonic() - started, 1), "state": state}
    frontend = next(s for s in state["services"] if s["name"] == "frontend")
    base = frontend["meta"]["openai_url"]
    model = frontend["meta"]["model"]
    say(f"up in {result['up_s']} s; OpenAI API at {base} (model {model})")

    with httpx.Client(base_url=base, timeout=120) as client:
        chat = client.post(
            "/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 8,
            },
        )
        if chat.status_code != 200:
            raise SystemExit(f"chat completion: HTTP {chat.status_code}: {chat.text[:500]}")
        answer = chat.json()["choices"][0]["message"]["content"]
        say(f"chat completion ok ({chat.json()['usage']['completion_tokens']} tokens): {answer!r}")

        docs = [text(random.Random(f"smoke-doc-{i}"), DOC_WORDS) for i in range(DOCS)]
        before = worker_kvbm(env).get("onboard_blocks_h2d") or 0
        ttft = []
        for doc in [*docs, docs[0]]:
            t0 = time.monotonic()
            resp = client.post(
                "/completions", json={"model": model, "prompt": doc, "max_tokens": 1}
            )
            if resp.status_code != 200:
                raise SystemExit(f"completion: HTTP {resp.status_code}: {resp.text[:500]}")
            ttft.append(round((time.monotonic() - t0) * 1000))
    kvbm = worker_kvbm(env)
    onboarded = (kvbm.get("onboard_blocks_h2d") or 0) - before
    result.update(repeat_ms=ttft, kvbm=kvbm)
    say(f"first sends {ttft[:-1]} ms, repeat {ttft[-1]} ms; KVBM onboarded {onboarded} blocks "
        f"from host memory, host hit rate {kvbm.get('host_cache_hit_rate')}")  # fmt: skip
    if onboarded <= 0 or not kvbm.get("host_cache_hit_rate"):
        raise SystemExit(f"no host-tier hit visible in dynkv status --json: {kvbm}")
    return result


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dynkv-smoke-") as tmp:
        env = smoke_env(Path(tmp) / "state")
        ddir = Path(env["DYNKV_STATE_DIR"]) / env["DYNKV_NAME"]
        result: dict = {}
        failure = None
        try:
            result = run(env)
        except (SystemExit, Exception) as exc:  # always tear down, then report
            failure = str(exc) or type(exc).__name__
            logs = dynkv_cli("logs", "--tail", "30", env=env)
            print(logs.stdout[-6000:], file=sys.stderr)
        finally:
            down = dynkv_cli("down", env=env, timeout=180)
            say("down: " + (down.stderr.strip().splitlines() or ["?"])[-1])
        if result.get("state"):
            services = DeploymentState.from_json(result["state"]).services
            left = processes_left(services, ddir)
            if left:
                failure = failure or "processes left after dynkv down: " + "; ".join(left)
            else:
                say("no process left")
        if failure:
            say(f"FAILED: {failure}")
            return 1
        summary = {k: result[k] for k in ("up_s", "repeat_ms")}
        summary["host_cache_hit_rate"] = result["kvbm"].get("host_cache_hit_rate")
        summary["onboard_blocks_h2d"] = result["kvbm"].get("onboard_blocks_h2d")
        print(json.dumps(summary))
        say("ok")
        return 0


if __name__ == "__main__":
    sys.exit(main())
