"""The per-deployment secret: signs worker registrations and keys the workers' HTTP ports.

Generated once per deployment and kept in `<state dir>/<name>/deployment.secret` (0600, written by
the supervisor with the plan's other generated files, so `up --dry-run` writes nothing); a later
`up` of the same deployment reads it back. It reaches the worker wrappers and the frontend in
their environment only (`DYNKV_DEPLOYMENT_SECRET`; the plan's printers mask the name), never in
argv, a log or the state file. docs/security.md says what it protects and what it does not.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

SECRET_FILE = "deployment.secret"
SECRET_BYTES = 32


def secret_path(deployment_dir: Path) -> Path:
    return deployment_dir / SECRET_FILE


def read_or_new(deployment_dir: Path) -> str:
    """The deployment's secret: the one on disk when it is ours and private, else a fresh one
    (which the supervisor then writes). A file that other users could read is not reused."""
    path = secret_path(deployment_dir)
    try:
        info = path.lstat()
        if (
            stat.S_ISREG(info.st_mode)
            and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
        ):
            existing = path.read_text(encoding="ascii").strip()
            if len(existing) >= 32:
                return existing
    except (OSError, UnicodeDecodeError):
        pass
    return secrets.token_hex(SECRET_BYTES)
