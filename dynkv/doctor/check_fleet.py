"""The fleet on a CPU host: do the workers get cores of their own (docs/fleet.md). The GPU side
is `gpu.count`, the memory side `memory.ram`; this one only concerns OpenMP bind lists."""

from __future__ import annotations

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, ok, warn
from dynkv.plan.cpu import cpu_list, split_cores


def cores(ctx: DoctorContext) -> Outcome | None:
    if ctx.device != "cpu":
        return None
    n, ids = ctx.workers, ctx.cpus
    if not ids or not n:  # n = 0: a control-plane-only first host (docs/multi-host.md)
        return None
    lists = split_cores(ids, n)
    shown = ", ".join(cpu_list(c) for c in lists[:8]) + (" …" if n > 8 else "")
    if n > len(ids):
        return warn(
            f"{n} workers on {len(ids)} usable core(s): some share a core and slow each other "
            f"down (OpenMP threads spin); bind lists {shown}",
            f"run at most {len(ids)} workers (--workers {len(ids)}), or on a host with more cores",
        )
    if n == 1:
        return ok(f"1 worker on {len(ids)} core(s) ({cpu_list(ids)})")
    return ok(f"{n} workers on {len(ids)} cores, each its own: {shown}")


CHECKS = [Check("fleet.cores", "CPU cores per worker", cores)]
