"""Is a TCP port free, and if not, which process holds it?

Used before anything starts (`up`, `doctor`): a taken port is reported with its owner's pid and
command line, so the user can tell a stale dynkv from an unrelated server.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

MAX_PORT = 65535


@dataclass(frozen=True)
class PortOwner:
    pid: int | None
    name: str
    cmdline: str

    def describe(self) -> str:
        if self.pid is None:
            return "another process (not visible to this user)"
        return f"pid {self.pid} ({self.name}: {self.cmdline[:120]})"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a listening socket could bind host:port now (SO_REUSEADDR, as servers do).
    A number outside 1–65535 names no port, so none is free there."""
    if not 0 < port <= MAX_PORT:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def port_owner(port: int) -> PortOwner | None:
    """The process listening on `port` (any address), or None when nobody listens."""
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        conns = []
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return PortOwner(None, "?", "")
            try:
                proc = psutil.Process(conn.pid)
                return PortOwner(conn.pid, proc.name(), " ".join(proc.cmdline()))
            except psutil.Error:
                return PortOwner(conn.pid, "?", "")
    return None


_EPHEMERAL_FALLBACK = (32768, 60999)
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the source ports of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _EPHEMERAL_FALLBACK


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and outside the kernel's ephemeral range.

    A port from bind(0) comes from the ephemeral range, so any outgoing connection may take it as
    its source port before the server that was meant to listen on it starts (seen on a busy box:
    a worker's etcd client held the port chosen for etcd). Ports below that range are never
    handed out by the kernel; each is given out at most once per process."""
    import random

    low, high = ephemeral_range()
    candidates = [(10000, low - 1)] if low > 11000 else []
    if high < 65000:
        candidates.append((high + 1, MAX_PORT))
    rng = random.Random()
    for _ in range(500):
        lo, hi = rng.choice(candidates) if candidates else (1024, MAX_PORT)
        port = rng.randint(lo, hi)
        if port in _handed_out or not port_is_free(port, host):
            continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # last resort
        sock.bind((host, 0))
        return sock.getsockname()[1]
