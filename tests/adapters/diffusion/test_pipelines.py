"""Compressed DiTs and U-Nets in the diffusers pipelines they came from, their dense export, and reloading.

Tiny random models built from configs here (no downloads): a DiT transformer with 1000 classes (so
``DiTPipeline``'s classifier-free guidance finds its null class 1000), a one-level AutoencoderKL, U-Nets
of two levels, and for Stable Diffusion a one-layer CLIP text model with a tokenizer written from an
eight-token vocabulary. Every pipeline samples 2 steps from a fixed seed.
"""
import json

import numpy as np
import pytest
import torch

import compresskit
from compresskit import CompressConfig
from compresskit.adapters.diffusion import DiT, DiTAdapter, DiTConfig, UNetAdapter
from compresskit.cli.main import main
from compresskit.nn.quantized import quantized_tensors
from compresskit.quantizers.base import Quantizer
from compresskit.registry import get_quantizer

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'compresskit[diffusion]')")

DIT, UNET = DiTAdapter(), UNetAdapter()
STEPS = 2


def randomised(model):
    """``model`` with every parameter drawn N(0, 0.1) (diffusers zero-initialises AdaLN and outputs), in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def tiny_dit_transformer():
    """A diffusers DiT whose blocks hold equal embedder copies, as converted checkpoints do."""
    torch.manual_seed(0)
    model = randomised(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    ))
    with torch.no_grad():
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            for key, tensor in block.norm1.emb.state_dict().items():
                tensor.copy_(first[key])
    return model


def tiny_vae():
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=8, sample_size=8,
    ).eval()


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()


def tiny_text_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    ).eval()


def ddim():
    return diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)


def compressed(adapter, model, path, method="rtn"):
    """``model`` saved with ``save_pretrained`` at ``path``, loaded by ``adapter`` and compressed at 2 bits
    from the weights alone: ``(loaded, report)``."""
    model.save_pretrained(path)
    loaded = adapter.load(str(path))
    report = compresskit.compress(loaded, CompressConfig(method=method, bits=2), adapter=adapter)
    assert quantized_tensors(loaded.model)
    return loaded, report


def save(adapter, loaded, report, out, dense=True):
    return compresskit.save(
        loaded.model, report, out, source={"model": loaded.source, "adapter": adapter.name},
        save_architecture=lambda d: adapter.save_architecture(loaded, d),
        export_dense=(lambda d: adapter.export_dense(loaded, d)) if dense else None,
    )


def sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


def assert_same_images(got, want, shape):
    assert got.shape == shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---- pipelines ---------------------------------------------------------------------------------------
def test_compressed_dit_samples_in_dit_pipeline_as_its_dense_export(tmp_path):
    loaded, report = compressed(DIT, tiny_dit_transformer(), tmp_path / "src", method="pq")
    assert loaded.extras["shared"]  # the embedder copies are one tensor in the compressed model
    out = save(DIT, loaded, report, tmp_path / "out")
    dense, info = diffusers.DiTTransformer2DModel.from_pretrained(out / "dense", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys: every copy was written
    assert quantized_tensors(loaded.model), "exporting must leave the compressed model compressed"
    labels = {"id2label": {i: f"class {i}" for i in range(1000)}}
    want = sample(diffusers.DiTPipeline(transformer=dense.eval(), vae=tiny_vae(), scheduler=ddim(), **labels), class_labels=[1, 7])
    got = sample(diffusers.DiTPipeline(transformer=loaded.model, vae=tiny_vae(), scheduler=ddim(), **labels), class_labels=[1, 7])
    assert_same_images(got, want, (2, 8, 8, 3))
    original = sample(diffusers.DiTPipeline(transformer=tiny_dit_transformer(), vae=tiny_vae(), scheduler=ddim(), **labels), class_labels=[1, 7])
    assert not np.allclose(got, original, atol=1e-5), "2-bit weights should change the samples"


def test_compressed_unet_samples_in_ddpm_pipeline_as_the_cli_dense_export(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    main(["quantize", "--model", str(tmp_path / "src"), "--method", "rtn", "--bits", "2", "--preset", "none", "--no-eval",
          "--export", "dense", "--out", str(out), "--json"])
    compressed_unet = compresskit.load(out)
    assert quantized_tensors(compressed_unet)
    dense = diffusers.UNet2DModel.from_pretrained(out / "dense").eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    got = sample(diffusers.DDPMPipeline(unet=compressed_unet, scheduler=scheduler), batch_size=2)
    want = sample(diffusers.DDPMPipeline(unet=dense, scheduler=scheduler), batch_size=2)
    assert_same_images(got, want, (2, 16, 16, 1))


def tiny_tokenizer(folder):
    """A CLIP tokenizer over eight tokens, written here: enough for the prompt "a cat"."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "c": 4, "a": 5, "t</w>": 6, "ca": 7}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def tiny_text_encoder(vocab_size):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return transformers.CLIPTextModel(config).eval()


def test_compressed_text_unet_samples_in_stable_diffusion_as_its_dense_export(tmp_path):
    loaded, report = compressed(UNET, tiny_text_unet(), tmp_path / "src", method="pq")
    out = save(UNET, loaded, report, tmp_path / "out")
    dense = diffusers.UNet2DConditionModel.from_pretrained(out / "dense").eval()
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    parts = {"vae": tiny_vae(), "text_encoder": tiny_text_encoder(len(tokenizer)), "tokenizer": tokenizer, "scheduler": ddim(),
             "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    got = sample(diffusers.StableDiffusionPipeline(unet=loaded.model, **parts), prompt=["a cat"], height=8, width=8)
    want = sample(diffusers.StableDiffusionPipeline(unet=dense, **parts), prompt=["a cat"], height=8, width=8)
    assert_same_images(got, want, (1, 8, 8, 3))


def test_class_conditional_unet_exports_the_unet2dmodel_inside_its_wrapper(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 norm_num_groups=8, num_class_embeds=11)
    loaded, _ = compressed(UNET, unet, tmp_path / "src")
    UNET.export_dense(loaded, tmp_path)
    dense = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    (), kwargs = UNET.example_inputs(loaded)
    with torch.no_grad():
        want = dense(kwargs["x"], kwargs["t"], class_labels=kwargs["y"]).sample
        torch.testing.assert_close(loaded.model(**kwargs), want, rtol=0, atol=1e-6)


# ---- compresskit.load rebuilds without re-quantizing --------------------------------------------------
def refuse_fitting(monkeypatch):
    """Any quantizer fit from here on fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was fitted while loading")

    monkeypatch.setattr(Quantizer, "fit", refuse)
    for name in ("rtn", "pq"):
        monkeypatch.setattr(get_quantizer(name), "_fit", refuse)


@pytest.mark.parametrize("which", ["dit", "unet"])
def test_load_rebuilds_the_compressed_model_without_fitting(tmp_path, monkeypatch, which):
    adapter, model, method = (DIT, tiny_dit_transformer(), "pq") if which == "dit" else (UNET, tiny_text_unet(), "rtn")
    loaded, report = compressed(adapter, model, tmp_path / "src", method=method)
    out = save(adapter, loaded, report, tmp_path / "out", dense=False)
    (), kwargs = adapter.example_inputs(loaded)
    with torch.no_grad():
        want = loaded.model(**kwargs)[0]
    refuse_fitting(monkeypatch)
    again = compresskit.load(out)
    assert set(quantized_tensors(again)) == set(quantized_tensors(loaded.model))
    with torch.no_grad():
        # equal values; not bit for bit: diffusers' from_pretrained can leave a weight 8 bytes off 64-byte
        # alignment, and the CPU matmul then sums in another order (~1e-7)
        torch.testing.assert_close(again(**kwargs)[0], want, rtol=0, atol=1e-6)


# ---- our original-layout DiT ------------------------------------------------------------------------
def test_original_dit_exports_a_checkpoint_the_dit_adapter_loads_again(tmp_path):
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(randomised(DiT(config)).state_dict(), checkpoint)
    checkpoint.with_suffix(".json").write_text(json.dumps({"architecture": config.to_dict()}))
    out = tmp_path / "out"
    main(["quantize", "--model", str(checkpoint), "--method", "pq", "--bits", "2", "--preset", "none", "--no-eval",
          "--export", "dense", "--out", str(out), "--json"])
    files = sorted(p.name for p in (out / "dense").iterdir())
    assert files == ["dit.json", "dit.safetensors"]
    again = DIT.load(str(out / "dense" / "dit.safetensors"))
    assert isinstance(again.model, DiT) and again.model.config == config and not quantized_tensors(again.model)
    compressed_dit = compresskit.load(out)
    (), kwargs = DIT.example_inputs(again)
    with torch.no_grad():
        torch.testing.assert_close(again.model(**kwargs), compressed_dit(**kwargs), rtol=0, atol=1e-6)
