"""`bench offload` runs every engine in one dtype, by default the one `up` serves on this machine
(float32 on a CPU without native bfloat16), and names it in the report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynkv.bench import offload
from dynkv.bench.kvbm_report import OffloadReport
from dynkv.cli.main import app


@pytest.fixture
def engines(monkeypatch):
    """Stands in for the vLLM engine children (no engine here): records each one's payload."""
    seen: dict[str, dict] = {}

    def fake_engine(argv, **kw):
        cfg = json.loads(Path(argv[-1]).read_text())
        seen[Path(cfg["result_file"]).stem] = cfg
        Path(cfg["result_file"]).write_text(json.dumps({"rounds": [[1.0], [1.0]]}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(offload.subprocess, "run", fake_engine)
    return seen


@pytest.mark.parametrize(
    ("device", "native", "expected"),
    [("cpu", False, "float32"), ("cpu", True, "bfloat16"), ("cuda", False, "bfloat16")],
)
def test_the_default_dtype_is_the_served_one(monkeypatch, device, native, expected):
    monkeypatch.setattr("dynkv.hardware.resolve_device", lambda _requested: device)
    monkeypatch.setattr("dynkv.plan.dtype.cpu_bf16_native", lambda: native)
    assert offload.served_dtype() == expected


def test_every_engine_gets_the_dtype_and_the_report_names_it(engines, monkeypatch, tmp_path):
    monkeypatch.setattr(offload, "served_dtype", lambda: "float32")
    report = offload.run(model="m", docs=1, doc_tokens=64, directory=str(tmp_path))
    assert {cfg["dtype"] for cfg in engines.values()} == {"float32"}
    assert report.dtype == "float32" and report.model_dump(mode="json")["dtype"] == "float32"
    engines.clear()
    report = offload.run(
        model="m", docs=1, doc_tokens=64, directory=str(tmp_path), only=["g2"], dtype="bfloat16"
    )
    assert engines["g2"]["dtype"] == "bfloat16" and report.dtype == "bfloat16"


def test_a_report_without_a_dtype_still_reads():
    """Reports written before the dtype was recorded stay valid and write back unchanged."""
    data = {"g2_ms": 4.0, "targets": {}, "configs": {}, "workload": {"docs": 1}}
    report = OffloadReport.model_validate(data)
    assert report.dtype is None and report.model_dump(mode="json") == data


def test_the_cli_passes_dtype_and_refuses_an_unknown_one(monkeypatch):
    got: dict = {}

    def fake_run(**kw):
        got.update(kw)
        return OffloadReport.model_validate({"g2_ms": 4.0, "dtype": kw["dtype"] or "auto"})

    monkeypatch.setattr(offload, "run", fake_run)
    monkeypatch.setattr("dynkv.cli.bench_kvbm_cmd._model_dir", lambda m: m)
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["bench", "offload", "--dtype", "float32", "--only", "g2"])
    assert result.exit_code == 0, result.stderr
    assert got["dtype"] == "float32" and "float32" in result.stderr  # the table's title
    result = runner.invoke(app, ["bench", "offload"])
    assert result.exit_code == 0 and got["dtype"] is None  # the run resolves the default
    bad = runner.invoke(app, ["bench", "offload", "--dtype", "int8"])
    assert bad.exit_code == 2
