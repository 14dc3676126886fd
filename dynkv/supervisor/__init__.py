"""Runs a Plan: process groups, the state dir, logs, health waits, teardown.

Entry points: `Supervisor(plan).start(detach=...)` / `.watch(on_line)` / `.stop()` for the run
that `dynkv up` drives; `stop_deployment`, `deployment_status`, `log_sources` and `read_state`
for `down`, `status` and `logs`, which may run in any process.
"""

from dynkv.supervisor.runner import (
    AlreadyRunning,
    Observer,
    StartFailed,
    StatusReport,
    StopReport,
    Supervisor,
    deployment_status,
    ensure_not_running,
    live_detail,
    log_sources,
    processes_left,
    read_state,
    stop_deployment,
)
from dynkv.supervisor.state import DeploymentState, ServiceRecord, StateStore

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
    "deployment_status",
    "ensure_not_running",
    "live_detail",
    "log_sources",
    "processes_left",
    "read_state",
    "stop_deployment",
]
