"""Engine arguments on the worker's vLLM command line: which ones dynkv refuses (it sets them
itself), checking names against vLLM's parser, and rendering one role's arguments as argv words.
User-facing rules: docs/engine-args.md.

The options dynkv owns are read off the command line `plan.worker.vllm_argv` builds, so an option
added there is refused here without a second list to keep in step; `OWNED_FIX` only says what to
use instead.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from dynkv.plan.worker import vllm_argv
from dynkv.settings.engine_args import EngineArg
from dynkv.settings.errors import SettingsError
from dynkv.settings.resolve import Resolved
from dynkv.vllm_args import ParserUnavailable, VllmArgSpec, load_spec

# What to use instead of an option dynkv sets, by vLLM destination.
OWNED_FIX: dict[str, str] = {
    "model": "pass --model (DYNKV_MODEL, or model in the profile's [deployment])",
    "served_model_name": "dynkv up --served-model-name NAME",
    "host": "workers listen on 127.0.0.1 behind the frontend; set the frontend's address with "
    "--host (DYNKV_FRONTEND_HOST)",
    "port": "export DYNKV_WORKER_PORT=<port> (the first worker's port; the others follow it)",
    "block_size": "export DYNKV_BLOCK_SIZE=<tokens> (or block_size in [deployment])",
    "kv_transfer_config": "dynkv builds the connector config: use --kvbm/--no-kvbm, "
    "DYNKV_DISAGG_TRANSFER and the profile's [kvbm] table",
    "kv_events_config": "dynkv enables vLLM's KV events itself, on a private socket per worker "
    "(docs/kv-events.md)",
    "kv_cache_memory_bytes": "pass --device-kv-gb (DYNKV_DEVICE_KV_GB), G1 per worker in GB",
    "api_key": "pass --api-key (DYNKV_API_KEY): the frontend checks it, workers stay on loopback",
    "enable_prompt_tokens_details": "dynkv always sets it: answers report the cached tokens the "
    "KV router's accuracy is measured against (docs/frontend.md#the-kv-policy)",
    "uds": "workers serve HTTP on 127.0.0.1:DYNKV_WORKER_PORT, which dynkv probes and registers",
}
# Options the worker needs but dynkv does not put on vLLM's command line.
_ALSO_OWNED = ("--api-key", "--uds")
# Options dynkv sets only from an optional setting: accepted as engine arguments while that
# setting is unset (vLLM's option and dynkv's setting mean the same thing).
OPTIONAL_SETTING: dict[str, str] = {"max_model_len": "DYNKV_MAX_MODEL_LEN"}


def owned_options() -> tuple[str, ...]:
    """Every option `vllm_argv` can put on the worker's command line, plus `_ALSO_OWNED`."""
    every = vllm_argv(
        python="python",
        model="m",
        served_name="m",
        port=1,
        block_size=1,
        max_model_len=1,
        kv_cache_bytes=1,
        kv_transfer="{}",
        kv_events="{}",
    )
    return tuple(dict.fromkeys([w for w in every if w.startswith("--")] + list(_ALSO_OWNED)))


def arg_key(arg: EngineArg, spec: VllmArgSpec | None) -> str:
    """vLLM's destination for `arg` (`--no-enforce-eager` and `enforce_eager` share one)."""
    if spec is not None and arg.option in spec.options:
        return spec.options[arg.option]
    return arg.option.lstrip("-").removeprefix("no-").replace("-", "_")


def detect_spec(resolved: Resolved, python: str) -> tuple[VllmArgSpec | None, str]:
    """vLLM's parser for `python`, only when there are engine arguments to check (importing vLLM
    costs seconds); else None and why the arguments go unchecked ("" when there are none)."""
    if not resolved.engine_args:
        return None, ""
    check_engine_args(resolved, None)  # owned options fail fast, before paying for the import
    try:
        spec = load_spec(python)
    except ParserUnavailable as exc:
        return None, f"vLLM's argument parser could not be read ({exc})"
    if spec is None:
        return None, f"vLLM is not installed for {python}"
    return spec, ""


