"""Checksums of a fetched model's files, written beside them and checked whenever it is used.

`SHA256SUMS` has the format of `sha256sum` (so `sha256sum -c SHA256SUMS` checks it by hand): a
model that was damaged on disk, or half replaced by hand, is refused instead of served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

from dynkv.errors import CauseFix

SUMS_FILE = "SHA256SUMS"
_CHUNK = 1 << 20


class IntegrityError(CauseFix):
    """A model file is missing or does not match its recorded checksum."""


def sha256_file(path: Path, advance: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if advance:
                advance(len(chunk))
    return digest.hexdigest()


def write_sums(
    directory: Path, names: Iterable[str], advance: Callable[[int], None] | None = None
) -> dict[str, str]:
    """Hash `names` (files of `directory`) and record them in SHA256SUMS; returns name → hex."""
    sums = {name: sha256_file(directory / name, advance) for name in sorted(names)}
    text = "".join(f"{digest}  {name}\n" for name, digest in sums.items())
    (directory / SUMS_FILE).write_text(text)
    return sums


def read_sums(directory: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in (directory / SUMS_FILE).read_text().splitlines():
        digest, _, name = line.partition("  ")
        if digest and name:
            sums[name] = digest
    return sums


def verify(directory: Path, model: str, advance: Callable[[int], None] | None = None) -> None:
    """Raise IntegrityError unless every file in SHA256SUMS is there with its recorded hash."""
    fix = f"dynkv model fetch {model} --force   (downloads and converts it again)"
    try:
        sums = read_sums(directory)
    except OSError:
        raise IntegrityError(f"model {model} at {directory} has no {SUMS_FILE}", fix) from None
    if not sums:
        raise IntegrityError(f"{directory / SUMS_FILE} lists no file", fix)
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"model {model}: {path} is missing", fix)
        if sha256_file(path, advance) != expected:
            raise IntegrityError(
                f"model {model}: {path} does not match its recorded sha256 (damaged or modified)",
                fix,
            )


def total_bytes(directory: Path) -> int:
    """Bytes `verify` will read (for a progress bar)."""
    try:
        return sum((directory / n).stat().st_size for n in read_sums(directory))
    except OSError:
        return 0
