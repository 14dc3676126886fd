"""Remember a successful vLLM import probe while the files it proved are unchanged.

The probe (dynkv.doctor.vllm_probe) imports vLLM in a child process: seconds on a quiet box, a
minute on a busy 2-core one, paid by every `dynkv up` and `dynkv doctor`. Its answer only changes
when the interpreter, vLLM, torch or the bundled connector change on disk, so a success is kept
under a key made of those files' identities (path, size, mtime) and reused while the key matches.
Failures are never kept: the next run tries again, so a fix shows at once. The file lives in the
user's cache (`$XDG_CACHE_HOME/dynkv/vllm-probe.json`), private mode; a corrupt or foreign file is
ignored and overwritten.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from dynkv.doctor.vllm_probe import CONNECTOR_MODULE, ProbeResult
from dynkv.xdg import dynkv_cache

_PACKAGES = ("vllm", "torch", "transformers")


def cache_path() -> Path:
    return dynkv_cache() / "vllm-probe.json"


def probe_key() -> str | None:
    """A digest of what the probe's answer depends on; None when vLLM cannot be found (the
    probe then runs and reports why)."""
    parts = [os.path.realpath(sys.executable)]
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)  # top-level: finds without importing
        if spec is None or spec.origin is None:
            if name == "vllm":
                return None
            parts.append(f"{name}:absent")
            continue
        parts.append(f"{name}:{_identity(Path(spec.origin))}")
    connector = Path(__file__).resolve().parent.parent / "kvbm"  # CONNECTOR_MODULE's package
    for path in sorted(connector.glob("*.py")):
        parts.append(f"{path.name}:{_identity(path)}")
    parts.append(CONNECTOR_MODULE)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached_probe(run: Callable[[], ProbeResult], path: Path | None = None) -> ProbeResult:
    """The kept result when the key matches, else `run()` (kept when it succeeded)."""
    path = path or cache_path()
    key = probe_key()
    if key is not None:
        kept = _read(path, key)
        if kept is not None:
            return kept
    result = run()
    if key is not None and result.vllm_ok and result.connector_ok:
        _write(path, key, result)
    return result


def _identity(path: Path) -> str:
    """The file and its directory (a reinstall replaces files and touches the directory)."""
    try:
        st, dt = path.stat(), path.parent.stat()
    except OSError:
        return "unreadable"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}:{dt.st_mtime_ns}"


def _read(path: Path, key: str) -> ProbeResult | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        fields = {k: v for k, v in data["result"].items() if k in ProbeResult.__dataclass_fields__}
        return replace(ProbeResult(**fields), cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(path: Path, key: str, result: ProbeResult) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"key": key, "result": asdict(result)}, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs the next run its probe
