"""`python -m dynkv.frontend` shortens the GIL switch interval before serving: the kv router
tokenizes in a thread that would otherwise wait up to 5 ms for the event loop at every handoff."""

from __future__ import annotations

import sys

import pytest

from dynkv.frontend import __main__ as frontend_main


@pytest.fixture
def restore_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_main_sets_the_switch_interval_before_serving(monkeypatch, restore_interval):
    seen: dict[str, float] = {}

    def fake_run(app, **kwargs):  # stands in for uvicorn's server loop
        seen["interval"] = sys.getswitchinterval()

    monkeypatch.setattr(frontend_main.uvicorn, "run", fake_run)
    sys.setswitchinterval(0.005)
    argv = ["--deployment", "t", "--etcd-endpoints", "http://127.0.0.1:1", "--port", "18999"]
    assert frontend_main.main(argv) == 0
    assert seen["interval"] == pytest.approx(frontend_main.GIL_SWITCH_INTERVAL_SECS)
    assert frontend_main.GIL_SWITCH_INTERVAL_SECS < 0.005
