"""The shipped reference models: they load by alias, and their samples are the classes asked for."""
from __future__ import annotations

import json

import pytest
import torch

from compresskit.adapters import adapter_for
from compresskit.adapters.diffusion import reference
from compresskit.adapters.diffusion.metrics import classifier_outputs
from compresskit.errors import CompressKitError

ALIASES = {"fmnist-dit": "dit", "fmnist-unet": "unet"}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_picks_its_adapter_and_loads_the_trained_weights(alias):
    adapter = adapter_for(alias)
    assert adapter.name == ALIASES[alias]
    loaded = adapter().load(alias)
    weights, config = reference.reference_files(alias)
    assert loaded.source == alias and loaded.resolved == str(weights)
    assert config["training"]["steps"] > 0 and config["ema"] is True
    assert sum(p.numel() for p in loaded.model.parameters()) < 3_000_000  # small: a few MB on disk


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_samples_look_like_the_classes_asked_for(alias):
    """40 samples (4 per class, 25 steps, CFG 1.5) classified by the project's Fashion-MNIST classifier
    (0.918 test accuracy): at least half must be the class they were asked for (chance is 0.1)."""
    adapter = adapter_for(alias)()
    loaded = adapter.load(alias)
    labels = torch.arange(10).repeat(4)  # [40]
    images = adapter.sample(loaded, labels, seed=0, options={"steps": 25})  # [40, 1, 32, 32]
    _, probs = classifier_outputs(images)
    accuracy = (probs.argmax(1) == labels).double().mean().item()
    assert accuracy >= 0.5, f"{alias}: only {accuracy:.2f} of the samples are the class asked for"


def test_a_missing_reference_model_says_how_to_train_it(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(CompressKitError, match="train_fmnist_reference.py --model unet"):
        reference.reference_files("fmnist-unet")
    (tmp_path / "fmnist_unet.safetensors").write_bytes(b"x")
    (tmp_path / "fmnist_unet.json").write_text(json.dumps({"architecture": "dit", "model": {}}))
    with pytest.raises(CompressKitError, match="does not describe a unet2d"):
        reference.reference_files("fmnist-unet")
