"""The findings engine: two metric snapshots and the deployment's KVBM settings in, findings out.

Pure (no I/O, no clock), so tests stage metric histories. Every finding carries the window's
numbers that show it and the setting to change under the names it goes by (docs/advise.md has
each rule and its thresholds). Counters are compared as after − before per worker (a worker whose
counter went down restarted: its after value is the window's); a family a worker does not expose
is "not measured" and the rules that need it stay silent.
"""

from __future__ import annotations

import math

from dynkv import metrics_text
from dynkv.advise.model import (
    Advice,
    Finding,
    FindingKind,
    MetricsSnapshot,
    SettingChange,
    WorkerMetrics,
    WorkerWindow,
)
from dynkv.advise.router_rule import router_check
from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.counters import Count

MIN_LOOKUPS = 64  # blocks asked of KVBM in the window before traffic-based rules judge
SHARE = 0.05  # reuse lost to a cause must reach this share of the window's lookups…
MIN_EVENTS = 8  # …and this many blocks
NO_REUSE_SHARE = 0.01  # below this hit share (and no reuse after eviction): no reuse
SLOW_REASON = "slower_than_recompute"
DISK_TIER_LABELS = ("disk", "g3")


class Window:
    """One worker's counters over the window and its gauges at the end."""

    def __init__(self, before: WorkerMetrics | None, after: WorkerMetrics) -> None:
        self.name = after.worker
        self.before = before.values if before is not None else {}
        self.after = after.values
        self.skipped_before = before.skipped if before is not None else {}
        self.skipped_after = after.skipped

    def delta(self, family: str) -> float | None:
        end = self.after.get(family)
        if end is None:
            return None
        return metrics_text.increase(self.before.get(family), end)

    def count(self, counter: Count) -> float | None:
        return self.delta(counter.metric)

    def zero(self, counter: Count) -> float:
        return self.count(counter) or 0.0

    def gauge(self, family: str) -> float | None:
        return self.after.get(family)

    def skipped(self, reason: str) -> float | None:
        """Disk blocks skipped for `reason` in the window; None when not exported."""
        if not self.skipped_after and metrics_text.SKIPPED not in self.after:
            return None
        total = 0.0
        for key, end in self.skipped_after.items():
            tier, _, why = key.partition("/")
            if tier.lower() in DISK_TIER_LABELS and why == reason:
                start = self.skipped_before.get(key, 0.0)
                total += end if end < start else end - start
        return total

    @property
    def lookups(self) -> float:
        return self.zero(Count.LOOKUP_BLOCKS)

    @property
    def host_size(self) -> float:
        return self.gauge(metrics_text.TIER_SIZES["host"]) or 0.0

    @property
    def disk_size(self) -> float:
        return self.gauge(metrics_text.TIER_SIZES["disk"]) or 0.0


def _significant(blocks: float, lookups: float) -> bool:
    return blocks >= MIN_EVENTS and blocks >= SHARE * lookups


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _scaled(value: float) -> str:
    """A suggested size, rounded up to something a person would type."""
    if value >= 10:
        return str(math.ceil(value))
    return f"{math.ceil(value * 10) / 10:g}"


# ---- the settings to change -----------------------------------------------------------------------
def _kvbm_change(field: str, value: str, flag: str | None = None) -> SettingChange:
    """A change of KVBM setting `field`: its environment variable and its profile key."""
    return SettingChange(
        env=KvbmSettings.env_name(field), value=value, profile_key=f"[kvbm] {field}", flag=flag
    )


def _host_size_change(settings: KvbmSettings, blocks: float, factor: float) -> SettingChange:
    if settings.cpu_cache_override_num_blocks:
        return _kvbm_change(
            "cpu_cache_override_num_blocks",
            str(math.ceil(settings.cpu_cache_override_num_blocks * factor)),
        )
    gb = settings.cpu_cache_gb
    value = _scaled(gb * factor) if gb else f"<{factor:g}× today's G2 ({blocks:g} blocks)>"
    return _kvbm_change(
        "cpu_cache_gb", value, flag=f"dynkv up --cpu-cache-gb {value}" if gb else None
    )


