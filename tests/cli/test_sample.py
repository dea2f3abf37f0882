"""``compresskit sample``: the grid's geometry and pixels, seeds, --compare, and one-line errors that write nothing.

A tiny random Fashion-MNIST-shaped DiT (1 x 32 x 32, 10 classes, patch 4, hidden 32, one block)
sampled with 2 steps keeps every test well under a second.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from compresskit.adapters import DiTAdapter
from compresskit.adapters.base import LoadedModel
from compresskit.adapters.diffusion import DiT, DiTConfig
from compresskit.adapters.diffusion.data import CLASS_NAMES
from compresskit.cli.main import main
from compresskit.errors import CompressKitError
from compresskit.grid import CAPTION_PX, GAP_PX, PAD_PX, TITLE_PX, image_grid

FMNIST = DiTConfig(input_size=32, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
STEPS = ["--steps", "2"]
# 16 pictures of 32 x 32, upscaled x2: 4 columns, 4 rows
GRID_16 = (4 * 64 + 5 * PAD_PX, 4 * (64 + CAPTION_PX) + 5 * PAD_PX)


def random_dit(config: DiTConfig, seed: int = 0) -> DiT:
    """Random weights everywhere: DiT's own init zeroes the output layer, which would draw the same noise for every model."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def save_dit(folder, name: str, config: DiTConfig) -> str:
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in random_dit(config).state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"architecture": config.to_dict()}))
    return str(path)


def run(capsys, *argv):
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(FP model file, its 2-bit RTN compressed directory)."""
    folder = tmp_path_factory.mktemp("sample")
    fp = save_dit(folder, "tiny", FMNIST)
    compressed = folder / "tiny-rtn2"
    main(["quantize", "--model", fp, "--preset", "none", "--no-eval", "--method", "rtn", "--bits", "2", "--out", str(compressed), "--json"])
    return fp, str(compressed)


def test_grid_size_labels_and_seeds(models, tmp_path, capsys):
    fp, _ = models
    code, out, _ = run(capsys, "sample", "--model", fp, "--out", tmp_path / "a.png", *STEPS, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["labels"] == [*range(10), *range(6)] and result["steps"] == 2 and result["options"]["cfg_scale"] == 1.5
    assert result["out"] == str(tmp_path / "a.png") and Image.open(tmp_path / "a.png").size == GRID_16 == (result["width"], result["height"])
    run(capsys, "sample", "--model", fp, "--out", tmp_path / "b.png", *STEPS)
    run(capsys, "sample", "--model", fp, "--out", tmp_path / "c.png", *STEPS, "--seed", "1")
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]  # no temporary file left


def test_labels_cycle_to_n_and_n_defaults_to_their_number(models, tmp_path, capsys):
    fp, _ = models
    _, out, _ = run(capsys, "sample", "--model", fp, "--out", tmp_path / "a.png", *STEPS, "--labels", "0,3,7", "--json")
    assert json.loads(out)["labels"] == [0, 3, 7]
    assert Image.open(tmp_path / "a.png").size == (3 * 64 + 4 * PAD_PX, 64 + CAPTION_PX + 2 * PAD_PX)
    _, out, _ = run(capsys, "sample", "--model", fp, "--out", tmp_path / "b.png", *STEPS, "--labels", "7", "--n", "9", "--json")
    assert json.loads(out)["labels"] == [7] * 9
    assert Image.open(tmp_path / "b.png").size == (4 * 64 + 5 * PAD_PX, 3 * (64 + CAPTION_PX) + 4 * PAD_PX)  # 4 columns, 3 rows


def test_cells_hold_the_upscaled_samples_with_captions_under_them(models):
    adapter = DiTAdapter()
    loaded = adapter.load(models[0])
    assert adapter.supports("sample") and adapter.class_names(loaded) == CLASS_NAMES
    labels = torch.tensor([0, 9, 4, 4, 2])
    images = adapter.sample(loaded, labels, seed=3, options={"steps": 2})  # [5, 1, 32, 32]
    assert images.shape == (5, 1, 32, 32) and images.abs().max() <= 1
    torch.testing.assert_close(adapter.sample(loaded, labels, seed=3, options={"steps": 2}), images, rtol=0, atol=0)
    grid = np.asarray(image_grid(images, [CLASS_NAMES[i] for i in labels]))  # 4 columns, 2 rows
    want = ((images[:, 0] + 1) * 127.5).round().to(torch.uint8).repeat_interleave(2, 1).repeat_interleave(2, 2).numpy()  # [5, 64, 64]
    for i in range(5):
        r, c = divmod(i, 4)
        top, left = PAD_PX + r * (64 + CAPTION_PX + PAD_PX), PAD_PX + c * (64 + PAD_PX)
        assert np.array_equal(grid[top:top + 64, left:left + 64], want[i])
        assert grid[top + 64:top + 64 + CAPTION_PX, left:left + 64].min() < 128  # a caption was written under it
    r, c = divmod(5, 4)  # the empty sixth cell stays white
    assert grid[PAD_PX + r * (64 + CAPTION_PX + PAD_PX):, PAD_PX + c * (64 + PAD_PX):].min() == 255


def test_other_shapes_are_captioned_by_number_and_drawn_in_colour():
    config = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    adapter, loaded = DiTAdapter(), LoadedModel(random_dit(config), "rgb", "rgb")
    assert adapter.class_names(loaded) == ("0", "1", "2", "3", "4")
    images = adapter.sample(loaded, torch.tensor([1, 4]), options={"steps": 2})  # [2, 3, 8, 8]
    grid = image_grid(images, ["1", "4"])
    assert grid.mode == "RGB" and grid.size == (2 * 64 + 3 * PAD_PX, 64 + CAPTION_PX + 2 * PAD_PX)  # 8 px upscaled x8
    with pytest.raises(CompressKitError, match="class ids in 0..4"):
        adapter.sample(loaded, torch.tensor([5]), options={"steps": 2})


def panels(path, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The left and right panels of a --compare picture, titles included."""
    picture = pixels(path)
    return picture[:, :width], picture[:, width + GAP_PX:]


