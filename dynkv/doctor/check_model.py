"""The model: found without a network, in a Hugging Face cache this user can write, and whether a
token is available for gated models. The token's value is never read into any message."""

from __future__ import annotations

import os
from pathlib import Path

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.model import hf_home, hf_hub_cache
from dynkv.doctor.result import Check, Outcome, fail, gb, ok, warn
from dynkv.xdg import NAME_MAX, overlong_name

TRUE = {"1", "true", "yes", "on"}
WALK_LIMIT = 5000  # entries inspected in the HF cache: enough to find docker's root-owned files


def _offline(ctx: DoctorContext) -> str | None:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if ctx.env.get(key, "").strip().lower() in TRUE:
            return key
    return None


def source(ctx: DoctorContext) -> Outcome:
    m = ctx.model
    if m.kind == "catalog":
        where = (
            f"in the model cache at {m.path}"
            if m.path
            else f"fetched on first start (`dynkv model fetch {m.spec}`: ~100 MB, a few minutes)"
        )
        lead = f"--model {m.spec}" if ctx.deployment.model else f"no --model: {m.spec}"
        return ok(f"{lead}, {where}")
    if m.kind == "generated":
        where = f" (already at {m.path})" if m.path else " (`dynkv model create`, on first start)"
        detail = f"{m.spec or 'dynkv-tiny'}: the generated tiny test model (random weights) will be used{where}"
        if ctx.device == "cuda":
            return warn(
                detail + " on a GPU host",
                "pass --model <directory or Hugging Face id>, e.g. --model Qwen/Qwen3-0.6B",
            )
        return ok(detail)
    if m.kind == "broken":
        return fail(
            f"--model {m.spec}: {m.problem}",
            "pass a model directory that holds config.json, or a Hugging Face id such as Qwen/Qwen3-0.6B",
        )
    if m.kind in ("local", "hf_cache"):
        where = "local directory" if m.kind == "local" else "Hugging Face cache"
        detail = f"{m.spec} in the {where} ({m.path})"
        if not m.weights_bytes:
            return warn(
                f"{detail} has no *.safetensors / *.bin weights",
                f"hf download {m.spec}"
                if m.kind == "hf_cache"
                else "copy the weight files next to config.json",
            )
        return ok(f"{detail}, weights {gb(m.weights_bytes)}")
    cache = hf_hub_cache(ctx.env)
    offline = _offline(ctx)
    if offline:
        return fail(
            f"{m.spec} is not in the Hugging Face cache ({cache}) and {offline} is set",
            f"hf download {m.spec}   # with network, or unset {offline}",
        )
    return warn(
        f"{m.spec} is not in the Hugging Face cache ({cache}): vLLM downloads it at start (network, "
        "and HF_TOKEN for gated models)",
        f"hf download {m.spec}",
    )


def _first_unwritable(root: Path) -> Path | None:
    """The first directory under `root` this user cannot write (bounded walk), or None."""
    seen = 0
    for dirpath, dirnames, _files in os.walk(root):
        if not os.access(dirpath, os.W_OK | os.X_OK):
            return Path(dirpath)
        seen += 1 + len(dirnames)
        if seen > WALK_LIMIT:
            break
    return None


# os.path.* rather than Path's methods: Python 3.11's raise on a name too long (ENAMETOOLONG),
# which a mistyped HF_HOME is; the check reports it instead of crashing.
def _existing_ancestor(path: Path) -> Path:
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def hf_cache(ctx: DoctorContext) -> Outcome:
    home, cache = hf_home(ctx.env), hf_hub_cache(ctx.env)
    needs_hub = ctx.model.kind in ("remote", "hf_cache")
    problem_status = fail if needs_hub else warn
    if overlong_name(cache) is not None:
        return problem_status(
            f"{cache} cannot exist: a name in it is longer than {NAME_MAX} bytes",
            "export HF_HOME=~/.cache/huggingface   # or unset HF_HOME and HF_HUB_CACHE",
        )
    if not os.path.exists(cache):
        parent = _existing_ancestor(cache)
        if os.access(parent, os.W_OK | os.X_OK):
            return ok(f"{cache} does not exist yet; {parent} is writable")
        return problem_status(
            f"{cache} cannot be created: {parent} is not writable", _fix(parent, home)
        )
    bad = _first_unwritable(cache)
    if bad is None:
        return ok(f"{cache} is writable by this user")
    owner = bad.stat().st_uid
    return problem_status(
        f"{bad} in the Hugging Face cache is not writable by this user (owner uid {owner})",
        _fix(bad, home),
    )


def _fix(bad: Path, home: Path) -> str:
    try:
        read_only = bool(os.statvfs(bad).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return "export HF_HOME=~/.cache/huggingface-rw   # the cache's filesystem is read-only"
    target = home if bad == home or home in bad.parents else bad
    return f"sudo chown -R $(id -u):$(id -g) {target}"


def token(ctx: DoctorContext) -> Outcome:
    # Only presence is looked at; the value is never put in a message.
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if ctx.env.get(key, "").strip():
            return ok(f"{key} is set")
    token_file = Path(ctx.env.get("HF_TOKEN_PATH") or hf_home(ctx.env) / "token").expanduser()
    if os.path.isfile(token_file) and token_file.stat().st_size > 0:
        return ok(f"a saved token ({token_file}, from `hf auth login`) is present")
    if ctx.model.kind == "remote":
        return warn(
            "HF_TOKEN is not set: gated models (Llama, Gemma, …) cannot be downloaded",
            "export HF_TOKEN=<a read token from https://huggingface.co/settings/tokens>",
        )
    return ok("HF_TOKEN is not set (not needed: the model is local or already cached)")


CHECKS = [
    Check("model.source", "model available offline", source),
    Check("model.hf_cache", "Hugging Face cache writable", hf_cache),
    Check("model.hf_token", "Hugging Face token", token),
]
