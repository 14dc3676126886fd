"""The README and docs/ are the user's reference: they must stay true to the code.

- every relative link and every `#anchor` in README.md and docs/*.md resolves (GitHub's slugs);
- docs/configuration.md documents every field of the two settings models, and no page names a
  `DYN_KVBM_*`/`DYNKV_*` variable that nothing reads;
- the README stays short and its command table names every `dynkv` command;
- docs/architecture.md names every package, and every module it names exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.event_settings import KvEventsSettings
from dynkv.settings.deployment import DeploymentSettings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
CONFIG = DOCS / "configuration.md"
ARCH = DOCS / "architecture.md"

# `DYNKV_*` variables read outside DeploymentSettings, and the file that reads each. Checked both
# ways: the file must still read it, and docs/configuration.md must document it.
OTHER_VARIABLES = {
    "DYNKV_PROFILE": "dynkv/settings/resolve.py",
    "DYNKV_LOG_LEVEL": "dynkv/kvbm/logs.py",
    "DYNKV_INSTANCE": "dynkv/supervisor/state.py",
    "DYNKV_DEPLOYMENT_SECRET": "dynkv/worker/record.py",
    "DYNKV_CLIENT_CA": "dynkv/tls/model.py",
    "DYNKV_CLIENT_CERT": "dynkv/tls/model.py",
    "DYNKV_CLIENT_KEY": "dynkv/tls/model.py",
    "DYNKV_NATS_TOKEN": "dynkv/tls/model.py",
    "DYNKV_VENV": "scripts/up",
    "DYNKV_EXTRA": "scripts/setup-env",
    "DYNKV_LOCK": "scripts/setup-env",
    "DYNKV_TORCH_FIND_LINKS": "scripts/lock",
    "DYNKV_UV_VENV": "scripts/lock",
}

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_VARIABLE = re.compile(r"\b(?:DYN_KVBM|DYNKV)_[A-Z0-9_]*[A-Z0-9]\b")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings there are not Markdown)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces → -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = _CODE_SPAN.sub(r"\2", text).lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path.read_text()):
        found += _LINK.findall(_CODE_SPAN.sub("", line))
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not Markdown")
    return broken


def table_first_cells(path: Path) -> str:
    """The first cell of every table row, joined: where a reference table names its variables."""
    cells = []
    for line in prose_lines(path.read_text()):
        if line.startswith("|"):
            cells.append(line.split("|")[1])
    return "\n".join(cells)


def documented_names() -> set[str]:
    kvbm = set(KvbmSettings.env_names())
    deployment = {DeploymentSettings.env_name(f) for f in DeploymentSettings.model_fields}
    events = set(KvEventsSettings.env_names())  # documented in docs/kv-events.md
    return kvbm | deployment | events | set(OTHER_VARIABLES)


# ---- the slug rule itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Quick start", "quick-start"),
        (
            "KVBM runtime (`DYN_KVBM_*`, read by every worker)",
            "kvbm-runtime-dyn_kvbm_-read-by-every-worker",
        ),
        ("`dynkv status`", "dynkv-status"),
        ("Comparing configurations (`--compare`)", "comparing-configurations---compare"),
        ("Feature → package", "feature--package"),
        ("Load and memory (`scripts/load`)", "load-and-memory-scriptsload"),
    ],
)
def test_slugs_follow_github(heading, expected):
    assert slug(heading) == expected


def test_duplicate_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A\n## Notes\n```\n# not a heading\n```\n## Notes\n")
    assert anchors(page) == {"a", "notes", "notes-1"}


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "b.md").write_text("# Here\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#here) [self](#top) [gone](c.md) [bad](b.md#there) `[code](x.md)`\n# Top\n"
    )
    assert broken_links(page) == [
        "c.md: no such file",
        "b.md#there: no heading with that anchor in b.md",
    ]


# ---- links and anchors -----------------------------------------------------------------------


def test_the_docs_exist():
    names = {p.name for p in DOCS.glob("*.md")}
    for required in (
        "README.md",
        "configuration.md",
        "operations.md",
        "kvbm.md",
        "architecture.md",
        "benchmarks.md",
        "observability.md",
    ):
        assert required in names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_every_page_is_in_the_index():
    index = (DOCS / "README.md").read_text()
    missing = [
        p.name for p in DOCS.glob("*.md") if p.name != "README.md" and f"]({p.name})" not in index
    ]
    assert missing == []


# ---- the README ------------------------------------------------------------------------------


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def command_paths() -> list[str]:
    import typer.main

    from dynkv.cli.main import app

    paths = []

    def walk(cmd, prefix: str) -> None:
        subs = getattr(cmd, "commands", None)
        if not subs:
            paths.append(prefix)
            return
        for name, sub in subs.items():
            walk(sub, f"{prefix} {name}".strip())

    walk(typer.main.get_command(app), "")
    return paths


def test_the_readme_command_table_names_every_command():
    table = table_first_cells(ROOT / "README.md")
    paths = command_paths()
    assert "up" in paths and "model create" in paths
    missing = [p for p in paths if not re.search(rf"`dynkv {re.escape(p)}[ `]", table)]
    assert missing == []


# ---- the configuration reference -------------------------------------------------------------


def test_every_kvbm_setting_is_documented():
    cells = table_first_cells(CONFIG)
    missing = [v for v in KvbmSettings.env_names() if f"`{v}`" not in cells]
    assert missing == []


def test_every_deployment_setting_is_documented():
    cells = table_first_cells(CONFIG)
    names = [DeploymentSettings.env_name(f) for f in DeploymentSettings.model_fields]
    missing = [v for v in names if f"`{v}`" not in cells]
    assert missing == []


def test_variables_read_elsewhere_are_documented_and_still_read():
    cells = table_first_cells(CONFIG)
    assert [v for v in OTHER_VARIABLES if f"`{v}`" not in cells] == []
    stale = [v for v, where in OTHER_VARIABLES.items() if v not in (ROOT / where).read_text()]
    assert stale == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_names_a_variable_that_does_not_exist(page):
    known = documented_names()
    unknown = sorted({v for v in _VARIABLE.findall(page.read_text()) if v not in known})
    assert unknown == []


def test_an_invented_variable_would_be_caught():
    text = "set `DYNKV_FRONTEND_PORTS` or DYN_KVBM_CPU_CACHE_G, not DYN_KVBM_* or `DYNKV_*`"
    assert [v for v in _VARIABLE.findall(text) if v not in documented_names()] == [
        "DYNKV_FRONTEND_PORTS",
        "DYN_KVBM_CPU_CACHE_G",
    ]


# ---- the architecture ------------------------------------------------------------------------


def feature_rows() -> list[list[str]]:
    text = ARCH.read_text()
    section = text[text.index("## Feature → package") :]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("|")]
    return [r for r in rows[2:] if len(r) == 3]


def test_the_feature_table_names_every_package():
    named = " ".join(cell for row in feature_rows() for cell in row[1:])
    packages = sorted(p.name for p in (ROOT / "dynkv").iterdir() if (p / "__init__.py").exists())
    missing = [p for p in packages if f"`dynkv.{p}`" not in named]
    top_level = sorted(
        p.name
        for p in (ROOT / "dynkv").glob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )
    missing += [m for m in top_level if f"`{m}`" not in named]
    assert missing == []


def test_every_module_the_feature_table_names_exists():
    missing = []
    for feature, package_cell, module_cell in feature_rows():
        roots = [ROOT, ROOT / "dynkv"]
        roots += [ROOT / "dynkv" / p for p in re.findall(r"`dynkv\.(\w+)`", package_cell)]
        pattern = r"`([\w/-]+(?:\.py|/))`"
        if "`scripts/`" in package_cell:
            roots.append(ROOT / "scripts")
            pattern = r"`([\w/.-]+)`"
        for module in re.findall(pattern, module_cell):
            if not any((root / module).exists() for root in roots):
                missing.append(f"{feature.strip()}: {module}")
    assert missing == []


def test_every_dynkv_path_a_page_names_exists():
    missing = []
    for page in PAGES:
        for path in re.findall(r"`(dynkv/[\w/.]+)`", page.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{page.name}: {path}")
    assert missing == []


def test_no_comment_cites_a_document_outside_the_repository():
    """Comments point at docs/ or give the reason themselves (the old design notes are not here)."""
    cite = re.compile("DESIGN" + r"(\s*§|:)")
    files = [*(ROOT / "dynkv").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    files += [p for p in (ROOT / "scripts").iterdir() if p.is_file()]
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if cite.search(line)
    ]
    assert offenders == []


def test_every_command_option_is_documented():
    import typer.main

    from dynkv.cli.main import app

    text = "\n".join(p.read_text() for p in PAGES)
    missing = []

    def walk(cmd, prefix: str) -> None:
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{prefix} {name}".strip())
        for param in getattr(cmd, "params", []):
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("--") and opt != "--help" and opt not in text:
                    missing.append(f"dynkv {prefix} {opt}".replace("  ", " "))

    walk(typer.main.get_command(app), "")
    assert missing == []
