"""The dynkv image's ENTRYPOINT (deploy/docker/Dockerfile): `python3 -m dynkv.export.entrypoint`.

With a command (what every exported manifest passes: the plan's `python3 -m dynkv.worker …` or
`python3 -m dynkv.frontend …`) it runs that command; without one, the role `DYNKV_ROLE` names:
`frontend` (configured by `DYNKV_FRONTEND_*`), or `worker` (`DYNKV_WORKER_*`, and the vLLM
arguments in `DYNKV_VLLM_ARGS`).

First it makes the container's shared directories fit dynkv's rule for shared paths
(docs/security.md, "Shared paths"), which a volume mount point breaks: an emptyDir is created
mode 0777 without the sticky bit. The handoff pool's parent (/dev/shm, an emptyDir of medium
Memory in a Kubernetes pod) gets the sticky bit /dev/shm normally has; the G3 mount point loses
group and other write. Only directories the container's user owns are touched.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

from dynkv.plan.worker import VLLM_MODULE

ROLE_ENV = "DYNKV_ROLE"
VLLM_ARGS_ENV = "DYNKV_VLLM_ARGS"
USAGE = (
    "usage: python3 -m dynkv.export.entrypoint [COMMAND...]  "
    f"(no command: {ROLE_ENV}=frontend, or {ROLE_ENV}=worker with {VLLM_ARGS_ENV})"
)


def prepare(environ: Mapping[str, str]) -> None:
    handoff = environ.get("DYN_KVBM_HANDOFF_DIR")
    if handoff:
        _close(Path(handoff).parent, sticky=True)
    pool = environ.get("DYN_KVBM_DISK_CACHE_DIR")
    if pool:
        parent = Path(pool).parent
        try:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            return  # dynkv's own check reports the path with its cause and fix
        _close(parent, sticky=False)


def _close(path: Path, *, sticky: bool) -> None:
    try:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return
        mode = stat.S_IMODE(info.st_mode)
        if not mode & (stat.S_IWGRP | stat.S_IWOTH):
            return
        os.chmod(path, mode | stat.S_ISVTX if sticky else mode & ~(stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        pass  # as above: the runtime refuses an unsafe path with a clear message


def command(argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """What to exec; SystemExit(2) with the usage when there is nothing to run."""
    if argv:
        return argv
    role = environ.get(ROLE_ENV, "")
    python = sys.executable or "python3"
    if role == "frontend":
        return [python, "-m", "dynkv.frontend"]
    if role == "worker":
        vllm = shlex.split(environ.get(VLLM_ARGS_ENV, ""))
        if not vllm:
            raise SystemExit(f"{VLLM_ARGS_ENV} is empty: a worker needs vLLM's arguments\n{USAGE}")
        return [python, "-m", "dynkv.worker", "--", python, "-m", VLLM_MODULE, *vllm]
    print(USAGE, file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    run = command(args, os.environ)
    prepare(os.environ)
    sys.stdout.flush()
    os.execvp(run[0], run)


if __name__ == "__main__":
    main()
