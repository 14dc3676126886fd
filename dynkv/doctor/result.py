"""What a check says: ok / warn / fail, one line of detail, and for a problem one line of fix.

The shape follows `flutter doctor` and Dynamo's `sanity_check.py`: people scan a column of ✓ / ! / ✗
and paste the fix printed under a problem; machines read the same fields from `--json`. Warnings
never fail a run (flutter's CI lesson: a warning that breaks CI gets ignored, then everything does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class CheckResult:
    """One line of the report. `fix` is set for warn/fail: a command or setting to paste."""

    id: str
    status: Status
    detail: str
    fix: str | None = None
    title: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": str(self.status), "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class Outcome:
    """What a check function returns; the runner adds the id and title it registered."""

    status: Status
    detail: str
    fix: str | None = None


def ok(detail: str) -> Outcome:
    return Outcome(Status.OK, detail)


def warn(detail: str, fix: str) -> Outcome:
    return Outcome(Status.WARN, detail, fix)


def fail(detail: str, fix: str) -> Outcome:
    return Outcome(Status.FAIL, detail, fix)


def has_failures(results: Iterable[CheckResult]) -> bool:
    """True when any check failed; warnings alone never make `doctor` or `up` stop."""
    return any(r.status is Status.FAIL for r in results)


def exit_code(results: Iterable[CheckResult]) -> int:
    """1 on any failure, 0 when everything is ok or only warned."""
    return 1 if has_failures(results) else 0


def to_json(results: Iterable[CheckResult]) -> dict[str, Any]:
    return {"checks": [r.to_json() for r in results]}


def gb(n_bytes: float) -> str:
    """Decimal GB, as every size setting in dynkv (and Dynamo) is written."""
    return f"{n_bytes / 1e9:,.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:,.1f} MB"


@dataclass(frozen=True)
class Check:
    """A registered check: a stable id (`gpu.cuda`), a title for people, and the function. The
    function returns None when the check does not apply to this configuration (not shown)."""

    id: str
    title: str
    run: Callable[[Any], Outcome | None]
