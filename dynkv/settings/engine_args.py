"""vLLM engine arguments the user passes through dynkv: a profile's `[vllm]` table, its per-role
tables (`[vllm.agg]`, `[vllm.prefill]`, `[vllm.decode]`) and the words after `--` on the command
line (`dynkv up -- --max-num-seqs 8`). See docs/engine-args.md.

This module only reads and merges them; it never imports vLLM. Which names vLLM knows, which are
flags, and which ones dynkv itself sets is the plan's business (`dynkv.plan.engine_args`).

Precedence for one worker, strongest first: command line > the role's table > `[vllm]`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dynkv.kvbm.roles import ROLE_NAMES
from dynkv.settings.errors import SettingsError

Layer = Literal["profile", "profile-role", "command-line"]
# weakest first: a later layer replaces an argument an earlier one set
_LAYER_ORDER: dict[str, int] = {"profile": 0, "profile-role": 1, "command-line": 2}


@dataclass(frozen=True)
class EngineArg:
    """One engine argument as the user wrote it.

    `name` is the option without its dashes, underscores turned into dashes (`max-num-seqs`,
    `no-enforce-eager`, `tp` for `-tp`); `value` is the TOML value for a profile entry, or the
    tuple of words that followed the option on the command line (`()` for a bare flag)."""

    name: str
    value: Any
    layer: Layer
    where: str  # for messages: "[vllm] of /x/p.toml", "[vllm.decode] of …", "the words after --"
    role: str | None = None  # None: every worker
    short: bool = False  # written with one dash (`-tp 2`), command line only

    @property
    def option(self) -> str:
        """The option as vLLM's parser knows it (`--max-num-seqs`, `-tp`), without a `.key`."""
        return ("-" if self.short else "--") + self.name.split(".", 1)[0]

    def display_value(self) -> str:
        if self.layer == "command-line":
            return " ".join(self.value)
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        if isinstance(self.value, dict | list):
            return json.dumps(self.value, separators=(",", ":"))
        return str(self.value)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.display_value(),
            "source": self.layer,
            "role": self.role or "all",
            "where": self.where,
        }


@dataclass(frozen=True)
class EngineArgs:
    """Every engine argument from every layer, in the order written (layers merge per role)."""

    args: tuple[EngineArg, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.args)

    def with_command_line(self, words: Sequence[str]) -> EngineArgs:
        return EngineArgs((*self.args, *parse_command_line(words)))

    def for_role(self, role: str, key: Callable[[EngineArg], str]) -> tuple[EngineArg, ...]:
        """The arguments one worker of `role` gets: one per `key` (vLLM's destination), the
        strongest layer's; the position is where the argument first appeared."""
        chosen: dict[str, EngineArg] = {}
        relevant = [a for a in self.args if a.role in (None, role)]
        for arg in sorted(relevant, key=lambda a: _LAYER_ORDER[a.layer]):  # stable sort
            chosen[key(arg)] = arg
        order = {key(a): i for i, a in reversed(list(enumerate(relevant)))}
        return tuple(sorted(chosen.values(), key=lambda a: order[key(a)]))

    def to_json(self) -> list[dict[str, Any]]:
        return [a.to_json() for a in self.args]


def parse_profile_table(body: Any, path: Path) -> EngineArgs:
    """A profile's `[vllm]` table: engine arguments by long name, and role sub-tables."""
    if not isinstance(body, dict):
        raise SettingsError(
            f"[vllm] in profile {path} must be a table, not {type(body).__name__}",
            "write it as a [vllm] section with lines like max_num_seqs = 8",
        )
    args: list[EngineArg] = []
    for key, value in body.items():
        if key in ROLE_NAMES:  # [vllm.prefill]: that role's workers only
            if not isinstance(value, dict):
                raise SettingsError(
                    f"'{key}' in [vllm] of profile {path} names a role and must be a table",
                    f"write it as a [vllm.{key}] section with lines like max_num_seqs = 8",
                )
            for sub_key, sub_value in value.items():
                args.append(_profile_arg(sub_key, sub_value, path, role=key))
        else:  # an inline table is a JSON-valued argument (compilation_config = {…})
            args.append(_profile_arg(key, value, path, role=None))
    return EngineArgs(tuple(args))


def _profile_arg(key: str, value: Any, path: Path, *, role: str | None) -> EngineArg:
    table = f"[vllm.{role}]" if role else "[vllm]"
    where = f"{table} of {path}"
    name = key.replace("_", "-").lstrip("-")
    if not name or name != key.replace("_", "-"):
        raise SettingsError(
            f"{key!r} in {where} is not an engine argument name",
            "write the long name without dashes, e.g. max_num_seqs = 8",
        )
    if value is None or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        raise SettingsError(
            f"{table} {key} in {path} has a value vLLM cannot take",
            f"write {key} = <number, string, true/false, list or inline table>",
        )
    return EngineArg(
        name=name,
        value=value,
        layer="profile-role" if role else "profile",
        where=where,
        role=role,
    )


def parse_command_line(words: Sequence[str]) -> tuple[EngineArg, ...]:
    """The words after `--`: `--name value…`, `--name=value`, `--flag`, `-tp 2`. A word that
    does not start with `-` belongs to the option before it (several for list arguments)."""
    args: list[EngineArg] = []
    current: tuple[str, bool] | None = None
    values: list[str] = []

    def close() -> None:
        if current is not None:
            args.append(
                EngineArg(
                    name=current[0],
                    value=tuple(values),
                    layer="command-line",
                    where="the words after --",
                    short=current[1],
                )
            )

    for word in words:
        if _is_option(word):
            close()
            short = not word.startswith("--")
            body = word[1:] if short else word[2:]
            name, eq, inline = body.partition("=")
            current = (name.replace("_", "-"), short)
            values = [inline] if eq else []
        elif current is None:
            raise SettingsError(
                f"engine argument {word!r} after -- is not an option",
                "pass vLLM options by name after --, e.g. dynkv up -- --max-num-seqs 8",
            )
        else:
            values.append(word)
    close()
    return tuple(args)


def _is_option(word: str) -> bool:
    """`--x`, `-tp`; not `-1` or `-0.5` (a negative value), nor `-` alone."""
    if word.startswith("--"):
        return len(word) > 2
    return len(word) > 1 and word[0] == "-" and not (word[1].isdigit() or word[1] == ".")
