"""Is a TCP port free, and if not, which process holds it?

Used before anything starts (`up`, `doctor`): a taken port is reported with its owner's pid and
command line, so the user can tell a stale dynkv from an unrelated server.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import psutil


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
    """True when a listening socket could bind host:port now (SO_REUSEADDR, as servers do)."""
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


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (tests and auto-assigned services)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
