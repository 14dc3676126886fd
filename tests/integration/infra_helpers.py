"""Helpers shared by the integration tests (imported by name: pytest puts this dir on sys.path)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dynkv.plan import HostFacts, ModelChoice, Plan, build_plan
from dynkv.private_deployment import SETTING_PREFIXES, fresh_ports
from dynkv.settings import resolve
from dynkv.supervisor.process import group_of, marked_processes, marker_prefix, same_process

FAKES = Path(__file__).resolve().parents[1] / "fakes"


def port_env(state_dir: Path, name: str = "it") -> dict[str, str]:
    return {
        "DYNKV_NAME": name,
        "DYNKV_STATE_DIR": str(state_dir),
        **fresh_ports(),
        "DYN_KVBM_CPU_CACHE_GB": "0.01",
        "DYN_KVBM_DISK_CACHE_GB": "0",
    }


def use_fake_vllm(monkeypatch, tmp_path: Path, name: str, **extra: str) -> tuple[dict, Path]:
    """Set this process's environment for a deployment `name` whose worker is the fake vLLM
    (tests/fakes/fake_vllm.py): none of the caller's settings, private ports, state and G3 dirs
    under `tmp_path`, then `extra`. Returns those settings and an empty model directory."""
    for key in list(os.environ):
        if key.upper().startswith(SETTING_PREFIXES):
            monkeypatch.delenv(key)
    env = port_env(tmp_path / "state", name=name)
    env |= {"DYN_KVBM_DISK_CACHE_DIR": str(tmp_path / "g3"), **extra}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(FAKES)) if p)
    )
    monkeypatch.setattr("dynkv.plan.worker.VLLM_MODULE", "fake_vllm")
    model = tmp_path / "model"
    model.mkdir()
    return env, model


def with_model_config(model: Path) -> Path:
    """A small Llama's config.json in `model`: the fake vLLM serves nothing real, but `up`
    checks the model like any other (dynkv doctor)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "torch_dtype": "bfloat16",
    }
    (model / "config.json").write_text(json.dumps(config))
    return model


def fake_vllm_values(monkeypatch, tmp_path: Path, name: str) -> dict[str, str]:
    """`use_fake_vllm`'s settings, plus MODEL (the model directory) and DDIR (the deployment's
    state directory), as the fault tests read them."""
    values, model = use_fake_vllm(monkeypatch, tmp_path, name)
    return values | {"MODEL": str(model), "DDIR": str(tmp_path / "state" / name)}


def wait_for(predicate, timeout: float = 15.0, step: float = 0.1):
    """The first truthy value of `predicate()`, polled every `step` s; AssertionError after
    `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def full_plan(env: dict[str, str]) -> Plan:
    resolved = resolve(env=env)
    host = HostFacts.detect(resolved, ModelChoice("fake-model", "fake-model"), device="cpu")
    return build_plan(resolved, host)


def infra_plan(env: dict[str, str], **changes) -> Plan:
    """etcd + NATS only (the worker needs vLLM or the fake; the frontend needs a worker)."""
    plan = full_plan(env)
    return plan.replace(
        services=tuple(s for s in plan.services if s.role in ("etcd", "nats")), **changes
    )


def assert_nothing_left(pids: list[tuple[int, float]], deployment_dir: str | Path) -> None:
    """No recorded process (pid + create_time), no member of their process groups, and no
    process marked with the deployment's DYNKV_INSTANCE is left."""
    alive = [pid for pid, ct in pids if same_process(pid, ct) is not None]
    assert alive == [], f"processes still running: {alive}"
    in_groups = [p.pid for pid, _ in pids for p in group_of(pid)]
    assert in_groups == [], f"processes left in the services' groups: {in_groups}"
    assert marked_processes(marker_prefix(deployment_dir)) == []
