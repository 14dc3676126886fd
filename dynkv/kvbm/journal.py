"""The G3 index, kept on disk so a restarted engine finds its blocks again.

An append-only journal beside the pool file: a header (magic, version, layout fingerprint, slot
stride and count) and fixed-size records `PUT key slot checksum` / `DEL key slot`, each with its
own check word. A block's PUT is appended only after its bytes are written, so the journal never
points at a block that was not stored; a record torn by a crash fails its check word and ends the
replay; and a block whose bytes were torn or overwritten fails its checksum on load (a miss).
Replay keeps journal order as LRU order. On open the journal is compacted to the live entries.
A different fingerprint (another model or layout) discards everything, with one log line.
"""

from __future__ import annotations

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
        self._live = 0
        self._records = 0
        self._fh = None

    def open(self) -> list[Entry]:
        """Replay (or discard) the journal, compact it, and return live entries, oldest first."""
        entries = self._replay()
        self._rewrite(entries)
        return entries

    def read(self) -> list[Entry]:
        """Live entries, oldest first, without touching the file (the leader's view at start-up;
        the store, which owns the file, has already replayed and compacted it)."""
        return self._replay(quiet=True)

    def _replay(self, quiet: bool = False) -> list[Entry]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if len(data) < _HEADER.size:
            return []
        magic, version, fingerprint, stride, slots = _HEADER.unpack_from(data)
        if data[: _HEADER.size] != self._header:
            if magic == _MAGIC and fingerprint != self._fingerprint:
                reason = "another model or KV layout (fingerprint differs)"
            else:
                reason = "another pool geometry or format"
            live = self._count_live(data)
            if quiet:
                return []
            log.warning(
                "KVBM: disk cache %s was written for %s; discarding its %d blocks",
                self.path.parent,
                reason,
                live,
            )
            return []
        table: dict[int, Entry] = {}  # key -> entry, insertion order = LRU order
        by_slot: dict[int, int] = {}  # slot -> key
        for offset in range(_HEADER.size, len(data) - _RECORD.size + 1, _RECORD.size):
            op, slot, checksum, key, word = _RECORD.unpack_from(data, offset)
            if op not in (PUT, DEL) or word != _check_word(op, slot, checksum, key):
                break  # torn tail: everything after it is untrusted
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
        return list(table.values())

    def _count_live(self, data: bytes) -> int:
        count = 0
        for offset in range(_HEADER.size, len(data) - _RECORD.size + 1, _RECORD.size):
            op = data[offset]
            count += 1 if op == PUT else -1 if op == DEL else 0
        return max(count, 0)

    def _rewrite(self, entries: list[Entry]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._header)
            for e in entries:
                fh.write(self._pack(PUT, e.key, e.slot, e.checksum))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
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
        self._append(self._pack(PUT, key, slot, checksum))
        self._live += 1

    def delete(self, key: int, slot: int) -> None:
        self._append(self._pack(DEL, key, slot, 0))
        self._live -= 1

    def _append(self, record: bytes) -> None:
        if self._fh is None:
            raise RuntimeError("journal is not open")
        self._fh.write(record)
        self._records += 1

    def needs_compaction(self) -> bool:
        return self._records > 4 * max(self._live, 1024)

    def compact(self, entries: list[Entry]) -> None:
        self._rewrite(entries)

    def close(self) -> None:
        if self._fh is not None:
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
