"""Helpers for the `dynkv export` tests: the schemas the outputs are validated against, offline.

Kubernetes: the OpenAPI schemas `kubernetes-validate` bundles (strict: an unknown field fails).
Compose: the compose-spec JSON schema vendored in tests/data/ (source and licence beside it).
Imported by name: pytest puts tests/ on sys.path.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from dynkv.export import ExportOptions
from dynkv.export.render import escape_dollars, to_yaml

COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
K8S_VERSION = "1.30.0"  # a version every supported cluster understands
IMAGE = "registry.example/dynkv:test"
SECRET = "0123456789abcdef" * 4  # the plan's deployment secret in these tests
API_KEY = "sk-test-not-for-any-output-1234567890"
HF_TOKEN = "hf_test_token_that_must_not_leak_0123"


def options(**changes: Any) -> ExportOptions:
    return ExportOptions(image=IMAGE, **changes)


@cache
def _compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return jsonschema.Draft7Validator(schema)


def assert_compose_valid(doc: dict[str, Any]) -> None:
    """The compose file, as rendered (YAML, `$` escaped) and read back, fits the spec."""
    text = to_yaml([escape_dollars(doc)])
    errors = sorted(_compose_validator().iter_errors(yaml.safe_load(text)), key=str)
    assert errors == [], [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def assert_k8s_valid(docs: list[dict[str, Any]]) -> None:
    """Every object, as rendered and read back, fits its Kubernetes schema (strict)."""
    for doc in yaml.safe_load_all(to_yaml(docs)):
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            raise AssertionError(f"{name}: {exc.message} at {list(exc.path)}") from None


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name → value, or the valueFrom record."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
