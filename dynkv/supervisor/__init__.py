"""Runs a Plan: process groups, the state dir, logs, health waits, teardown.

Entry points: `Supervisor(plan).start(detach=...)` / `.watch(on_line)` / `.stop()` for the run
that `dynkv up` drives (`run`); `stop_deployment` for `down` (`teardown`); `deployment_status`,
`log_sources` and `read_state` for `status` and `logs` (`status`), which may run in any process.
Every service, process or container, is driven through one interface (`units`).
"""

from dynkv.supervisor.process import marker_prefix, processes_left
from dynkv.supervisor.run import StartFailed, Supervisor, WatchResult
from dynkv.supervisor.state import DeploymentState, ServiceRecord, StateStore
from dynkv.supervisor.status import (
    AlreadyRunning,
    StatusReport,
    deployment_status,
    ensure_not_running,
    live_detail,
    log_sources,
    read_state,
)
from dynkv.supervisor.teardown import Observer, StopReport, stop_deployment

__all__ = [
    "AlreadyRunning",
    "DeploymentState",
    "Observer",
    "ServiceRecord",
    "StartFailed",
    "StateStore",
    "StatusReport",
    "StopReport",
    "Supervisor",
    "WatchResult",
    "deployment_status",
    "ensure_not_running",
    "live_detail",
    "log_sources",
    "marker_prefix",
    "processes_left",
    "read_state",
    "stop_deployment",
]
