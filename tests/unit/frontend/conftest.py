"""Fixtures shared by the frontend's unit tests."""

from __future__ import annotations

import pytest

from dynkv.model import ensure_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """The generated tiny model's directory (its tokenizer and Llama-3 chat template), built once
    per run for every module that tokenizes."""
    return str(ensure_model("tiny", tmp_path_factory.mktemp("models")))
