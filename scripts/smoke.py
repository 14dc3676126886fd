"""The smoke test behind scripts/smoke: command A end to end, as a user runs it.

Steps: `scripts/up -d` with a private state dir, deployment name and free ports (what it prints
is passed on; where the services are is read from its state file) → a chat completion through the
frontend → long prompts sent until the device KV cache (G1, sized small here) cannot hold them,
then the first one again, which `dynkv status --json` must show as a host-tier hit
(`onboard_blocks_h2d` > 0) → `dynkv down` → no process of the run left (recorded pids, their
process groups, the run's DYNKV_INSTANCE marker). `dynkv down` runs whatever happens. Exit 0 (and
a JSON summary on stdout) or 1.

Two more modes serve a caller that goes on testing the same stack (one `up` instead of two:
tests/e2e/test_frontend_openai.py runs the smoke this way):
- `--keep`: the same steps up to the host-tier hit, then the stack stays up; the summary names it
  (`name`, `state_dir`: the exported DYNKV_STATE_DIR, else a new directory that is kept). A
  failure still takes it down.
- `--down`: `dynkv down` of the deployment DYNKV_NAME under DYNKV_STATE_DIR (as `--keep` left
  it), then the same check that no process is left.
DYNKV_API_KEY, when exported, goes to `up` like every DYNKV_* variable and is sent as the bearer
token; it is never printed.

Why several prompts: vLLM's own prefix cache serves an exact repeat from G1 before KVBM is asked;
the tiny model stores 65,536 bytes per 32-token block, so DYNKV_DEVICE_KV_GB=0.01 holds ~152
blocks, and five prompts of ~1,400 tokens (~45 blocks each) push the first one out of G1 while G2
(0.1 GB, ~1,500 blocks) keeps it all.
"""

from __future__ import annotations

import argparse
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
from dynkv.supervisor import DeploymentState, processes_left, read_state

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
    for key, value in defaults.items():
        env.setdefault(key, value)
    env["DYNKV_STATE_DIR"] = str(state_dir)  # always the smoke's own
    return env


def worker_kvbm(env: dict[str, str]) -> dict:
    status = dynkv_cli("status", "--json", env=env)
    if status.returncode != 0:
        try:  # exit 1: a service is not healthy; its probe's detail says why
            unhealthy = {
                s["name"]: s["detail"]
                for s in json.loads(status.stdout)["services"]
                if not s["healthy"]
            }
        except (ValueError, KeyError):
            unhealthy = {}
        raise SystemExit(f"dynkv status failed: {unhealthy} {status.stderr[-2000:]}")
    services = json.loads(status.stdout)["services"]
    return next(s for s in services if s["role"] in ("agg", "decode"))["kvbm"] or {}


def run(env: dict[str, str]) -> dict:
    started = time.monotonic()
    up = subprocess.run(
        [str(ROOT / "scripts" / "up"), "-d"],
        env=env,
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT,
    )
    if up.returncode != 0:
        raise SystemExit(f"scripts/up -d failed ({up.returncode}):\n{up.stderr[-4000:]}")
    print(up.stdout + up.stderr, end="", file=sys.stderr, flush=True)  # what `up` tells a user
    kept = read_state(Path(env["DYNKV_STATE_DIR"]) / env["DYNKV_NAME"])
    if kept is None:
        raise SystemExit("scripts/up -d returned 0 but left no deployment state")
    state = kept.to_json()
    result = {"up_s": round(time.monotonic() - started, 1), "state": state}
    frontend = next(s for s in state["services"] if s["name"] == "frontend")
    base = frontend["meta"]["openai_url"]
    model = frontend["meta"]["model"]
    say(f"up in {result['up_s']} s; OpenAI API at {base} (model {model})")

    key = env.get("DYNKV_API_KEY")
    auth = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=base, timeout=120, headers=auth) as client:
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


