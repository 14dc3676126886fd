"""The vLLM import probe's cache (dynkv.doctor.probe_cache): successes are reused while the files
they proved are unchanged; failures never are."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dynkv.doctor import probe_cache
from dynkv.doctor.vllm_probe import ProbeResult

OK = ProbeResult(True, 3.6, "0.32.0", connector_ok=True)
BROKEN = ProbeResult(False, vllm_error="ImportError: no module named torchvision")


class Runs:
    def __init__(self, *results: ProbeResult) -> None:
        self.results, self.calls = list(results), 0

    def __call__(self) -> ProbeResult:
        self.calls += 1
        return self.results.pop(0)


@pytest.fixture
def key(monkeypatch):
    state = {"key": "k1"}
    monkeypatch.setattr(probe_cache, "probe_key", lambda: state["key"])
    return state


def test_a_success_is_reused_and_says_so(tmp_path: Path, key) -> None:
    path, runs = tmp_path / "probe.json", Runs(OK)
    first = probe_cache.cached_probe(runs, path)
    second = probe_cache.cached_probe(runs, path)
    assert runs.calls == 1
    assert not first.cached and second.cached
    assert (second.vllm_version, second.vllm_seconds, second.connector_ok) == ("0.32.0", 3.6, True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_changed_files_probe_again(tmp_path: Path, key) -> None:
    path, runs = tmp_path / "probe.json", Runs(OK, BROKEN)
    probe_cache.cached_probe(runs, path)
    key["key"] = "k2"  # e.g. vLLM reinstalled, or the connector edited
    assert probe_cache.cached_probe(runs, path) == BROKEN
    assert runs.calls == 2


def test_failures_are_never_kept(tmp_path: Path, key) -> None:
    path, runs = tmp_path / "probe.json", Runs(BROKEN, OK)
    assert probe_cache.cached_probe(runs, path) == BROKEN
    assert not path.exists()
    assert probe_cache.cached_probe(runs, path) == OK  # the fix shows at once
    assert runs.calls == 2


@pytest.mark.parametrize("text", ["", "{", '{"key": "k1"}', '{"key": "k1", "result": 3}', "[]"])
def test_a_corrupt_cache_file_is_ignored_and_overwritten(tmp_path: Path, key, text: str) -> None:
    path, runs = tmp_path / "probe.json", Runs(OK)
    path.write_text(text)
    assert probe_cache.cached_probe(runs, path) == OK
    assert runs.calls == 1
    assert probe_cache.cached_probe(runs, path).cached


def test_without_vllm_there_is_no_key_and_the_probe_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(probe_cache, "probe_key", lambda: None)
    runs = Runs(BROKEN)
    assert probe_cache.cached_probe(runs, tmp_path / "probe.json") == BROKEN


def test_the_key_follows_the_connector_files_and_the_interpreter(monkeypatch) -> None:
    real = probe_cache.probe_key()
    assert real is not None and real == probe_cache.probe_key()  # stable while nothing changes
    monkeypatch.setattr(probe_cache.sys, "executable", "/elsewhere/bin/python")
    assert probe_cache.probe_key() != real


def test_cache_lives_under_xdg_cache_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.undo()  # the suite's autouse fixture points the cache at the test's tmp dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert probe_cache.cache_path() == tmp_path / "dynkv" / "vllm-probe.json"
