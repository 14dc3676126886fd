"""`python -m dynkv.worker` settings: flags and DYNKV_WORKER_* read into one typed model."""

from __future__ import annotations

import pytest

from dynkv.kvbm.roles import Role
from dynkv.plan.worker import worker_service
from dynkv.worker.config import USAGE, WorkerConfig, parse_args

REQUIRED = [
    "--role",
    "agg",
    "--deployment",
    "dep",
    "--worker-id",
    "agg-0",
    "--url",
    "http://127.0.0.1:8100",
    "--served-model-name",
    "tiny",
    "--etcd-endpoints",
    "http://127.0.0.1:2379",
]


def test_flags_with_the_models_defaults():
    cfg, child = parse_args([*REQUIRED, "--", "vllm", "serve", "--port", "8100"], environ={})
    assert child == ["vllm", "serve", "--port", "8100"]
    assert cfg.role is Role.AGG and cfg.etcd_endpoints == ("http://127.0.0.1:2379",)
    defaults = {n: f.default for n, f in WorkerConfig.model_fields.items() if not f.is_required()}
    assert {n: getattr(cfg, n) for n in defaults} == defaults
    assert defaults["lease_ttl"] == 10 and defaults["unhealthy_after"] == 3


def test_environment_fills_what_the_command_line_leaves_out_and_flags_win():
    env = {
        "DYNKV_WORKER_DEPLOYMENT": "from-env",
        "DYNKV_WORKER_WORKER_ID": "decode-1",
        "DYNKV_WORKER_URL": "http://127.0.0.1:8101",
        "DYNKV_WORKER_SERVED_MODEL_NAME": "tiny",
        "DYNKV_WORKER_ETCD_ENDPOINTS": "http://127.0.0.1:2379, http://127.0.0.2:2379",
        "DYNKV_WORKER_HEALTH_INTERVAL": "0.5",
        "DYNKV_WORKER_LEASE_TTL": "30",
        "DYNKV_WORKER_PORT": "8100",  # `dynkv up`'s port setting: not a wrapper field
    }
    cfg, _ = parse_args(["--role", "decode", "--lease-ttl", "7", "--", "vllm"], environ=env)
    assert cfg.role is Role.DECODE and cfg.deployment == "from-env"
    assert cfg.etcd_endpoints == ("http://127.0.0.1:2379", "http://127.0.0.2:2379")
    assert cfg.health_interval == 0.5 and cfg.lease_ttl == 7


def test_the_plans_command_line_parses(tmp_path):
    svc = worker_service(
        deployment="dep",
        deployment_dir=tmp_path,
        role=Role.PREFILL,
        index=0,
        python="/usr/bin/python3",
        vllm=("vllm", "serve", "tiny"),
        port=8100,
        served_name="tiny",
        metrics="http://127.0.0.1:9100/metrics",
        metrics_port=9100,
        env={},
        env_unset=(),
        etcd_endpoints=("http://127.0.0.1:2379",),
        lease_ttl=10,
        depends_on=(),
        cpus=(2, 3, 5),
    )
    argv = list(svc.argv)
    # the plan's environment, as the supervisor gives it: etcd URLs travel there, off argv
    cfg, child = parse_args(argv[argv.index("dynkv.worker") + 1 :], environ=svc.env)
    assert cfg.role is Role.PREFILL and cfg.worker_id == "prefill-0"
    assert cfg.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert cfg.metrics_url and child == ["vllm", "serve", "tiny"]
    assert cfg.cpus == (2, 3, 5)  # written 2-3,5


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--role", "agg", "--", "true"], {}, "the following arguments are required: --deployment"),
        ([*REQUIRED, "--role", "mixed", "--", "true"], {}, "invalid choice: 'mixed'"),
        ([*REQUIRED, "--unhealthy-after", "0", "--", "true"], {}, "--unhealthy-after:"),
        ([*REQUIRED, "--etcd-endpoints", " , ", "--", "true"], {}, "--etcd-endpoints:"),
        ([*REQUIRED, "--", "true"], {"DYNKV_WORKER_LEASE_TTL": "soon"}, "DYNKV_WORKER_LEASE_TTL:"),
        ([*REQUIRED, "--bogus", "1", "--", "true"], {}, "unrecognized arguments: --bogus"),
        ([*REQUIRED, "--cpus", "auto", "--", "true"], {}, "--cpus:"),
        ([*REQUIRED, "--", "true"], {"DYNKV_WORKER_CPUS": "3-1"}, "DYNKV_WORKER_CPUS:"),
    ],
)
def test_usage_errors_exit_2_with_the_cause(argv, env, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, environ=env)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_no_separator_or_no_command_is_the_usage_line():
    with pytest.raises(SystemExit) as exc:
        parse_args(REQUIRED, environ={})
    assert exc.value.code == USAGE
    with pytest.raises(SystemExit) as exc:
        parse_args([*REQUIRED, "--"], environ={})
    assert "no command after --" in str(exc.value.code)
