"""The fleet on one host: how many workers of each role a deployment runs, what each one is
called, and which GPUs it gets. User-facing rules: docs/fleet.md.

Names: an agg deployment of one worker keeps the service name `worker` (scripts and docs say
`dynkv logs worker`); with more, the services are `worker-0`, `worker-1`, …. The registration id
is always `<role>-<index>` (`agg-0`, `prefill-0`, `decode-1`), the index counting within its role
so that adding a prefill worker renames no decode worker (their ids label metrics and the
dashboard). Ports count across the whole fleet instead (`worker_port(base, position)`), prefill
workers first.

GPUs: each worker takes `tensor_parallel_size × pipeline_parallel_size` of them (its engine
arguments) through CUDA_VISIBLE_DEVICES, consecutive and disjoint, from `--gpus` (DYNKV_GPUS),
else from the launcher's own CUDA_VISIBLE_DEVICES, else from 0, 1, …. A deployment of one worker
without `--gpus` leaves CUDA_VISIBLE_DEVICES alone, as before fleets existed. Whether that many
GPUs exist is `dynkv doctor`'s `gpu.count` (NVML), not the plan's: a plan is pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dynkv.kvbm.roles import Role
from dynkv.plan.errors import PlanError
from dynkv.settings.deployment import DeploymentSettings
from dynkv.settings.engine_args import EngineArg
from dynkv.settings.resolve import Resolved
from dynkv.vllm_args import VllmArgSpec

# vLLM's short spellings of the parallelism options (`-tp 2`), for when its parser is not read
_SHORT = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size"}
PARALLEL_KEYS = ("tensor_parallel_size", "pipeline_parallel_size")
_COUNT_FLAGS = {
    "workers": "--workers",
    "prefill_workers": "--prefill-workers",
    "decode_workers": "--decode-workers",
}


@dataclass(frozen=True)
class WorkerSlot:
    """One worker of the fleet: its role, its index within the role, its position in the fleet
    (which places its ports) and whether it is the only agg worker (named plain `worker`)."""

    role: Role
    index: int
    position: int
    alone: bool = False

    @property
    def worker_id(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def name(self) -> str:
        if self.role == Role.AGG:
            return "worker" if self.alone else f"worker-{self.index}"
        return self.worker_id

    @property
    def pool_suffix(self) -> str:
        """The G3 pool directory's suffix after the deployment name: the first worker of a role
        keeps the pool it had before fleets existed (`default-agg`), so its blocks survive."""
        return str(self.role) if self.index == 0 else f"{self.role}-{self.index}"


def role_counts(dep: DeploymentSettings) -> dict[Role, int]:
    """How many workers of each role, prefill before decode (the order of their ports)."""
    if str(dep.topology) == "agg":
        return {Role.AGG: dep.workers}
    return {Role.PREFILL: dep.prefill_workers, Role.DECODE: dep.decode_workers}


def worker_total(dep: DeploymentSettings) -> int:
    return sum(role_counts(dep).values())


def worker_slots(dep: DeploymentSettings) -> tuple[WorkerSlot, ...]:
    slots: list[WorkerSlot] = []
    counts = role_counts(dep)
    for role, count in counts.items():
        for index in range(count):
            alone = role == Role.AGG and count == 1
            slots.append(WorkerSlot(role, index, len(slots), alone))
    return tuple(slots)


def check_counts(resolved: Resolved) -> None:
    """A count for the other topology is a mistake the user should hear about (exit 2); a count
    of 1 is harmless and is what a profile shared by both topologies may say. Any number of
    prefill workers works with either transfer (each has its own handoff pool: docs/disagg.md)."""
    dep = resolved.deployment
    if str(dep.topology) == "agg" and dep.workers == 0 and dep.advertise is None:
        raise PlanError(
            "--workers 0 (DYNKV_WORKERS) runs no worker: only a first host that other hosts "
            "join can serve with none",
            "give --workers 1 or more, or add --advertise ADDR and join workers with "
            "`dynkv join` (docs/multi-host.md)",
        )
    agg = str(dep.topology) == "agg"
    wrong = ("prefill_workers", "decode_workers") if agg else ("workers",)
    for field in wrong:
        value = getattr(dep, field)
        if value == 1:
            continue
        source = resolved.settings[DeploymentSettings.env_name(field)].source
        where = {"flag": _COUNT_FLAGS[field], "profile": f"{field} in the profile"}.get(
            source, DeploymentSettings.env_name(field)
        )
        if agg:
            raise PlanError(
                f"{where} = {value} counts disagg workers, and this deployment is agg",
                f"add --topology disagg, or give the agg worker count with --workers {value}",
            )
        raise PlanError(
            f"{where} = {value} counts agg workers, and this deployment is disagg",
            "give disagg counts with --prefill-workers P --decode-workers D",
        )


# ---- GPUs -------------------------------------------------------------------------------------


def _key(arg: EngineArg, key_of) -> str:
    key = key_of(arg)
    return _SHORT.get(key, key)


def gpus_per_worker(resolved: Resolved, role: str, key_of) -> int:
    """GPUs one `role` worker's engine spans: tensor × pipeline parallel size from its engine
    arguments (1 × 1 without them). `key_of` maps an argument to vLLM's destination name."""
    sizes = dict.fromkeys(PARALLEL_KEYS, 1)
    for arg in resolved.engine_args.for_role(role, lambda a: _key(a, key_of)):
        key = _key(arg, key_of)
        if key in sizes:
            sizes[key] = _whole(arg)
    return sizes["tensor_parallel_size"] * sizes["pipeline_parallel_size"]


