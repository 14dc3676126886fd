"""Handoff pool ids: what a prefill worker puts in kv_transfer_params and a decode worker looks up.

The id arrives from the network (the frontend relays the prefill's answer): it must only ever
select one of the pools this deployment configured (DYN_KVBM_HANDOFF_POOLS), never name a path
(docs/security.md). Checked at three places: the settings (configured ids), `pool_dir` (the one
function that turns an id into a directory) and the decode's scheduler half (ids from requests).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from kvbm_helpers import LAYOUT, settings
from pydantic import ValidationError

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.handoff import pool_dir
from dynkv.kvbm.vllm_scheduler import SchedulerSide

BAD_IDS = ["..", ".", "../prefill-0", "prefill-0/..", "/dev/shm/x", "a/b", "a b", "-x", "x" * 65]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_configured_pool_id_is_a_plain_name(bad):
    with pytest.raises(ValidationError):
        settings(handoff_dir="/dev/shm/dynkv-x", handoff_pool=bad)
    with pytest.raises(ValidationError):
        settings(handoff_dir="/dev/shm/dynkv-x", handoff_pools=f"prefill-0,{bad}")
    with pytest.raises(ValueError):
        pool_dir("/dev/shm/dynkv-x", bad)


@pytest.mark.parametrize("bad", ["", ",", "a,a", "prefill-0,,prefill-0"])
def test_a_configured_pool_list_names_distinct_pools(bad):
    with pytest.raises(ValidationError):
        settings(handoff_dir="/dev/shm/dynkv-x", handoff_pools=bad)


def test_pool_ids_from_the_environment(monkeypatch):
    monkeypatch.setenv("DYN_KVBM_HANDOFF_DIR", "/dev/shm/dynkv-x")
    monkeypatch.setenv("DYN_KVBM_HANDOFF_POOLS", " prefill-0, prefill-1 ")
    s = KvbmSettings()
    assert s.handoff_pools == "prefill-0,prefill-1"
    assert s.readable_pools == ("prefill-0", "prefill-1") and not s.writes_handoff
    assert s.to_env()["DYN_KVBM_HANDOFF_POOLS"] == "prefill-0,prefill-1"  # read back unchanged


def test_who_writes_and_who_reads():
    prefill = settings(handoff_dir="/a", handoff_pool="prefill-1")
    assert prefill.writes_handoff and prefill.readable_pools == ("prefill-1",)
    single = settings(handoff_dir="/a")  # one pool: the area itself, written and read
    assert single.writes_handoff and single.readable_pools == ("",)
    assert not settings(cpu_cache_gb=1).readable_pools  # no handoff at all
    assert pool_dir("/a", "prefill-1") == Path("/a/prefill-1") and pool_dir("/a", "") == Path("/a")


class _Request:
    request_id = "r1"
    cache_salt = None
    lora_request = None
    mm_features = None
    prompt_embeds = None

    def __init__(self, params) -> None:
        self.kv_transfer_params = params
        self.all_token_ids = list(range(4 * LAYOUT.block_size + 1))
        self.num_tokens = self.num_prompt_tokens = len(self.all_token_ids)


@pytest.fixture
def decode():
    side = SchedulerSide(
        LAYOUT,
        settings(handoff_dir="/dev/shm/dynkv-x", handoff_pools="prefill-0,prefill-1"),
        serve_metrics=False,
    )
    yield side
    side.close()


def _handoff(pool) -> dict:
    return {
        "dynkv": {
            "fingerprint": LAYOUT.fingerprint_hex(),
            "block_size": LAYOUT.block_size,
            "pool": pool,
            "slots": [0, 1, 2, 3],
            "expires": 9e12,
        }
    }


def test_the_decode_takes_a_handoff_from_a_known_pool(decode):
    matched, _ = decode.get_num_new_matched_tokens(_Request(_handoff("prefill-1")), 0)
    assert matched == 4 * LAYOUT.block_size


@pytest.mark.parametrize(
    "pool", [*BAD_IDS, "prefill-2", "", None, 7, ["prefill-0"], {"id": "prefill-0"}, "PREFILL-0"]
)
def test_the_decode_refuses_any_other_pool_and_recomputes(decode, pool, caplog):
    params = _handoff(pool)
    if pool is None:
        del params["dynkv"]["pool"]  # a handoff without a pool: not one of this deployment's
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        matched, _ = decode.get_num_new_matched_tokens(_Request(params), 0)
    assert matched == 0
    assert "not one this worker reads (prefill-0, prefill-1)" in caplog.text


def test_a_decode_worker_never_produces(decode, caplog):
    """A prefill request sent to a reader: it has no pool of its own to write, so it serves
    the request without a handoff instead of writing into another worker's ring."""
    request = _Request({"dynkv": {"produce": True}})
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        decode.get_num_new_matched_tokens(request, 0)
    assert "no handoff pool of its own" in caplog.text
    assert decode.request_finished("r1") is None
