"""Fixtures over the tiny causal LMs of :mod:`tiny_lms`: one tokenizer, each architecture saved once."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tiny_lms import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def saved(tmp_path_factory, tokenizer):
    """``saved(arch) -> (directory, original model)``: each architecture saved once per session."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model = tiny_model(arch)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[arch] = (path, model)
        return cache[arch]

    return get
