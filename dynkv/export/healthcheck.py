"""`python3 -m dynkv.export.healthcheck '<probes as JSON>'`: the plan's readiness probes, run
inside a container (a compose healthcheck, a Kubernetes exec readiness probe).

The argument is the JSON list of the plan's probes (`dynkv.plan.model.probe_json`), so a container
is healthy exactly when `dynkv up` would call its service healthy: a worker when vLLM answers
`/health` *and* its registration is in etcd. `${VAR}` in it is expanded from the container's
environment first (a Kubernetes worker's registration key ends in its pod name, which only the
pod knows). Exit 0 healthy, 1 not (the reason on stdout), 2 bad argument.
"""

from __future__ import annotations

import json
import os
import sys

TIMEOUT = 5.0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 -m dynkv.export.healthcheck '<probes as JSON>'", file=sys.stderr)
        return 2
    from dynkv.plan.model import probe_from_json
    from dynkv.supervisor.health import check_all

    try:
        data = json.loads(os.path.expandvars(args[0]))
    except ValueError as exc:
        print(f"the probes are not JSON: {exc}", file=sys.stderr)
        return 2
    probes = [probe_from_json(item) for item in data] if isinstance(data, list) else [None]
    if any(p is None for p in probes):
        print("a probe this dynkv does not know", file=sys.stderr)
        return 2
    ok, detail = check_all(probes, timeout=TIMEOUT)  # type: ignore[arg-type]
    print(detail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