def _disk_size_change(settings: KvbmSettings, host_blocks: float) -> SettingChange:
    target = 2 * host_blocks
    if settings.disk_cache_override_num_blocks or not settings.cpu_cache_gb:
        return _kvbm_change("disk_cache_override_num_blocks", str(math.ceil(target)))
    value = _scaled(2 * settings.cpu_cache_gb)
    return _kvbm_change("disk_cache_gb", value, flag=f"dynkv up --disk-cache-gb {value}")


FILTER_OFF = _kvbm_change("disable_disk_offload_filter", "true")
NO_G3 = _kvbm_change("disk_cache_gb", "0", flag="dynkv up --profile gpu-cpu")
NO_KVBM = SettingChange(
    env="DYNKV_KVBM", value="false", profile_key="[deployment] kvbm", flag="dynkv up --no-kvbm"
)


# ---- the rules ----------------------------------------------------------------------------------
def g2_thrash(w: Window, settings: KvbmSettings) -> Finding | None:
    """Blocks asked again after G2 evicted them: the working set outgrows G2."""
    if not w.host_size:
        return None
    evicted = w.count(Count.HOST_EVICTED)
    if not evicted:
        return None
    reuse_disk = w.zero(Count.REUSE_AFTER_EVICT_DISK)
    reuse_lost = w.zero(Count.REUSE_AFTER_EVICT_RECOMPUTED)
    reused = reuse_disk + reuse_lost
    if not _significant(reused, w.lookups):
        return None
    written = w.zero(Count.OFFLOAD_D2H)
    return Finding(
        kind=FindingKind.G2_THRASH,
        worker=w.name,
        summary=f"G2 thrashes: {reused:g} blocks were asked for again after G2 had evicted them "
        f"({100 * reused / max(w.lookups, 1):.1f}% of the {w.lookups:g} blocks asked of KVBM)",
        evidence={
            "g2_blocks": w.host_size,
            "new_blocks_written_to_g2": written,
            "written_per_g2_size": _ratio(written, w.host_size),
            "g2_evicted_blocks": evicted,
            "g2_evicted_unused_blocks": w.count(Count.HOST_EVICTED_UNUSED),
            "reuse_after_eviction_served_by_g3": w.count(Count.REUSE_AFTER_EVICT_DISK),
            "reuse_after_eviction_recomputed": w.count(Count.REUSE_AFTER_EVICT_RECOMPUTED),
            "g2_hit_blocks": w.count(Count.HOST_HIT_BLOCKS),
            "lookup_blocks": w.lookups,
        },
        advice="the working set is larger than G2: all of this reuse came within one G2's worth "
        "of evictions, so a G2 twice the size would have served it from host memory "
        "(check the host has the memory: `dynkv doctor`)",
        change=[_host_size_change(settings, w.host_size, 2)],
    )


def filter_starves_g3(w: Window, settings: KvbmSettings) -> Finding | None:
    """Reuse comes only after G2 eviction, and the filter kept those blocks off G3."""
    if not settings.disk_filter_enabled or not w.disk_size:
        return None
    starved = w.count(Count.FILTER_STARVED)
    if starved is None or not _significant(starved, w.lookups):
        return None
    disk_hits = w.zero(Count.DISK_HIT_BLOCKS)
    return Finding(
        kind=FindingKind.FILTER_STARVES_G3,
        worker=w.name,
        summary=f"the SSD filter starves G3: {starved:g} blocks were recomputed after G2 evicted "
        f"them unwritten to G3 (seen only once), against {disk_hits:g} G3 hits",
        evidence={
            "filter_starved_blocks": starved,
            "reuse_after_eviction_recomputed": w.count(Count.REUSE_AFTER_EVICT_RECOMPUTED),
            "g3_hit_blocks": disk_hits,
            "g3_hit_share": _ratio(disk_hits, w.lookups),
            "lookup_blocks": w.lookups,
            "g2_blocks": w.host_size,
            "g3_blocks": w.disk_size,
        },
        advice="blocks are reused only after G2 has evicted them, and the filter writes a block "
        "to G3 only once it was seen twice while in G2: turn the filter off so G2 evictions go "
        "to G3 (or grow G2; see g2_thrash). Expect the G3 hit share to rise by up to "
        f"{_ratio(starved, w.lookups)} and more G3 writes",
        change=[FILTER_OFF],
    )


