"""The configuration itself: which profile, variables that nothing reads (typos), and values vLLM
on this device would reject or run slowly with."""

from __future__ import annotations

import re

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, ok, warn
from dynkv.settings.profiles import DEFAULT_PROFILE


def profile(ctx: DoctorContext) -> Outcome:
    r, k = ctx.resolved, ctx.kvbm
    tiers = " → ".join(
        ["G1"] + (["G2"] if k.has_host_tier else []) + (["G3"] if k.has_disk_tier else [])
    )
    if not r.deployment.kvbm:
        tiers += " (no KVBM connector: DYNKV_KVBM=false)"
    detail = (
        f"profile {r.profile.name} ({r.profile_source}): {tiers}, {r.deployment.topology}, "
        f"device {ctx.device}"
    )
    if r.profile.experimental:
        return warn(
            f"{detail}; this profile is experimental",
            f"use --profile {DEFAULT_PROFILE} for the tested layout",
        )
    return ok(detail)


def variables(ctx: DoctorContext) -> Outcome:
    unknown = list(ctx.resolved.warnings)
    if not unknown:
        return ok("no unknown DYN_KVBM_* variables")
    names = [m.group(0) for w in unknown if (m := re.match(r"\S+", w))]
    return warn("; ".join(unknown), "unset " + " ".join(names) + "   # and set the intended names")


def block_size(ctx: DoctorContext) -> Outcome:
    size = ctx.deployment.block_size
    if ctx.device == "cpu" and size % 32:
        return warn(
            f"block size {size}: vLLM's CPU backend is optimised for multiples of 32 (slower otherwise)",
            "export DYNKV_BLOCK_SIZE=32",
        )
    return ok(f"block size {size} tokens")


CHECKS = [
    Check("settings.profile", "profile", profile),
    Check("settings.variables", "DYN_KVBM_* variables", variables),
    Check("settings.block_size", "KV block size", block_size),
]