def take_down(env: dict[str, str], state: DeploymentState | None) -> str | None:
    """`dynkv down`, then no process of the run left (when its state was read): the failure, or
    None."""
    down = dynkv_cli("down", env=env, timeout=180)
    say("down: " + (down.stderr.strip().splitlines() or ["?"])[-1])
    failure = None if down.returncode == 0 else f"dynkv down failed ({down.returncode})"
    if state is not None:
        ddir = Path(env["DYNKV_STATE_DIR"]) / env["DYNKV_NAME"]
        left = processes_left(state.services, ddir)
        if left:
            failure = failure or "processes left after dynkv down: " + "; ".join(left)
        else:
            say("no process left")
    return failure


def smoke(env: dict[str, str], *, keep: bool) -> int:
    result: dict = {}
    failure = None
    passed = False
    try:
        result = run(env)
        passed = True
    except (SystemExit, Exception) as exc:  # always tear down, then report
        failure = str(exc) or type(exc).__name__
        logs = dynkv_cli("logs", "--tail", "30", env=env)
        print(logs.stdout[-6000:], file=sys.stderr)
    finally:
        if not (keep and passed):
            state = DeploymentState.from_json(result["state"]) if result.get("state") else None
            left = take_down(env, state)  # whatever happened
            failure = failure or left
    if failure:
        say(f"FAILED: {failure}")
        return 1
    summary = {k: result[k] for k in ("up_s", "repeat_ms")}
    summary["host_cache_hit_rate"] = result["kvbm"].get("host_cache_hit_rate")
    summary["onboard_blocks_h2d"] = result["kvbm"].get("onboard_blocks_h2d")
    if keep:
        summary |= {"name": env["DYNKV_NAME"], "state_dir": env["DYNKV_STATE_DIR"]}
        say(f"ok; the stack {env['DYNKV_NAME']} stays up: take it down with "
            f"DYNKV_NAME={env['DYNKV_NAME']} DYNKV_STATE_DIR={env['DYNKV_STATE_DIR']} "
            "scripts/smoke --down")  # fmt: skip
    else:
        say("ok")
    print(json.dumps(summary))
    return 0


def down_kept() -> int:
    """--down: the stack `--keep` left, named by DYNKV_NAME and DYNKV_STATE_DIR."""
    name, state_dir = os.environ.get("DYNKV_NAME"), os.environ.get("DYNKV_STATE_DIR")
    state = read_state(Path(state_dir) / name) if name and state_dir else None
    if state is None:
        say(f"no deployment {name or '(DYNKV_NAME unset)'} under "
            f"{state_dir or '(DYNKV_STATE_DIR unset)'} to take down")  # fmt: skip
        say("fix: export the name and state_dir that `scripts/smoke --keep` printed, "
            "as DYNKV_NAME and DYNKV_STATE_DIR")  # fmt: skip
        return 2
    failure = take_down(dict(os.environ), state)
    if failure:
        say(f"FAILED: {failure}")
        return 1
    say("ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/smoke",
        description="Command A end to end: up, a chat completion, a host-tier hit, down, "
        "nothing left.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--keep",
        action="store_true",
        help="leave the stack up after the checks (for more tests); take it down with --down",
    )
    mode.add_argument(
        "--down",
        action="store_true",
        help="take down the stack --keep left (DYNKV_NAME, DYNKV_STATE_DIR); check nothing is left",
    )
    args = parser.parse_args(argv)
    if args.down:
        return down_kept()
    if args.keep:
        kept = os.environ.get("DYNKV_STATE_DIR") or tempfile.mkdtemp(prefix="dynkv-smoke-")
        return smoke(smoke_env(Path(kept)), keep=True)
    with tempfile.TemporaryDirectory(prefix="dynkv-smoke-") as tmp:
        return smoke(smoke_env(Path(tmp) / "state"), keep=False)


if __name__ == "__main__":
    sys.exit(main())
