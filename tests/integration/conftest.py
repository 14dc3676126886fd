"""Fixtures that touch the real machine: filesystems mounted for a test (we run as root in CI)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def _mount(kind: str, target: Path, options: str | None = None) -> None:
    cmd = ["mount", "-t", kind]
    if options:
        cmd += ["-o", options]
    proc = subprocess.run([*cmd, kind, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount {kind} here: {proc.stderr.strip() or proc.returncode}")


@pytest.fixture
def mounted(tmp_path):
    """mounted(kind, options) → a fresh mount point of that filesystem, unmounted afterwards."""
    points: list[Path] = []

    def make(kind: str, options: str | None = None) -> Path:
        target = tmp_path / f"{kind}-{len(points)}"
        target.mkdir()
        _mount(kind, target, options)
        points.append(target)
        return target

    yield make
    for target in reversed(points):
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.fixture
def ramfs(mounted):
    """A ramfs: refuses O_DIRECT (EINVAL) and fallocate(2) (EOPNOTSUPP), unlike tmpfs and ext4."""
    return mounted("ramfs")
