"""The first host's join state: the key that MACs join tokens, and the tokens already used.

Both live in `<state dir>/<name>/join/` (0700): `join.key` (32 random bytes, hex, 0600), made by
the first `dynkv join-token`, and `used/<token id>` (empty, 0600), one per token a node enrolled
with, so that a token joins one node only. `dynkv down` leaves both in place (like `tls/` and the
deployment secret): tokens printed before stay valid until they expire; removing `join.key` voids
every unused one (docs/multi-host.md#joining-hosts-join-token-join).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from dynkv.kvbm.paths import check_existing_file, open_private_file, private_dir

JOIN_DIR = "join"
KEY_FILE = "join.key"
USED_DIR = "used"
_FIX = "remove it if it is a leftover of yours, or choose another --name"


def join_dir(deployment_dir: Path) -> Path:
    return Path(deployment_dir) / JOIN_DIR


def _read(path: Path) -> bytes | None:
    check_existing_file(path, _FIX)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        return None
    return key if len(key) >= 32 else None


def join_key(deployment_dir: Path, *, create: bool) -> bytes | None:
    """The deployment's join key; made (0600) when `create` and there is none. None: there is
    none and `create` is False (no token was ever printed for this deployment)."""
    directory = join_dir(deployment_dir)
    path = directory / KEY_FILE
    if not create:
        return _read(path) if directory.is_dir() else None
    private_dir(directory, _FIX)
    existing = _read(path)
    if existing is not None:
        return existing
    key = secrets.token_bytes(32)
    fd, created = open_private_file(path, os.O_WRONLY, _FIX)
    if not created:  # another join-token made it meanwhile
        os.close(fd)
        return _read(path)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(key.hex())
    return key


def mark_used(deployment_dir: Path, token_id: str) -> bool:
    """Record that `token_id` enrolled a node; False when it had already (a replay)."""
    used = join_dir(deployment_dir) / USED_DIR
    private_dir(used, _FIX)
    fd, created = open_private_file(used / token_id, os.O_WRONLY, _FIX)
    os.close(fd)
    return created


def write_private(path: Path, data: bytes) -> None:
    """`data` into `path` (its directory made 0700), 0600 from the first byte, replaced
    atomically; a symlink planted at the temporary name is refused (O_NOFOLLOW|O_EXCL)."""
    private_dir(path.parent, _FIX)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
