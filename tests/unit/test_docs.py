"""The README and docs/ are the user's reference: they must name every variable the code reads."""

from pathlib import Path

from dynkv.kvbm.config import KvbmSettings
from dynkv.settings.deployment import DeploymentSettings

ROOT = Path(__file__).resolve().parents[2]
README = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))])


def test_readme_documents_every_kvbm_variable():
    missing = [v for v in KvbmSettings.env_names() if f"`{v}`" not in README]
    assert missing == []


def test_readme_documents_every_deployment_variable():
    names = [DeploymentSettings.env_name(f) for f in DeploymentSettings.model_fields]
    missing = [v for v in names if v not in README]
    assert missing == []
