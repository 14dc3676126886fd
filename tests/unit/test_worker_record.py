"""The registration seam (`dynkv.worker.record`): key schema, forward-compatible record, HMAC."""

from __future__ import annotations

import json

import pytest

from dynkv.frontend.pool import WorkerPool
from dynkv.plan import worker as plan_worker
from dynkv.worker.record import (
    BadRegistration,
    WorkerRecord,
    decode,
    parse_worker_key,
    signed,
    worker_api_key,
    worker_key,
    workers_prefix,
)

SECRET = "s" * 64
KEY = worker_key("dep", "agg-0")
RECORD = WorkerRecord(id="agg-0", url="http://127.0.0.1:8100", model="m", pid=7, started_at=1.5)


def test_key_schema_round_trips_and_is_the_plans():
    assert KEY == "/dynkv/dep/workers/agg-0" and KEY.startswith(workers_prefix("dep"))
    assert parse_worker_key(KEY) == ("dep", "agg-0")
    assert plan_worker.worker_key is worker_key  # defined once
    for bad in ("/dynkv/dep/workers/", "/dynkv/dep/other/agg-0", "dynkv/dep/workers/a", "/x"):
        with pytest.raises(ValueError):
            parse_worker_key(bad)


def test_a_signed_record_verifies_and_any_change_breaks_it():
    value = signed(KEY, RECORD, SECRET)
    assert decode(KEY, json.dumps(value), SECRET) == RECORD
    for tampered in ({**value, "url": "http://127.0.0.1:9"}, {**value, "signature": "0" * 64}):
        with pytest.raises(BadRegistration) as err:
            decode(KEY, tampered, SECRET)
        assert err.value.reason == "bad_signature"
    with pytest.raises(BadRegistration):  # replayed under another worker id
        decode(worker_key("dep", "agg-1"), value, SECRET)
    with pytest.raises(BadRegistration) as err:
        decode(KEY, RECORD.to_json(), SECRET)
    assert err.value.reason == "unsigned"
    with pytest.raises(BadRegistration):  # the right shape, another deployment's secret
        decode(KEY, signed(KEY, RECORD, "t" * 64), SECRET)


def test_newer_fields_are_ignored_and_still_verify():
    newer = signed(KEY, {**RECORD.to_json(), "zone": "b", "gpus": [0, 1]}, SECRET)
    assert decode(KEY, newer, SECRET) == RECORD


def test_without_a_secret_unsigned_records_are_accepted():
    assert decode(KEY, RECORD.to_json(), None) == RECORD
    assert "signature" not in signed(KEY, RECORD, None)


def test_the_pool_ignores_unsigned_and_missigned_records_and_counts_them(caplog):
    pool = WorkerPool(secret=SECRET)
    assert pool.put(KEY, RECORD.to_json()) is None
    assert pool.put(KEY, RECORD.to_json()) is None
    assert (
        pool.put(worker_key("dep", "x"), signed(worker_key("dep", "x"), RECORD, "t" * 64)) is None
    )
    assert len(pool) == 0
    assert pool.rejected == {"unsigned": 2, "bad_signature": 1}
    warnings = [r for r in caplog.records if "ignoring a registration" in r.getMessage()]
    assert len(warnings) == 2  # one line per bad key, not per write
    assert pool.put(KEY, signed(KEY, RECORD, SECRET)) is not None and len(pool) == 1


def test_the_worker_api_key_is_derived_and_not_the_secret():
    key = worker_api_key(SECRET)
    assert key == worker_api_key(SECRET) and key != SECRET and len(key) == 64
    assert worker_api_key("t" * 64) != key


def test_the_deployment_secret_is_reused_only_from_a_private_file(tmp_path):
    from dynkv.plan.secret import read_or_new, secret_path

    fresh = read_or_new(tmp_path)
    assert len(fresh) == 64 and not secret_path(tmp_path).exists()  # planning writes nothing
    assert read_or_new(tmp_path) != fresh
    path = secret_path(tmp_path)
    path.write_text(fresh)
    path.chmod(0o600)
    assert read_or_new(tmp_path) == fresh  # the same deployment keeps its secret
    path.chmod(0o640)
    assert read_or_new(tmp_path) != fresh  # readable by the group: not trusted, replaced
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_text(fresh)
    (tmp_path / "elsewhere").chmod(0o600)
    assert read_or_new(tmp_path) != fresh  # a planted symlink is not followed
