"""What a service inherits, and what a printout or the state may show of a URL.

Expected: etcd, NATS and Prometheus get only the basics a program needs from the launcher's
environment (no API key, no HF token, no ETCD_* that would clash with the flags); python services
get the launcher's environment without secret-looking names the plan did not give them; URL
passwords are masked wherever argv or endpoints are printed or recorded.
"""

from __future__ import annotations

import json
import os

import psutil
from plan_support import plan_for

from dynkv.plan.model import Service, mask_argv, redact_urls
from dynkv.supervisor.process import child_env, same_process

LAUNCHER = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/u",
    "LC_ALL": "C.UTF-8",
    "DYNKV_API_KEY": "sk-launcher",
    "HF_TOKEN": "hf_launcher",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "ETCD_DATA_DIR": "/elsewhere",
    "VLLM_LOGGING_LEVEL": "DEBUG",
    "FAKE_VLLM_TOKENS": "20",  # a count, not a secret
    "FAKE_VLLM_TOKEN_DELAY": "0.03",
    "DB_PASSWORD": "pw",
}


def test_infrastructure_binaries_get_the_basics_only():
    for role in ("etcd", "nats", "prometheus"):
        env = child_env(Service(name=role, role=role), "inst", base=LAUNCHER)
        assert set(env) == {"PATH", "HOME", "LC_ALL", "DYNKV_INSTANCE"}, role


def test_python_services_keep_the_environment_but_no_secret_they_were_not_given():
    worker = Service(name="worker", role="agg", env={"HF_TOKEN": "hf_plan"}, env_unset=("X",))
    env = child_env(worker, "inst", base=LAUNCHER)
    assert env["HF_TOKEN"] == "hf_plan" and env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert env["FAKE_VLLM_TOKENS"] == "20" and env["FAKE_VLLM_TOKEN_DELAY"] == "0.03"
    assert "DB_PASSWORD" not in env
    assert "DYNKV_API_KEY" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    frontend = child_env(Service(name="frontend", role="frontend"), "inst", base=LAUNCHER)
    assert "HF_TOKEN" not in frontend and "DYNKV_API_KEY" not in frontend


def test_same_process_needs_the_recorded_create_time():
    me = psutil.Process()
    assert same_process(os.getpid(), None) is None  # a pid alone proves nothing
    assert same_process(os.getpid(), me.create_time()) == me
    assert same_process(os.getpid(), me.create_time() - 100) is None


def test_url_passwords_are_masked_in_argv_and_printed_plans():
    assert redact_urls("http://a:2379,http://u:pw@b:2379") == "http://a:2379,http://u:***@b:2379"
    assert redact_urls("http://127.0.0.1:8100/health") == "http://127.0.0.1:8100/health"
    assert mask_argv(["--etcd-endpoints", "http://u:pw@h:2379", "--x=nats://n:s@h:4222"]) == [
        "--etcd-endpoints",
        "http://u:***@h:2379",
        "--x=nats://n:***@h:4222",
    ]
    plan = plan_for(
        {
            "DYNKV_INFRA": "external",
            "DYNKV_ETCD_ENDPOINTS": "http://root:hunter2@10.0.0.1:2379",
            "DYNKV_NATS_URL": "nats://app:hunter2@10.0.0.1:4222",
        }
    )
    printed = json.dumps(plan.to_json())
    assert "hunter2" not in printed and "root:***@10.0.0.1" in printed
    assert "hunter2" in json.dumps(plan.to_json(mask=False))  # the services still get it
    assert all("hunter2" not in p.describe() for p in plan.external)
    # nor on any service's argv, which every local user can read (ps, /proc/PID/cmdline)
    assert not [s.name for s in plan.services if "hunter2" in " ".join(s.argv)]
    assert (
        plan.service("frontend")
        .env["DYNKV_FRONTEND_ETCD_ENDPOINTS"]
        .startswith("http://root:hunter2@")
    )
