"""The dynkv image, statically (no Docker engine here): deploy/docker/Dockerfile parses, takes
its vLLM base from a build argument, copies what exists and runs an entrypoint the package has;
the entrypoint and the healthcheck module behave as the manifests rely on."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import stat
import sys
from pathlib import Path

import pytest

from dynkv.export import entrypoint, healthcheck
from dynkv.plan.model import HttpProbe, probe_json

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
INSTRUCTIONS = {
    "ARG", "FROM", "WORKDIR", "COPY", "RUN", "ENTRYPOINT", "CMD", "ENV", "LABEL", "USER", "EXPOSE",
}  # fmt: skip


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word, rest.strip()))
    return out


def test_every_line_is_a_known_instruction():
    assert {word for word, _ in instructions()} <= INSTRUCTIONS


def test_the_vllm_base_is_a_build_argument_declared_before_from():
    steps = instructions()
    words = [w for w, _ in steps]
    assert words.index("ARG") < words.index("FROM")
    arg = dict(s for s in steps if s[0] == "ARG")["ARG"]
    name, _, default = arg.partition("=")
    assert default.startswith("vllm/vllm-openai:")
    assert dict(steps)["FROM"] == "${" + name + "}"


def test_what_it_copies_exists():
    for word, rest in instructions():
        if word == "COPY":
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), source


def test_the_entrypoint_is_a_module_of_the_package():
    steps = dict(instructions())
    argv = json.loads(steps["ENTRYPOINT"])
    assert argv[:2] == ["python3", "-m"]
    assert importlib.util.find_spec(argv[2]) is not None
    assert argv[2] == "dynkv.export.entrypoint"


def test_the_build_context_ignore_file_keeps_what_the_build_copies():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text()
    for word, rest in instructions():
        if word == "COPY":
            for source in shlex.split(rest)[:-1]:
                assert f"!{source}" in ignore or f"!{source}/**" in ignore, source


# ---- the entrypoint ---------------------------------------------------------------------------


def test_a_given_command_runs_as_given():
    argv = ["python3", "-m", "dynkv.worker", "--role", "agg", "--", "python3", "-m", "vllm"]
    assert entrypoint.command(argv, {}) == argv


def test_a_role_from_the_environment():
    assert entrypoint.command([], {"DYNKV_ROLE": "frontend"})[1:] == ["-m", "dynkv.frontend"]
    worker = entrypoint.command([], {"DYNKV_ROLE": "worker", "DYNKV_VLLM_ARGS": "--model m"})
    assert worker[1:4] == ["-m", "dynkv.worker", "--"]
    assert worker[-2:] == ["--model", "m"]


@pytest.mark.parametrize("environ", [{}, {"DYNKV_ROLE": "router"}, {"DYNKV_ROLE": "worker"}])
def test_no_role_is_a_usage_error(environ):
    with pytest.raises(SystemExit) as info:
        entrypoint.command([], environ)
    assert info.value.code != 0


def test_shared_mount_points_are_made_fit_for_dynkvs_path_rules(tmp_path):
    shm, g3 = tmp_path / "shm", tmp_path / "g3"
    shm.mkdir()
    g3.mkdir()
    os.chmod(shm, 0o777)  # an emptyDir, as kubelet creates it
    os.chmod(g3, 0o777)
    entrypoint.prepare(
        {"DYN_KVBM_HANDOFF_DIR": str(shm / "dynkv-x"), "DYN_KVBM_DISK_CACHE_DIR": str(g3 / "pool")}
    )
    assert stat.S_IMODE(shm.stat().st_mode) == 0o1777  # as /dev/shm is
    assert stat.S_IMODE(g3.stat().st_mode) == 0o755


# ---- the healthcheck ----------------------------------------------------------------------------


def test_healthcheck_runs_the_plans_probes(monkeypatch):
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from threading import Thread

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.setenv("PROBE_PATH", "health")
        ok = [probe_json(HttpProbe(url=f"http://127.0.0.1:{port}/${{PROBE_PATH}}"))]
        bad = [probe_json(HttpProbe(url=f"http://127.0.0.1:{port}/nope"))]
        assert healthcheck.main([json.dumps(ok)]) == 0  # ${VAR} from the environment
        assert healthcheck.main([json.dumps(bad)]) == 1
    finally:
        server.shutdown()


@pytest.mark.parametrize("args", [[], ["not json"], ['[{"kind": "telepathy"}]']])
def test_healthcheck_bad_arguments_exit_2(args):
    assert healthcheck.main(args) == 2


def test_entrypoint_and_healthcheck_are_runnable_modules():
    for module in ("dynkv.export.entrypoint", "dynkv.export.healthcheck"):
        source = Path(importlib.util.find_spec(module).origin).read_text()
        assert 'if __name__ == "__main__":' in source
    assert sys.executable  # the entrypoint's interpreter for a role from the environment