def lower_tier_smaller(w: Window, settings: KvbmSettings) -> Finding | None:
    """G3 smaller than G2: everything G2 writes down is evicted from G3 before G2 lets go."""
    if not w.host_size or not w.disk_size or w.disk_size >= w.host_size:
        return None
    return Finding(
        kind=FindingKind.LOWER_TIER_SMALLER,
        worker=w.name,
        summary=f"G3 ({w.disk_size:g} blocks) is smaller than G2 ({w.host_size:g} blocks): "
        "write-through churn",
        evidence={
            "g2_blocks": w.host_size,
            "g3_blocks": w.disk_size,
            "g3_evicted_blocks": w.count(Count.DISK_EVICTED),
            "written_to_g3": w.count(Count.OFFLOAD_H2D),
            "g3_hit_blocks": w.count(Count.DISK_HIT_BLOCKS),
        },
        advice="a lower tier only helps when it holds what the tier above has lost; G3 should be "
        "at least twice G2 (or drop G3)",
        change=[_disk_size_change(settings, w.host_size)],
    )


def g3_slower_than_recompute(w: Window, settings: KvbmSettings) -> Finding | None:
    """G3 loads skipped as slower than recompute, or G3 reads past their deadline."""
    if not w.disk_size:
        return None
    skipped = w.skipped(SLOW_REASON)
    timeouts = w.count(Count.DISK_READ_TIMEOUTS) or 0.0
    disk_hits = w.zero(Count.DISK_HIT_BLOCKS)
    slow = (skipped or 0.0) >= MIN_EVENTS and (skipped or 0.0) >= 0.1 * max(disk_hits, 1)
    if not slow and not timeouts:
        return None
    return Finding(
        kind=FindingKind.G3_SLOWER_THAN_RECOMPUTE,
        worker=w.name,
        summary="G3 is slower than recompute on this engine: "
        + (f"{skipped:g} G3 blocks skipped as slower than recomputing them" if slow else "")
        + ("; " if slow and timeouts else "")
        + (f"{timeouts:g} G3 reads missed their deadline" if timeouts else ""),
        evidence={
            "g3_skipped_slower_than_recompute": skipped,
            "g3_read_timeouts": timeouts,
            "g3_hit_blocks": disk_hits,
            "g3_onboarded_blocks": w.count(Count.ONBOARD_D2D),
            "disk_read_timeout_ms": settings.disk_read_timeout_ms,
        },
        advice="G3 costs disk writes and memory for loads that recomputing beats: put "
        f"{KvbmSettings.env_name('disk_cache_dir')} on faster storage (local NVMe), or run "
        "without G3",
        change=[NO_G3],
    )


