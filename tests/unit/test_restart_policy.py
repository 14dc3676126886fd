"""Restart on failure, the pure part: back-off 1 s doubling to 60 s, a limit of restarts within
a window, 0 disables, a requested restart starts afresh (dynkv/supervisor/restart_policy.py)."""

from __future__ import annotations

import signal

import pytest

from dynkv.settings import resolve
from dynkv.supervisor.restart_policy import GiveUp, Restart, RestartHistory, RestartPolicy
from dynkv.supervisor.state import DeploymentState, ExitRecord, ServiceRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_back_off_doubles_from_one_second_to_sixty():
    policy = RestartPolicy(limit=100, window=10_000)
    assert [policy.delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_the_limit_within_the_window_is_respected_then_forgotten():
    clock = Clock()
    history = RestartHistory(RestartPolicy(limit=3, window=300), clock)
    decisions = []
    for _ in range(4):
        decisions.append(history.on_exit())
        clock.now += 10
    assert decisions[:3] == [Restart(1, 1), Restart(2, 2), Restart(4, 3)]
    assert isinstance(decisions[3], GiveUp) and "3 restarts within 300 s" in decisions[3].reason
    clock.now += 300  # every restart has left the window: a fresh budget and back-off
    assert history.on_exit() == Restart(1, 1)


def test_restarts_spread_wider_than_the_window_never_give_up():
    clock = Clock()
    history = RestartHistory(RestartPolicy(limit=2, window=60), clock)
    for _ in range(10):
        assert isinstance(history.on_exit(), Restart)
        clock.now += 31  # at most two within any 60 s
    assert history.recent() == 1


def test_zero_disables_restarts():
    history = RestartHistory(RestartPolicy.never(), Clock())
    decision = history.on_exit()
    assert isinstance(decision, GiveUp) and "disabled" in decision.reason


def test_a_requested_restart_starts_a_fresh_history():
    clock = Clock()
    history = RestartHistory(RestartPolicy(limit=1, window=300), clock)
    assert history.on_exit() == Restart(1, 1)
    assert isinstance(history.on_exit(), GiveUp)
    history.reset()
    assert history.on_exit() == Restart(1, 1)


@pytest.mark.parametrize(
    ("returncode", "code", "sig", "text"),
    [
        (3, 3, None, "exited with code 3"),
        (-signal.SIGKILL, None, 9, "killed by SIGKILL"),
        (-1, None, 1, "killed by SIGHUP"),
        (None, None, None, "exited (code unknown)"),
    ],
)
def test_an_exit_is_recorded_as_code_or_signal(returncode, code, sig, text):
    rec = ExitRecord.from_returncode(returncode, at=5.0)
    assert (rec.code, rec.signal, rec.at, rec.describe()) == (code, sig, 5.0, text)


def test_the_state_keeps_restart_fields_and_ignores_unknown_keys():
    data = {
        "name": "d",
        "instance": "x#1",
        "infra": "embedded",
        "services": [
            {
                "name": "worker",
                "role": "agg",
                "restarts": 2,
                "last_exit": {"code": None, "signal": 9, "at": 1.0, "from_the_future": 1},
                "restart_phase": "starting",
                "a_newer_key": [1, 2],
            }
        ],
    }
    state = DeploymentState.from_json(data)
    rec = state.service("worker")
    assert rec.restarts == 2 and rec.last_exit.signal == 9 and rec.restart_phase == "starting"
    again = state.to_json()["services"][0]
    assert again["a_newer_key"] == [1, 2] and again["last_exit"]["from_the_future"] == 1
    old = ServiceRecord(name="etcd", role="etcd")  # a state written before restarts existed
    assert (old.restarts, old.last_exit, old.restart_phase) == (0, None, "")


def test_settings_default_and_from_the_environment():
    dep = resolve(env={}).deployment
    assert (dep.restart_limit, dep.restart_window_secs) == (5, 300.0)
    env = {"DYNKV_RESTART_LIMIT": "0", "DYNKV_RESTART_WINDOW_SECS": "60"}
    dep = resolve(env=env).deployment
    assert (dep.restart_limit, dep.restart_window_secs) == (0, 60.0)