def test_compare_with_itself_gives_identical_halves(models, tmp_path, capsys):
    fp, _ = models
    code, out, _ = run(capsys, "sample", "--model", fp, "--compare", fp, "--out", tmp_path / "c.png", *STEPS, "--json")
    assert code == 0
    assert Image.open(tmp_path / "c.png").size == (2 * GRID_16[0] + GAP_PX, TITLE_PX + GRID_16[1])
    left, right = panels(tmp_path / "c.png", GRID_16[0])
    assert np.array_equal(left, right)
    run(capsys, "sample", "--model", fp, "--out", tmp_path / "single.png", *STEPS)
    assert np.array_equal(left[TITLE_PX:], pixels(tmp_path / "single.png"))  # the same seed and labels as alone
    assert left[:TITLE_PX].min() < 128  # a title above the panel
    assert [m["title"] for m in json.loads(out)["models"]] == ["tiny.safetensors: FP"] * 2


def test_compare_with_a_compressed_directory(models, tmp_path, capsys):
    fp, compressed = models
    code, out, _ = run(capsys, "sample", "--model", fp, "--compare", compressed, "--out", tmp_path / "c.png", *STEPS, "--json")
    assert code == 0
    result = json.loads(out)
    assert [m["adapter"] for m in result["models"]] == ["dit", "dit"]
    assert result["models"][1]["title"].startswith("tiny-rtn2: rtn ") and result["models"][1]["title"].endswith(" bits/w")
    left, right = panels(tmp_path / "c.png", GRID_16[0])
    assert left.shape == right.shape and not np.array_equal(left[TITLE_PX:], right[TITLE_PX:])
    run(capsys, "sample", "--model", compressed, "--out", tmp_path / "q.png", *STEPS)
    assert np.array_equal(right[TITLE_PX:], pixels(tmp_path / "q.png"))  # a compressed directory samples alone too


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "--n must be between 1 and 256, got 0"),
        (["--n", "257"], "--n must be between 1 and 256, got 257"),
        (["--labels", "0,shoe"], "must be class ids joined by commas"),
        (["--labels", ""], "must be class ids joined by commas"),
        (["--labels", "3,10"], "--labels 10: "),
        (["--labels", "-1"], "--labels -1: "),
        (["--steps", "0"], "respacing needs 1 <= steps"),
        (["--adapter", "lm"], "the 'lm' adapter cannot sample pictures"),
    ],
)
def test_bad_input_gives_one_line_error_and_writes_nothing(models, tmp_path, capsys, args, message):
    code, out, err = run(capsys, "sample", "--model", models[0], "--out", tmp_path / "a.png", *STEPS, *args, "--json")  # no progress lines
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths(models, tmp_path, capsys):
    fp = models[0]
    code, _, err = run(capsys, "sample", "--model", fp, "--out", tmp_path / "missing" / "a.png", *STEPS)
    assert code == 2 and "does not exist" in err and not (tmp_path / "missing").exists()
    code, _, err = run(capsys, "sample", "--model", fp, "--out", tmp_path / "a.jpg", *STEPS)
    assert code == 2 and "must end in .png" in err and list(tmp_path.iterdir()) == []
    (tmp_path / "a.png").write_bytes(b"keep me")
    code, _, err = run(capsys, "sample", "--model", fp, "--out", tmp_path / "a.png", *STEPS)
    assert code == 2 and "already exists" in err and (tmp_path / "a.png").read_bytes() == b"keep me"
    code, _, _ = run(capsys, "sample", "--model", fp, "--out", tmp_path / "a.png", *STEPS, "--overwrite")
    assert code == 0 and Image.open(tmp_path / "a.png").size == GRID_16


def test_latent_models_are_refused(tmp_path, capsys):
    latent = save_dit(tmp_path, "latent", DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10))
    code, _, err = run(capsys, "sample", "--model", latent, "--out", tmp_path / "a.png", *STEPS, "--json")
    assert code == 2 and "4-channel latents" in err and err.count("\n") == 1
    assert not (tmp_path / "a.png").exists()