def no_reuse(w: Window, settings: KvbmSettings) -> Finding | None:
    """Traffic without reuse: offloading costs memory and copies for nothing."""
    if w.lookups < MIN_LOOKUPS:
        return None
    hits = w.zero(Count.HOST_HIT_BLOCKS) + w.zero(Count.DISK_HIT_BLOCKS)
    late = w.zero(Count.REUSE_AFTER_EVICT_DISK) + w.zero(Count.REUSE_AFTER_EVICT_RECOMPUTED)
    if hits + late > NO_REUSE_SHARE * w.lookups:
        return None
    written = w.zero(Count.OFFLOAD_D2H) + w.zero(Count.OFFLOAD_D2D)
    return Finding(
        kind=FindingKind.NO_REUSE,
        worker=w.name,
        summary=f"no reuse: {hits:g} of {w.lookups:g} blocks asked of KVBM were held by a tier, "
        f"while {written:g} blocks were written to it",
        evidence={
            "lookup_blocks": w.lookups,
            "hit_blocks": hits,
            "reuse_after_eviction": late
            if w.count(Count.REUSE_AFTER_EVICT_RECOMPUTED) is not None
            else None,
            "new_blocks_written": written,
            "g2_blocks": w.host_size or None,
            "g3_blocks": w.disk_size or None,
        },
        advice="this traffic does not repeat prefixes (no shared system prompt, no multi-turn "
        "history): offloading costs host memory, disk writes and copies for nothing; run without "
        "it, or keep it if reuse is expected later",
        change=[NO_KVBM],
    )


RULES = (no_reuse, g2_thrash, filter_starves_g3, lower_tier_smaller, g3_slower_than_recompute)


def findings(
    before: MetricsSnapshot, after: MetricsSnapshot, settings: KvbmSettings
) -> list[Finding]:
    """Every rule on every worker readable at the end of the window."""
    out: list[Finding] = []
    for end in after.workers:
        if end.error is not None:
            continue
        w = Window(before.worker(end.worker), end)
        for rule in RULES:
            found = rule(w, settings)
            if found is not None:
                out.append(found)
    return out


def worker_window(before: MetricsSnapshot, end: WorkerMetrics) -> WorkerWindow:
    if end.error is not None:
        return WorkerWindow(worker=end.worker, error=end.error)
    w = Window(before.worker(end.worker), end)
    new = [w.count(Count.OFFLOAD_D2H), w.count(Count.OFFLOAD_D2D)]
    return WorkerWindow(
        worker=end.worker,
        lookup_blocks=w.count(Count.LOOKUP_BLOCKS),
        host_hit_blocks=w.count(Count.HOST_HIT_BLOCKS),
        disk_hit_blocks=w.count(Count.DISK_HIT_BLOCKS),
        new_blocks=None if all(n is None for n in new) else sum(n or 0.0 for n in new),
        prefill_seconds_saved=w.delta(metrics_text.SAVED),
    )


def advise(
    name: str,
    before: MetricsSnapshot,
    after: MetricsSnapshot,
    settings: KvbmSettings,
    roles: list[str] | None = None,
    middle: MetricsSnapshot | None = None,
) -> Advice:
    """The whole report: per-worker window numbers, findings (the workers' and the fleet's
    router finding, `dynkv.advise.router_rule`), and what could not be judged. `roles`: of the
    deployment's workers, KVBM or not (default: the readable KVBM workers'); `middle`: a read
    halfway through the window (the router finding then wants its evidence in both halves)."""
    readable = [w for w in after.workers if w.error is None]
    notes = []
    for end in readable:
        w = Window(before.worker(end.worker), end)
        if w.lookups < MIN_LOOKUPS:
            notes.append(
                f"{end.worker}: {w.lookups:g} blocks asked of KVBM in the window (< {MIN_LOOKUPS}):"
                " too little traffic for the traffic-based checks; run with load, or a longer "
                "--window"
            )
    if roles is None:
        roles = [w.role for w in readable]
    halfway = middle.router if middle is not None else None
    fleet, pending = router_check(before.router, after.router, roles, halfway)
    return Advice(
        name=name,
        window_s=round(after.at - before.at, 3),
        workers=[worker_window(before, w) for w in after.workers],
        findings=findings(before, after, settings) + ([fleet] if fleet is not None else []),
        notes=notes,
        pending=pending,
    )
