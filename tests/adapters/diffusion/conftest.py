"""Fixtures for the diffusion family's tests: Fashion-MNIST when its Debian package is installed."""
from __future__ import annotations

import pytest

from compresskit.adapters.diffusion import data
from compresskit.errors import CompressKitError


@pytest.fixture(scope="session")
def fmnist_dir():
    """The directory of Fashion-MNIST's IDX files; the test is skipped (nothing is installed) without them."""
    try:
        return data.data_dir()
    except CompressKitError:
        pytest.skip("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
