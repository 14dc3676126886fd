"""The user's base directories, by the XDG rule: the variable when set, else the default under
home. Every dynkv path in a user's cache or state starts here (the KVBM runtime, which imports
nothing else from dynkv, applies the same rule in `dynkv.kvbm.config.default_disk_cache_dir`).
And whether the file system can name a directory the user gave at all (`overlong_name`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cache_home(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CACHE_HOME`, else `~/.cache`; `env` defaults to this process's environment."""
    value = (os.environ if env is None else env).get("XDG_CACHE_HOME")
    return Path(value).expanduser() if value else Path.home() / ".cache"


def state_home(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME`, else `~/.local/state`."""
    value = (os.environ if env is None else env).get("XDG_STATE_HOME")
    return Path(value).expanduser() if value else Path.home() / ".local" / "state"


NAME_MAX = 255  # bytes of one path component on Linux file systems (ext4, xfs, tmpfs)


def overlong_name(path: Path) -> str | None:
    """The first name in `path` longer than NAME_MAX bytes, which no lookup under it survives
    (ENAMETOOLONG: Python 3.11's `Path.is_dir` raises it rather than answering), else None."""
    for part in path.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            return part
    return None


def dynkv_cache(env: Mapping[str, str] | None = None) -> Path:
    """dynkv's own corner of the cache: models, the vLLM probe and argument caches."""
    return cache_home(env) / "dynkv"
