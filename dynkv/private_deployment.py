"""A deployment of one's own beside whatever else runs on the host: fresh ports, none of the
caller's settings, and the CLI run as a child process.

`dynkv bench serve --compare`, `scripts/smoke`, `scripts/load` and the end-to-end tests all start
whole stacks with `dynkv up -d` next to the user's (or another test's) deployment. They share
three needs, kept here:
- every port variable of the plan's port layout (`dynkv.plan.ports`) set to a free port, the
  per-worker ones with room for a second worker;
- the caller's exported `DYNKV_*`/`DYN_KVBM_*` removed when the stack must be exactly what was
  asked (an exported `DYN_KVBM_DISK_CACHE_GB` would give every profile a disk tier);
- `python -m dynkv.cli.main …` with this interpreter, output captured.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

from dynkv.plan.ports import PER_WORKER_VARIABLES, SHARED_VARIABLES
from dynkv.ports import MAX_PORT, free_port, port_is_free

SETTING_PREFIXES = ("DYNKV_", "DYN_KVBM_")

# Each worker i of a deployment takes value + i of the per-worker ones: disagg needs two in a
# row. The list is the plan's port layout (the Prometheus port is used only with --observability).
PER_WORKER_PORTS = PER_WORKER_VARIABLES
SHARED_PORTS = SHARED_VARIABLES
WORKERS_PER_STACK = 2


class NoFreePorts(RuntimeError):
    """No run of consecutive free ports was found."""


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` less every `DYNKV_*`/`DYN_KVBM_*` variable (any case)."""
    return {k: v for k, v in environ.items() if not k.upper().startswith(SETTING_PREFIXES)}


def free_port_run(length: int) -> int:
    """A free port p such that p … p+length-1 are all free (NoFreePorts after 200 tries)."""
    for _ in range(200):
        base = free_port()  # may be as high as 65535: the run must fit below it
        if base + length - 1 <= MAX_PORT and all(port_is_free(base + i) for i in range(1, length)):
            return base
    raise NoFreePorts(f"found no {length} free consecutive ports")


def fresh_ports(workers: int = WORKERS_PER_STACK) -> dict[str, str]:
    """Every port variable of a deployment of up to `workers` workers, each a free port."""
    ports = {var: str(free_port()) for var in SHARED_PORTS}
    for var in PER_WORKER_PORTS:
        ports[var] = str(free_port_run(workers))
    return ports


def dynkv_cli(
    *args: str, env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m dynkv.cli.main ARGS` with this interpreter and `env`; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dynkv.cli.main", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
