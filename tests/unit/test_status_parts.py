"""The pieces `status` and `logs` are made of: the KVBM metrics reader, the state file, and the
log readers."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from dynkv.supervisor.logs import FileFollower, RotatingLog, last_line, tail_lines, writer_argv
from dynkv.supervisor.metrics import parse_kvbm, read_kvbm
from dynkv.supervisor.state import CorruptState, DeploymentState, ServiceRecord, StateStore


def test_kvbm_metrics_by_family_name():
    reg = CollectorRegistry()
    Gauge("kvbm_host_cache_hit_rate", "", registry=reg).set(0.5)
    Gauge("kvbm_disk_cache_hit_rate", "", ["worker"], registry=reg).labels("a").set(0.2)
    Gauge("kvbm_host_blocks_total", "", registry=reg).set(1000)
    Counter("kvbm_matched_tokens", "", registry=reg).inc(96)
    Counter("kvbm_offload_blocks_d2h", "", ["w"], registry=reg).labels("a").inc(2)
    data = parse_kvbm(generate_latest(reg).decode())
    assert data["host_cache_hit_rate"] == 0.5
    assert data["disk_cache_hit_rate"] == 0.2
    assert data["host_blocks_total"] == 1000
    assert data["matched_tokens"] == 96  # counter family without `_total`, `_created` ignored
    assert data["offload_blocks_d2h"] == 2
    assert data["integrity_failures"] is None and data["disk_blocks_used"] is None


def test_kvbm_metrics_tolerate_untyped_and_missing_families():
    assert parse_kvbm("kvbm_matched_tokens_total 5\nother_metric 1\n")["matched_tokens"] == 5
    assert set(parse_kvbm("").values()) == {None}


def test_unreachable_metrics_endpoint_is_data_not_an_exception():
    data = read_kvbm("http://127.0.0.1:1/metrics", timeout=0.5)
    assert data["reachable"] is False and "error" in data and data["matched_tokens"] is None


def test_state_roundtrip_is_private_and_atomic(tmp_path):
    store = StateStore(tmp_path / "state" / "dev")
    state = DeploymentState(name="dev", instance="x#1", infra="embedded")
    state.services.append(ServiceRecord(name="etcd", role="etcd", pid=1, ports={"client": 2}))
    with store.lock():
        store.write(state)
    assert store.read() == state
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.logs_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert [p.name for p in store.dir.iterdir() if p.name.startswith(".state.")] == []
    store.clear()
    store.clear()
    assert store.read() is None


def test_corrupt_state_is_reported(tmp_path):
    store = StateStore(tmp_path)
    store.path.write_text("{not json")
    with pytest.raises(CorruptState):
        store.read()
    store.path.write_text(json.dumps({"name": "x", "instance": "i", "infra": "e", "bogus": 1}))
    assert store.read().name == "x"  # unknown keys from a newer dynkv are ignored


def test_tail_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(5000)))
    assert tail_lines(log, 3) == ["line 4997", "line 4998", "line 4999"]
    assert len(tail_lines(log, None)) == 5000
    assert tail_lines(log, 0) == []
    assert tail_lines(tmp_path / "missing", 3) == []
    assert last_line(log) == "line 4999"
    assert tail_lines(log, 2, end=len("line 0\nline 1\n")) == ["line 0", "line 1"]


def test_file_follower_sees_new_lines_truncation_and_late_files(tmp_path):
    log = tmp_path / "x.log"
    follower = FileFollower(log)
    assert follower.poll() == []
    log.write_text("a\nb")
    assert follower.poll() == ["a"]  # "b" is not a complete line yet
    with open(log, "a") as f:
        f.write("\nc\n")
    assert follower.poll() == ["b", "c"]
    log.write_text("new\n")  # truncated by a restart
    assert follower.poll() == ["new"]
    existing = FileFollower(log)  # from the end: old lines are not repeated
    assert existing.poll() == []


def test_state_keeps_what_a_newer_dynkv_wrote(tmp_path):
    """Forward compatible at both levels: unknown keys survive a read and a rewrite."""
    store = StateStore(tmp_path / "d")
    store.ensure()
    store.path.write_text(
        json.dumps(
            {
                "name": "d",
                "instance": "i",
                "infra": "embedded",
                "fleet": {"nodes": 2},
                "services": [
                    {"name": "w", "role": "agg", "kind": "vm", "shard": 3, "meta": {"x": "y"}}
                ],
            }
        )
    )
    with store.lock():
        state = store.read()
        assert state is not None and state.services[0].kind == "vm"
        store.write(state)
    data = json.loads(store.path.read_text())
    assert data["fleet"] == {"nodes": 2}
    assert data["services"][0]["shard"] == 3 and data["services"][0]["meta"] == {"x": "y"}


def test_rotating_log_caps_each_file_and_keeps_the_newest(tmp_path):
    path = tmp_path / "svc.log"
    (tmp_path / "svc.log.2").write_text("a previous run's\n")
    log = RotatingLog(path, max_bytes=100, keep=2)
    assert not (tmp_path / "svc.log.2").exists()  # this run starts clean
    lines = [f"line {i:03d} ".ljust(29, "x") + "\n" for i in range(20)]  # 30 bytes each
    for line in lines:
        log.write(line.encode())
    log.write(b"y" * 150 + b"\n")  # longer than a whole file: split, never lost
    log.close()
    files = [path, tmp_path / "svc.log.1", tmp_path / "svc.log.2"]
    assert all(f.stat().st_size <= 100 for f in files)
    assert not (tmp_path / "svc.log.3").exists()  # keep=2: the oldest went
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = "".join(f.read_text() for f in reversed(files))
    assert text.endswith("y" * 150 + "\n")
    kept = [line for line in text.splitlines() if line.startswith("line")]
    assert kept and kept == [line.rstrip("\n") for line in lines][-len(kept) :]  # whole lines


def test_the_log_writer_process_drains_its_pipe_and_ignores_sigterm(tmp_path):
    path = tmp_path / "w.log"
    writer = subprocess.Popen(writer_argv(sys.executable, path, 64, 3), stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:  # its signals are set by then
            time.sleep(0.05)
        writer.send_signal(signal.SIGTERM)  # ignored: it ends with its input, not before
        writer.stdin.write(b"".join(f"{i:09d}\n".encode() for i in range(20)))
        writer.stdin.close()
        assert writer.wait(10) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    oldest_first = [tmp_path / f"w.log.{i}" for i in (3, 2, 1)] + [path]
    lines = "".join(f.read_text() for f in oldest_first).splitlines()
    assert lines == [f"{i:09d}" for i in range(20 - len(lines), 20)]  # the newest, in order
    assert all(f.stat().st_size <= 64 for f in oldest_first)