def check_engine_args(resolved: Resolved, spec: VllmArgSpec | None) -> None:
    """Refuse what dynkv owns, and with `spec` what vLLM does not know (exit 2, cause + fix)."""
    owned = {arg_key(_as_arg(o), spec) for o in owned_options()}
    for arg in resolved.engine_args.args:
        key = arg_key(arg, spec)
        if spec is not None and arg.option not in spec.options:
            raise _unknown(arg, spec)
        if key in owned and key not in OPTIONAL_SETTING:
            fix = OWNED_FIX.get(key, f"dynkv sets {arg.option} itself")
            raise SettingsError(
                f"{_label(arg)} in {arg.where} is set by dynkv itself", f"{fix}; remove it there"
            )
        setting = OPTIONAL_SETTING.get(key)
        if setting and resolved.settings[setting].source != "default":
            raise SettingsError(
                f"{_label(arg)} in {arg.where} and {setting} "
                f"({resolved.settings[setting].source}) both set it",
                f"keep one of them: unset {setting}, or remove it from {arg.where}",
            )
        if spec is not None:
            _check_kind(arg, spec.kinds.get(spec.options[arg.option], "value"))


def role_argv(resolved: Resolved, role: str, spec: VllmArgSpec | None) -> tuple[str, ...]:
    """The words appended to the vLLM command line of a `role` worker."""
    words: list[str] = []
    for arg in resolved.engine_args.for_role(role, lambda a: arg_key(a, spec)):
        words += render(arg, spec)
    return tuple(words)


def render(arg: EngineArg, spec: VllmArgSpec | None) -> tuple[str, ...]:
    """argv words for one argument. A profile's `false` is `--no-x` where vLLM has it (and
    when vLLM's parser is unknown: its engine booleans all have it), nothing for a bare flag."""
    dashes = "-" if arg.short else "--"
    if arg.layer == "command-line":
        return (dashes + arg.name, *arg.value)
    option = "--" + arg.name
    value: Any = arg.value
    if isinstance(value, bool):
        if value:
            return (option,)
        kind = None if spec is None else spec.kinds.get(arg_key(arg, spec))
        return () if kind == "flag" else ("--no-" + arg.name,)
    if isinstance(value, list):
        return (option, *(_scalar(v) for v in value))
    if isinstance(value, dict):
        return (option, json.dumps(value, separators=(",", ":")))
    return (option, _scalar(value))


def unchecked_note(reason: str) -> str:
    return f"engine arguments were not checked against vLLM's parser: {reason}"


def engine_notes(engine_args: Any, spec: Any, unchecked: str) -> tuple[str, ...]:
    """The plan's note when there are engine arguments that vLLM's parser did not check."""
    return (unchecked_note(unchecked),) if engine_args and spec is None else ()


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_arg(option: str) -> EngineArg:
    return EngineArg(name=option.lstrip("-"), value=(), layer="command-line", where="")


def _label(arg: EngineArg) -> str:
    if arg.layer == "command-line":
        return arg.option
    return f"{arg.name.replace('-', '_')} ({arg.option})"


def _unknown(arg: EngineArg, spec: VllmArgSpec) -> SettingsError:
    names = spec.long_names()
    close = difflib.get_close_matches(arg.option, names, n=1, cutoff=0.6)
    if arg.layer == "command-line":
        hint = f"did you mean {close[0]}?" if close else "check the spelling"
    else:
        hint = f"did you mean {close[0][2:].replace('-', '_')}?" if close else "check the spelling"
    return SettingsError(
        f"vLLM {spec.version} has no engine argument {_label(arg)} (in {arg.where})",
        f"{hint} (all of them: python -m vllm.entrypoints.openai.api_server --help)",
    )


def _check_kind(arg: EngineArg, kind: str) -> None:
    if arg.layer == "command-line":
        if kind in ("bool", "flag") and arg.value:
            raise SettingsError(
                f"{arg.option} in {arg.where} is a flag and takes no value "
                f"(got {' '.join(arg.value)!r})",
                f"write {arg.option} alone"
                + (f", or --no-{arg.option[2:]}" if kind == "bool" else ""),
            )
        return
    is_bool = isinstance(arg.value, bool)
    if kind in ("bool", "flag") and not is_bool:
        raise SettingsError(
            f"{_label(arg)} in {arg.where} is a flag, so its value must be true or false",
            f"write {arg.name.replace('-', '_')} = true (or false)",
        )
    if kind == "value" and is_bool:
        raise SettingsError(
            f"{_label(arg)} in {arg.where} takes a value, not true/false",
            f"write {arg.name.replace('-', '_')} = <value> (see vLLM's --help for {arg.option})",
        )