def per_worker_gpus(resolved: Resolved, spec: VllmArgSpec | None = None) -> dict[Role, int]:
    """GPUs per worker of each role of the deployment (`spec`: vLLM's parser, when read)."""
    from dynkv.plan.engine_args import arg_key  # it imports the worker's argv builder

    return {
        role: gpus_per_worker(resolved, role, lambda a: arg_key(a, spec))
        for role in role_counts(resolved.deployment)
    }


def _whole(arg: EngineArg) -> int:
    value = arg.value
    if arg.layer == "command-line":
        value = value[0] if len(value) == 1 else None
    try:
        number = int(value) if not isinstance(value, bool) else 0
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise PlanError(
            f"{arg.option} in {arg.where} must be a whole number of GPUs ≥ 1, "
            f"not {arg.display_value()!r}",
            f"write {arg.option} 2 (or {arg.name.replace('-', '_')} = 2 in the profile)",
        )
    return number


def gpu_pool(dep: DeploymentSettings, environ: Mapping[str, str]) -> tuple[tuple[str, ...], str]:
    """The GPUs the fleet shares out and where that list comes from ("" when nobody chose it:
    0, 1, … as far as needed)."""
    if dep.gpus:
        ids = tuple(g.strip() for g in dep.gpus.split(","))
        twice = sorted({g for g in ids if ids.count(g) > 1})
        if twice:
            raise PlanError(
                f"--gpus (DYNKV_GPUS) lists GPU {', '.join(twice)} twice: workers get disjoint GPUs",
                "list each GPU once, e.g. --gpus 0,1,2,3",
            )
        return ids, "--gpus (DYNKV_GPUS)"
    inherited = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if inherited and inherited != "-1":
        return tuple(g.strip() for g in inherited.split(",") if g.strip()), "CUDA_VISIBLE_DEVICES"
    return (), ""


def assign_gpus(
    slots: tuple[WorkerSlot, ...],
    per_worker: Mapping[str, int],
    dep: DeploymentSettings,
    environ: Mapping[str, str],
) -> dict[str, str | None]:
    """Worker name → its CUDA_VISIBLE_DEVICES (None: leave the variable alone)."""
    pool, source = gpu_pool(dep, environ)
    need = sum(per_worker[s.role] for s in slots)
    if len(slots) == 1 and source != "--gpus (DYNKV_GPUS)":
        return {slots[0].name: None}  # one engine sees what the launcher sees, as it always did
    if not source:
        pool = tuple(str(i) for i in range(need))
    if len(pool) < need:
        shape = " + ".join(f"{s.name} {per_worker[s.role]}" for s in slots)
        raise PlanError(
            f"{len(slots)} workers need {need} GPUs ({shape}; tensor × pipeline parallel size "
            f"each), and {source} lists {len(pool)}",
            f"list {need} GPUs (--gpus {','.join(str(i) for i in range(need))}), or run fewer "
            "workers (--workers / --prefill-workers / --decode-workers)",
        )
    out: dict[str, str | None] = {}
    start = 0
    for slot in slots:
        n = per_worker[slot.role]
        out[slot.name] = ",".join(pool[start : start + n])
        start += n
    return out
