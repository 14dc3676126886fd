"""Engine arguments reach vLLM for real (docs/engine-args.md): `dynkv up -d -- --max-model-len
1024` on the generated tiny model (CPU), read back from the worker's own `/v1/models`, whose
`max_model_len` is what the engine runs with (the model's config says more)."""

from __future__ import annotations

import httpx
import pytest
from stack_support import assert_nothing_left, dynkv, stack_env

from dynkv.supervisor import read_state
from dynkv.worker.record import worker_api_key

pytestmark = pytest.mark.e2e


def test_max_model_len_after_dashdash_reaches_the_engine(tmp_path):
    # `up` first reads vLLM's parser (one more vLLM import, a minute on a busy 2-core box)
    env = stack_env(
        tmp_path,
        "engargs",
        DYNKV_PROFILE="gpu-cpu",
        DYN_KVBM_CPU_CACHE_GB="0.1",
        DYNKV_STARTUP_TIMEOUT_SECS="600",
    )
    env.pop("DYNKV_MAX_MODEL_LEN")  # the engine argument sets it; both at once is refused
    ddir = tmp_path / "state" / "engargs"
    try:  # `down` even when `up` times out: a detached stack outlives its `up`
        up = dynkv(
            "up", "-d", "--", "--max-model-len", "1024", "--max-num-seqs", "4", env=env, timeout=900
        )
        assert up.returncode == 0, up.stderr[-4000:]
        port = env["DYNKV_WORKER_PORT"]
        # a worker's /v1 answers only the key derived from the deployment secret
        secret = (ddir / "deployment.secret").read_text().strip()
        auth = {"authorization": f"Bearer {worker_api_key(secret)}"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth, timeout=30).json()
        assert [m["max_model_len"] for m in models["data"]] == [1024]
        worker = next(s for s in read_state(ddir).services if s.name == "worker")
        assert "--max-num-seqs" in worker.argv  # as planned, checked by vLLM's own parser
    finally:
        state = read_state(ddir)
        down = dynkv("down", env=env, timeout=180)
    assert down.returncode == 0, down.stderr
    if state is not None:
        assert_nothing_left(state.services, ddir)
