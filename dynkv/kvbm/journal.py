"""The G3 index, kept on disk so a restarted engine finds its blocks again.

An append-only journal beside the pool file: a header (magic, version, layout fingerprint, slot
stride and count) and fixed-size records `PUT key slot checksum` / `DEL key slot`, each with its
own check word. A block's PUT is appended only after its bytes are written, so the journal never
points at a block that was not stored; a record torn by a crash fails its check word and ends the
replay; and a block whose bytes were torn or overwritten fails its checksum on load (a miss).
Replay keeps journal order as LRU order. On open the journal is compacted to the live entries.
A different fingerprint (another model or layout) discards everything, with one log line.

A journal that cannot be written (the disk filled up, the directory was deleted or remounted
read-only under a running engine) must neither stop the engine nor be trusted by the next one:
the first failed write truncates the file (which needs no free space), logs one line, and turns
every later write into a no-op (`broken`). The pool keeps serving this run; a restart starts with
an empty G3 instead of an index that lost track of what the slots hold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

log = logging.getLogger("dynkv.kvbm")

JOURNAL_FILE = "index.journal"
_MAGIC = b"DKVJ"
_VERSION = 1
_HEADER = struct.Struct("<4sI16sQQ24x")  # 64 bytes
_RECORD = struct.Struct("<B3xIQ16sI4x")  # 40 bytes: op, slot, checksum, key, check word
PUT, DEL = 1, 2


@dataclass(frozen=True)
class Entry:
    key: int
    slot: int
    checksum: int


def _check_word(op: int, slot: int, checksum: int, key: bytes) -> int:
    return xxhash.xxh32_intdigest(struct.pack("<BIQ16s", op, slot, checksum, key))


class Journal:
    def __init__(self, directory: str | os.PathLike, fingerprint: bytes, stride: int, slots: int):
        self.path = Path(directory) / JOURNAL_FILE
        self._header = _HEADER.pack(_MAGIC, _VERSION, fingerprint, stride, slots)
        self._fingerprint = fingerprint
        self.slots = slots
        self._live = 0
        self._records = 0
        self._fh = None
        self.broken: OSError | None = None  # the write that failed; nothing is journaled since

    def open(self) -> list[Entry]:
        """Replay (or discard) the journal, compact it, and return live entries, oldest first.
        The entries are valid for this run even when the compacted copy cannot be written."""
        entries = self._replay()
        self.compact(entries)
        return entries

    def read(self) -> list[Entry]:
        """Live entries, oldest first, without touching the file (the leader's view at start-up;
        the store, which owns the file, has already replayed and compacted it)."""
        return self._replay(quiet=True)

    def _replay(self, quiet: bool = False) -> list[Entry]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # docs/security.md
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            if not quiet:
                log.warning("KVBM: cannot read the disk cache index %s (%s)", self.path, exc)
            return []
        if len(data) < _HEADER.size:
            return []
        if data[: _HEADER.size] != self._header:
            if not quiet:
                self._log_discarded(data)
            return []
        return self._replay_records(data, quiet)

    def _log_discarded(self, data: bytes) -> None:
        magic, _version, fingerprint, _stride, _slots = _HEADER.unpack_from(data)
        if magic == _MAGIC and fingerprint != self._fingerprint:
            reason = "another model or KV layout (fingerprint differs)"
        else:
            reason = "another pool geometry or format"
        log.warning(
            "KVBM: disk cache %s was written for %s; discarding its %d blocks",
            self.path.parent,
            reason,
            self._count_live(data),
        )

    def _replay_records(self, data: bytes, quiet: bool) -> list[Entry]:
        """Apply the records in order; a torn record ends the replay, and a record naming a slot
        outside the pool (a corrupt or forged journal whose check word still holds) is skipped:
        the pool must never be asked to read or write outside itself."""
        table: dict[int, Entry] = {}  # key -> entry, insertion order = LRU order
        by_slot: dict[int, int] = {}  # slot -> key
        outside = 0
        for offset in range(_HEADER.size, len(data) - _RECORD.size + 1, _RECORD.size):
            op, slot, checksum, key, word = _RECORD.unpack_from(data, offset)
            if op not in (PUT, DEL) or word != _check_word(op, slot, checksum, key):
                break  # torn tail: everything after it is untrusted
            if not 0 <= slot < self.slots:
                outside += 1
                continue
            k = int.from_bytes(key, "little")
            if op == PUT:
                # a slot holds one block: a PUT into a slot supersedes its previous key
                previous = by_slot.pop(slot, None)
                if previous is not None:
                    table.pop(previous, None)
                old = table.pop(k, None)
                if old is not None:
                    by_slot.pop(old.slot, None)
                table[k] = Entry(k, slot, checksum)
                by_slot[slot] = k
            elif k in table and table[k].slot == slot:
                del table[k]
                del by_slot[slot]
        if outside and not quiet:
            log.warning(
                "KVBM: the disk cache index %s names %d slot(s) outside its %d-slot pool; "
                "ignoring them",
                self.path,
                outside,
                self.slots,
            )
        return list(table.values())

    def _count_live(self, data: bytes) -> int:
        count = 0
        for offset in range(_HEADER.size, len(data) - _RECORD.size + 1, _RECORD.size):
            op = data[offset]
            count += 1 if op == PUT else -1 if op == DEL else 0
        return max(count, 0)

    def _rewrite(self, entries: list[Entry]) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._header)
                for e in entries:
                    fh.write(self._pack(PUT, e.key, e.slot, e.checksum))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 (held open for appends)
        self._live = len(entries)
        self._records = len(entries)

    @staticmethod
    def _pack(op: int, key: int, slot: int, checksum: int) -> bytes:
        kb = key.to_bytes(16, "little")
        return _RECORD.pack(op, slot, checksum, kb, _check_word(op, slot, checksum, kb))

    def put(self, key: int, slot: int, checksum: int) -> None:
        if self._append(self._pack(PUT, key, slot, checksum)):
            self._live += 1

    def delete(self, key: int, slot: int) -> None:
        if self._append(self._pack(DEL, key, slot, 0)):
            self._live -= 1

    def _append(self, record: bytes) -> bool:
        if self.broken is not None:
            return False
        if self._fh is None:
            raise RuntimeError("journal is not open")
        try:
            written = self._fh.write(record)
            if written != len(record):  # a full disk may take part of a record before ENOSPC
                raise OSError(28, f"short write to the journal ({written}/{len(record)} bytes)")
        except OSError as exc:
            self._disable(exc)
            return False
        self._records += 1
        return True

    def needs_compaction(self) -> bool:
        return self.broken is None and self._records > 4 * max(self._live, 1024)

    def compact(self, entries: list[Entry]) -> None:
        if self.broken is not None:
            return
        try:
            self._rewrite(entries)
        except OSError as exc:
            self._disable(exc)

    def _disable(self, exc: OSError) -> None:
        """Stop journaling for the rest of the run, once, leaving nothing a restart could trust."""
        if self.broken is not None:
            return
        self.broken = exc
        if self._fh is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fh.fileno(), 0)  # shrinking needs no free space
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        else:  # failed at start-up: the file on disk may hold the last run's index
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)
        log.warning(
            "KVBM: the disk cache index %s cannot be written (%s); G3 keeps serving this run, "
            "but its blocks will not be offered again after a restart",
            self.path,
            exc.strerror or exc,
        )

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):  # a failing disk must not fail the shutdown
                os.fsync(self._fh.fileno())
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
