"""What vLLM's OpenAI server accepts on its command line, read from vLLM's own parser.

dynkv checks engine arguments (docs/engine-args.md) against the parser the worker will use
(`make_arg_parser` in vLLM's launcher `cli_args`, the one `python -m
vllm.entrypoints.openai.api_server` builds). Importing vLLM takes seconds to a minute on a busy
CPU box, so the parser is read once in a child process and the result cached by vLLM version under
`$XDG_CACHE_HOME/dynkv/vllm-args/`. Nothing here imports vLLM into the calling process.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from dynkv.xdg import dynkv_cache

Kind = Literal["bool", "flag", "value"]
MARKER = "DYNKV-VLLM-ARGS "
TIMEOUT_S = 180.0
FORMAT = 1  # bump when VllmArgSpec changes, so older cache files are not read

# Runs in the child: vLLM logs to stdout, so the answer is one marked JSON line.
_SOURCE = f"""
import argparse, json
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # older vLLM releases
    from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
import vllm
parser = make_arg_parser(FlexibleArgumentParser())
options, kinds = {{}}, {{}}
for action in parser._actions:
    if not action.option_strings or action.dest == "help":
        continue
    if isinstance(action, argparse.BooleanOptionalAction):
        kind = "bool"
    elif action.nargs == 0:
        kind = "flag"
    else:
        kind = "value"
    kinds[action.dest] = kind
    for opt in action.option_strings:
        options[opt] = action.dest
print({MARKER!r} + json.dumps({{"version": getattr(vllm, "__version__", "?"),
                               "options": options, "kinds": kinds}}), flush=True)
"""


class VllmArgSpec(BaseModel):
    """vLLM's server options: option string (`--max-num-seqs`, `-tp`, `--no-enforce-eager`) →
    argparse destination, and per destination whether it is a `--x/--no-x` boolean, a bare
    flag, or takes a value."""

    version: str
    options: dict[str, str]
    kinds: dict[str, Kind]

    def long_names(self) -> list[str]:
        return sorted(o for o in self.options if o.startswith("--"))


class ParserUnavailable(Exception):
    """vLLM is installed but its parser could not be read (the reason is in the message)."""


def installed_version(python: str) -> str | None:
    """vLLM's version for this interpreter, without importing vLLM; None when not installed."""
    if python != sys.executable:
        return None  # another interpreter: not checked from here
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in importlib.metadata.packages_distributions().get("vllm", []):
        try:
            return f"{dist}-{importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def cache_file(version: str) -> Path:
    return dynkv_cache() / "vllm-args" / f"{version}.v{FORMAT}.json"


def load_spec(python: str) -> VllmArgSpec | None:
    """The parser's options for `python`'s vLLM (cached); None when vLLM is not installed.
    Raises ParserUnavailable when vLLM is there but reading its parser failed."""
    version = installed_version(python)
    if version is None:
        return None
    path = cache_file(version)
    try:
        return VllmArgSpec.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError):
        pass
    spec = _read_parser(python)
    _write_cache(path, spec)
    return spec


def _read_parser(python: str) -> VllmArgSpec:
    try:
        proc = subprocess.run(
            [python, "-c", _SOURCE],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            cwd=tempfile.gettempdir(),  # no stray ./vllm shadows the installed one
        )
    except subprocess.TimeoutExpired:
        raise ParserUnavailable(f"importing vLLM took longer than {TIMEOUT_S:.0f} s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                return VllmArgSpec.model_validate_json(line[len(MARKER) :])
            except ValidationError as exc:
                raise ParserUnavailable(f"unexpected parser description: {exc}") from None
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise ParserUnavailable(f"reading vLLM's parser failed (exit {proc.returncode}): {tail}")


def _write_cache(path: Path, spec: VllmArgSpec) -> None:
    """Best effort: a read-only cache only costs the next run the import again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(spec.model_dump(), sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass
