"""The ``unet`` adapter: loading a diffusers UNet2DModel, its unchained blocks, compression with the
dit adapter's Fashion-MNIST calibration, and save / load.

A tiny class-conditional UNet2DModel (1 channel, 32 x 32, channels (16, 32), one layer per block,
attention at the lowest level, 10 classes + null) is saved with ``save_pretrained``; tests that read
Fashion-MNIST skip without its Debian package.
"""
import json

import pytest
import torch

import compresskit
from compresskit import CompressConfig
from compresskit.adapters.base import adapter_for
from compresskit.adapters.diffusion import ClassConditionalUNet, UNetAdapter
from compresskit.calib.capture import is_chained
from compresskit.calib.config import CalibrationConfig
from compresskit.errors import CompressKitError
from compresskit.nn.quantized import quantized_tensors

diffusers = pytest.importorskip("diffusers")

ADAPTER = UNetAdapter()
BLOCKS = ["unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0", "unet.up_blocks.1"]
EMBEDDINGS = {"unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1", "unet.time_embedding.linear_2", "unet.class_embedding"}


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=11,
    )


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet") / "model"
    tiny_unet().save_pretrained(path)
    return path


def test_recognises_model_and_pipeline_directories_and_nothing_else(unet_dir, tmp_path):
    assert UNetAdapter.recognises(str(unet_dir)) and adapter_for(str(unet_dir)) is UNetAdapter
    pipeline = tmp_path / "pipe"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "unet" / "config.json").write_text((unet_dir / "config.json").read_text())
    assert UNetAdapter.recognises(str(pipeline))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    assert not UNetAdapter.recognises(str(other)) and not UNetAdapter.recognises(None)
    with pytest.raises(CompressKitError, match="UNet2DModel"):
        ADAPTER.load(str(other))


def test_load_wraps_a_class_conditional_unet_as_model_x_t_y(unet_dir):
    loaded = ADAPTER.load(str(unet_dir))
    model = loaded.model
    assert isinstance(model, ClassConditionalUNet) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = tiny_unet().eval()
    (), kwargs = ADAPTER.example_inputs(loaded)
    with torch.no_grad():
        want = reference(kwargs["x"], kwargs["t"], class_labels=kwargs["y"]).sample
        torch.testing.assert_close(model(**kwargs), want)
    assert ADAPTER.blocks(model) == BLOCKS
    assert set(ADAPTER.embeddings(model)) == EMBEDDINGS


def test_an_unconditional_unet_is_loaded_bare_and_refuses_fmnist_calibration(tmp_path):
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=8).save_pretrained(tmp_path / "u")
    loaded = ADAPTER.load(str(tmp_path / "u"))
    assert type(loaded.model).__name__ == "UNet2DModel"
    assert ADAPTER.blocks(loaded.model)[0] == "down_blocks.0"
    with pytest.raises(CompressKitError, match="class-conditional"):
        ADAPTER.calibration_batches(loaded, ADAPTER.calib_spec(n_samples=2))


def test_meta_model_builds_the_architecture_without_weights(unet_dir):
    meta = ADAPTER.meta_model(str(unet_dir))
    assert all(p.is_meta for p in meta.model.parameters())
    assert sum(p.numel() for p in meta.model.parameters()) == sum(p.numel() for p in tiny_unet().parameters())


@pytest.fixture(scope="module")
def compressed(unet_dir, fmnist_dir):
    """One compression (pq 2 bits, the fast preset on 4 Fashion-MNIST samples), with every forward pass recorded."""
    loaded = ADAPTER.load(str(unet_dir))
    calls = []  # per model call during compress: (samples in x, how many tensors were already compressed)

    def record(module, args, kwargs):
        x = kwargs["x"] if "x" in kwargs else args[0]
        calls.append((len(x), len(quantized_tensors(module))))

    hook = loaded.model.register_forward_pre_hook(record, with_kwargs=True)
    report = compresskit.compress(loaded, CompressConfig(method="pq", bits=2), adapter=ADAPTER, calibration=CalibrationConfig.preset("fast", n_samples=4))
    hook.remove()
    return loaded, report, calls


def test_blocks_are_unchained_on_a_calibration_batch(unet_dir, fmnist_dir):
    loaded = ADAPTER.load(str(unet_dir))
    batch = ADAPTER.calibration_batches(loaded, ADAPTER.calib_spec(n_samples=2))[0]
    assert set(batch) == {"x", "t", "y", "noise"} and ADAPTER.loss_keys == ("noise",)
    model_batch = {k: v for k, v in batch.items() if k not in ADAPTER.loss_keys}
    assert not is_chained(loaded.model, ADAPTER.blocks(loaded.model), model_batch)


def test_compress_quantizes_block_convs_and_linears_and_keeps_embeddings_dense(compressed):
    loaded, report, calls = compressed
    model = loaded.model
    quantized = set(quantized_tensors(model))
    layers = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    in_blocks = {n for n in layers if any(n.startswith(b + ".") for b in BLOCKS)}
    assert in_blocks and quantized == in_blocks, "every conv and linear of the blocks, nothing else"
    assert any(isinstance(model.get_submodule(n), torch.nn.Conv2d) for n in quantized)
    assert not quantized & EMBEDDINGS
    # no prefix re-runs: the 4 samples make one batch of the walk, which the model sees twice (the
    # chaining check, then one pass capturing every block's inputs), both before anything is
    # compressed; the only other call is the graph trace of the one-sample example input
    assert [n for n, _ in calls if n == 4] == [4, 4] and len(calls) == 3
    assert all(done == 0 for _, done in calls)


def test_compressed_unet_runs_with_a_finite_ddpm_loss(compressed, fmnist_dir):
    loaded, _, _ = compressed
    batches = ADAPTER.calibration_batches(loaded, ADAPTER.calib_spec(n_samples=2, seed=1))
    with torch.no_grad():
        loss = ADAPTER.task_loss(loaded.model, batches[0])
    assert torch.isfinite(loss) and loss.item() > 0


def test_save_then_load_gives_identical_outputs(compressed, unet_dir, tmp_path):
    loaded, report, _ = compressed
    compresskit.save(loaded.model, report, tmp_path / "out", source={"model": str(unet_dir), "adapter": "unet"},
                     save_architecture=lambda d: ADAPTER.save_architecture(loaded, d))
    assert json.loads((tmp_path / "out" / "architecture" / "unet.json").read_text())["class"] == "UNet2DModel"
    again = compresskit.load(tmp_path / "out")
    model = again.model if hasattr(again, "model") else again
    assert isinstance(model, ClassConditionalUNet) and set(quantized_tensors(model)) == set(quantized_tensors(loaded.model))
    (), kwargs = ADAPTER.example_inputs(loaded)
    with torch.no_grad():
        # every tensor is equal (checked in test_pipelines); the outputs may differ in the last bits because CPU
        # matmul / conv kernels sum in an order that depends on the weights' memory alignment
        torch.testing.assert_close(model(**kwargs), loaded.model(**kwargs), rtol=0, atol=1e-6)


def test_a_text_conditioned_unet_loads_for_structure_and_runs_its_example(tmp_path):
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    ).save_pretrained(tmp_path / "c")
    assert UNetAdapter.recognises(str(tmp_path / "c"))
    loaded = ADAPTER.load(str(tmp_path / "c"))
    assert type(loaded.model).__name__ == "UNet2DConditionModel"
    assert ADAPTER.blocks(loaded.model) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(ADAPTER.embeddings(loaded.model))
    args, kwargs = ADAPTER.example_inputs(loaded)
    with torch.no_grad():
        assert loaded.model(*args, **kwargs)[0].shape == (1, 4, 16, 16)
    with pytest.raises(CompressKitError, match="class-conditional"):
        ADAPTER.noise_batches(loaded, ADAPTER.calib_spec(n_samples=2))


def test_samples_fashion_mnist_pictures_through_the_family(unet_dir, tmp_path):
    """``compresskit sample`` on a U-Net directory: the family's sample() through the model(x, t, y) wrapper."""
    from PIL import Image

    from compresskit.adapters.diffusion.data import CLASS_NAMES
    from compresskit.cli.main import main
    from compresskit.grid import CAPTION_PX, PAD_PX

    loaded = ADAPTER.load(str(unet_dir))
    assert ADAPTER.supports("sample") and ADAPTER.class_names(loaded) == CLASS_NAMES
    images = ADAPTER.sample(loaded, torch.tensor([0, 7]), seed=1, options={"steps": 2})
    assert images.shape == (2, 1, 32, 32) and images.abs().max() <= 1
    main(["sample", "--model", str(unet_dir), "--labels", "0,7", "--steps", "2", "--out", str(tmp_path / "u.png"), "--json"])
    assert Image.open(tmp_path / "u.png").size == (2 * 64 + 3 * PAD_PX, 64 + CAPTION_PX + 2 * PAD_PX)  # 32 px upscaled x2
