"""W1's `native` configuration (vLLM's own OffloadingConnector): CUDA only, so opt-in, and its
size is dynkv's tier size in vLLM's unit (GiB)."""

from __future__ import annotations

from pathlib import Path

from dynkv.bench.offload import configurations, summarize


def test_native_is_opt_in_and_sized_like_the_tiers():
    configs = {c.name: c for c in configurations(1 << 20, 1 << 30, 2.0, Path("/w"))}
    native = configs["native"]
    assert native.opt_in and not native.connector
    assert native.engine["kv_offloading_backend"] == "native"
    assert abs(native.engine["kv_offloading_size"] * 2**30 - 2e9) < 1
    assert not any(c.opt_in for name, c in configs.items() if name != "native")


def test_summary_compares_g2_with_native_when_it_ran():
    def r(ms):
        return {"round1_median_ms": ms, "round2_median_ms": ms}

    out = summarize({"floor": r(10.0), "g2": r(11.0), "native": r(12.0)})
    assert out["native_ms"] == 12.0 and out["native_vs_floor"] == 1.2
    assert out["targets"]["g2_le_native"] is True
    assert summarize({"g2": r(11.0)})["targets"]["g2_le_native"] is None


def test_engine_arguments_reach_the_engine_and_native_runs_only_when_named(monkeypatch, tmp_path):
    import json
    import subprocess

    from dynkv.bench import offload

    seen: dict[str, dict] = {}

    def fake_engine(argv, **kw):  # stands in for the vLLM engine child (no engine here)
        cfg = json.loads(Path(argv[-1]).read_text())
        name = Path(cfg["result_file"]).stem
        seen[name] = cfg["engine_kwargs"]
        Path(cfg["result_file"]).write_text(json.dumps({"rounds": [[1.0], [1.0]]}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(offload.subprocess, "run", fake_engine)
    offload.run(model="m", docs=1, doc_tokens=64, directory=str(tmp_path))
    assert "native" not in seen and {"g2", "floor"} <= set(seen)
    seen.clear()
    offload.run(
        model="m", docs=1, doc_tokens=64, directory=str(tmp_path),
        only=["native", "g2"], engine={"enforce_eager": True},
    )  # fmt: skip
    assert seen["g2"] == {"enforce_eager": True}
    assert seen["native"]["enforce_eager"] is True
    assert seen["native"]["kv_offloading_backend"] == "native"
