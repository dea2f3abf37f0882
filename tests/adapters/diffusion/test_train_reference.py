"""bench/train_fmnist_reference.py at tiny sizes: both models train, resume is bit-identical, the saved
EMA weights load back into their model class. Skipped without Fashion-MNIST's Debian package."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compresskit.adapters.diffusion.dit import DiT, DiTConfig
from compresskit.errors import CompressKitError

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "train_fmnist_reference.py"
TINY = {
    "dit": ["--hidden", "32", "--depth", "1", "--heads", "2", "--patch", "4"],
    "unet": ["--channels", "8,16"],
}
COMMON = ["--batch", "8", "--train-limit", "64", "--threads", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_fmnist_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script, model: str, steps: int, tmp_path: Path, *extra: str):
    argv = ["--model", model, "--steps", str(steps), *TINY[model], *COMMON, "--out", str(tmp_path / f"fmnist_{model}.safetensors"), *extra]
    return script.main(argv)


@pytest.mark.parametrize("model", ["dit", "unet"])
def test_trains_two_steps_with_a_finite_loss(script, fmnist_dir, model, tmp_path, capsys):
    trainer = run(script, model, 2, tmp_path, "--no-save")
    assert trainer.step == 2
    final = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final loss")]
    assert len(final) == 1 and math.isfinite(float(final[0].split()[-1]))
    # the EMA moved away from the initial weights and is not the live model
    assert any(not torch.equal(e, p) for e, p in zip(trainer.ema.parameters(), trainer.model.parameters()))


@pytest.mark.parametrize("model", ["dit", "unet"])
def test_resume_is_bit_identical(script, fmnist_dir, model, tmp_path):
    straight = run(script, model, 4, tmp_path / "a", "--no-save")
    ckpt = tmp_path / "b" / "state.ckpt"
    run(script, model, 2, tmp_path / "b", "--no-save", "--checkpoint", str(ckpt))
    assert ckpt.is_file() and not ckpt.with_name(ckpt.name + ".tmp").exists()
    resumed = run(script, model, 4, tmp_path / "b", "--no-save", "--checkpoint", str(ckpt), "--resume")
    assert resumed.step == 4
    for (name, a), (_, b) in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_resume_refuses_another_models_checkpoint(script, fmnist_dir, tmp_path):
    ckpt = tmp_path / "state.ckpt"
    run(script, "dit", 1, tmp_path, "--no-save", "--checkpoint", str(ckpt))
    with pytest.raises(CompressKitError, match="--model dit"):
        run(script, "unet", 2, tmp_path, "--no-save", "--checkpoint", str(ckpt), "--resume")


def load_saved(script, weights: Path) -> torch.nn.Module:
    """What the fmnist-dit / fmnist-unet adapter has to do: the JSON config, then the safetensors."""
    config = json.loads(weights.with_suffix(".json").read_text())
    state = load_file(str(weights))
    if config["architecture"] == "dit":
        model = DiT(DiTConfig.from_dict(config["model"]))
        model.load_state_dict(state, strict=True)
    else:
        from diffusers import UNet2DModel

        unet = UNet2DModel(**config["model"])
        unet.load_state_dict(state, strict=True)
        model = script.UNetEps(unet)
    return model.eval()


@pytest.mark.parametrize("model", ["dit", "unet"])
def test_saved_weights_load_back_and_give_the_same_outputs(script, fmnist_dir, model, tmp_path):
    trainer = run(script, model, 2, tmp_path)
    weights = tmp_path / f"fmnist_{model}.safetensors"
    config = json.loads(weights.with_suffix(".json").read_text())
    assert config["null_class"] == 10 and config["dtype"] == "float32" and config["training"]["steps"] == 2
    loaded = load_saved(script, weights)
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 32, 32, generator=gen), torch.tensor([0, 500, 999]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), trainer.ema(x, t, y))


def test_sample_grid_is_a_png_of_ten_rows(script, fmnist_dir, tmp_path):
    from PIL import Image

    png = tmp_path / "grid.png"
    run(script, "dit", 1, tmp_path, "--no-save", "--sample-grid", str(png), "--grid-per-class", "2")
    from compresskit.grid import image_grid

    expected = image_grid(torch.zeros(20, 1, 32, 32), ["x"] * 20, columns=2).size  # 10 rows of 2
    with Image.open(png) as image:
        assert image.size == expected and expected[1] > 10 * 64


@pytest.mark.parametrize("model", ["dit", "unet"])
def test_a_second_stage_starts_from_saved_weights_and_keeps_the_first_stages_record(script, fmnist_dir, model, tmp_path):
    first = run(script, model, 2, tmp_path / "a")
    weights = tmp_path / "a" / f"fmnist_{model}.safetensors"
    out = tmp_path / "b" / weights.name
    argv = ["--init-from", str(weights), "--out", str(out)]
    second = script.main(["--model", model, "--steps", "2", *TINY[model], *COMMON, *argv])  # at --steps: no step run
    assert second.step == 2
    for a, b in zip(first.ema.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    # a stage with steps, resumed from its own checkpoint, is bit-identical to one run straight through
    ckpt = tmp_path / "c" / "state.ckpt"
    straight = script.main(["--model", model, "--steps", "4", *TINY[model], *COMMON, *argv])
    script.main(["--model", model, "--steps", "3", *TINY[model], *COMMON, *argv, "--checkpoint", str(ckpt), "--resume"])
    resumed = script.main(["--model", model, "--steps", "4", *TINY[model], *COMMON, *argv, "--checkpoint", str(ckpt), "--resume"])
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)
    record = json.loads(out.with_suffix(".json").read_text())["training"]
    assert record["steps"] == 4 and record["previous"]["steps"] == 2


def test_a_second_stage_refuses_another_models_weights(script, fmnist_dir, tmp_path):
    run(script, "dit", 1, tmp_path)
    with pytest.raises(CompressKitError, match="not --model unet"):
        script.main(["--model", "unet", "--steps", "2", *TINY["unet"], *COMMON, "--init-from", str(tmp_path / "fmnist_dit.safetensors"), "--out", str(tmp_path / "u.safetensors")])
