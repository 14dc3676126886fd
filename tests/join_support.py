"""A first host's join state for unit tests: a deployment dir with its CA, and tokens for it
(imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

from dynkv.join.issue import new_token
from dynkv.join.token import JoinToken
from dynkv.tls.ca import DeploymentCA

NOW = 1_800_000_000


def first_host_dir(tmp_path: Path, name: str = "default") -> Path:
    ddir = tmp_path / name
    ddir.mkdir(mode=0o700, parents=True)
    DeploymentCA.ensure(ddir / "tls", name)
    return ddir


def make(
    ddir: Path, *, ttl: int = 3600, now: float | None = NOW, node: str | None = None
) -> tuple[JoinToken, str]:
    return new_token(
        deployment=ddir.name,
        deployment_dir=ddir,
        tls_dir=ddir / "tls",
        etcd_endpoints=("https://127.0.0.1:2379",),
        nats_url="tls://127.0.0.1:4222",
        frontend_url="https://127.0.0.1:8000",
        registration_secret="s" * 64,
        nats_token="n" * 32,
        ttl_s=ttl,
        node=node,
        now=now,
    )
