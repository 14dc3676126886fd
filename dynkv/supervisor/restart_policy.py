"""When a service that exited on its own is started again: docker compose's `restart: on-failure`
with a back-off and a budget (docs/restart.md).

Pure: the clock is passed in, so the rules are tested without waiting. The rules:
- The n-th restart within the window waits `initial × 2^(n-1)` seconds, at most `max_delay`
  (1 s, 2 s, 4 s … 60 s): a service that crashes at once does not spin.
- At most `limit` restarts within `window` seconds; the exit that would need one more leaves the
  service down ("given up") until someone asks for it (`dynkv restart`), which starts a fresh
  history. Restarts older than the window are forgotten, and with them the back-off.
- `limit = 0` disables restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    limit: int = 5
    window: float = 300.0
    initial_delay: float = 1.0
    max_delay: float = 60.0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def delay(self, nth: int) -> float:
        """The wait before the `nth` restart within the window (1-based)."""
        return min(self.initial_delay * 2 ** max(nth - 1, 0), self.max_delay)

    @classmethod
    def never(cls) -> RestartPolicy:
        return cls(limit=0)


@dataclass(frozen=True)
class Restart:
    delay: float  # seconds to wait before starting it again
    nth: int  # this restart's number within the window (1..limit)


@dataclass(frozen=True)
class GiveUp:
    reason: str


Decision = Restart | GiveUp


@dataclass
class RestartHistory:
    """The restarts of one service, as times on `clock` (monotonic seconds)."""

    policy: RestartPolicy
    clock: Callable[[], float]
    restarts: list[float] = field(default_factory=list)

    def recent(self) -> int:
        """Restarts within the window, as of now."""
        now = self.clock()
        self.restarts = [t for t in self.restarts if now - t < self.policy.window]
        return len(self.restarts)

    def on_exit(self) -> Decision:
        """The service exited unexpectedly: restart it (after a delay), or leave it down."""
        if not self.policy.enabled:
            return GiveUp("restarts are disabled (restart_limit = 0)")
        done = self.recent()
        if done >= self.policy.limit:
            return GiveUp(
                f"{done} restarts within {self.policy.window:g} s (restart_limit "
                f"{self.policy.limit}, restart_window_secs {self.policy.window:g})"
            )
        nth = done + 1
        self.restarts.append(self.clock())
        return Restart(self.policy.delay(nth), nth)

    def reset(self) -> None:
        """A restart someone asked for: a fresh budget and back-off."""
        self.restarts.clear()
