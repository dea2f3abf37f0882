"""Fixtures: a tiny LLaMA saved in several safetensors shards (see :mod:`llama_files`)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from llama_files import write_llama  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """``llama_dir(tied=False)``: the saved tiny LLaMA (4 blocks, sharded), once per variant."""
    cache: dict[bool, Path] = {}

    def get(tied: bool = False) -> Path:
        if tied not in cache:
            cache[tied] = write_llama(tmp_path_factory.mktemp(f"llama-tied{tied}"), tied=tied)
        return cache[tied]

    return get
