"""The ``ldm-unet`` adapter and our LDM / guided-diffusion ``UNetModel``: layout names, loading the
checkpoint forms, compression without calibration, estimates of the shipped configs, save / load.

Tiny configs: model_channels 16, channel_mult (1, 2), one res block per level, attention at ds 2
(8 groups), as an AttentionBlock (class-conditional through ``label_emb``, scale-shift norm) and as a
SpatialTransformer (text-conditional, and class-conditional through LDM's ClassEmbedder table).
"""
import json

import pytest
import torch

import compresskit
from compresskit import CompressConfig
from compresskit.adapters.base import adapter_for
from compresskit.adapters.diffusion import LDMConfig, LDMUNet, LDMUNetAdapter
from compresskit.adapters.diffusion.ldm import config_from_shapes, shipped_configs
from compresskit.cli.main import main
from compresskit.errors import CompressKitError
from compresskit.estimate import estimate_spec
from compresskit.nn.quantized import quantized_tensors

ADAPTER = LDMUNetAdapter()
BASE = dict(image_size=8, in_channels=3, out_channels=3, model_channels=16, num_res_blocks=1,
            attention_resolutions=[2], channel_mult=[1, 2], num_groups=8)
CLASS = dict(BASE, num_classes=5, num_head_channels=8, use_scale_shift_norm=True)
TEXT = dict(BASE, num_heads=2, use_spatial_transformer=True, context_dim=12)
CIN = dict(TEXT, context_classes=6)


def tiny(fields: dict, seed: int = 0) -> LDMUNet:
    torch.manual_seed(seed)
    return LDMUNet(LDMConfig.from_dict(fields)).eval()


def inputs(model: LDMUNet, n: int = 2) -> dict:
    c = model.config
    gen = torch.Generator().manual_seed(1)
    kw = {"x": torch.randn(n, c.in_channels, c.image_size, c.image_size, generator=gen), "t": torch.tensor([3, 700][:n])}
    if c.num_classes or c.context_classes:
        kw["y"] = torch.tensor([1, 4][:n])
    elif c.context_dim:
        kw["context"] = torch.randn(n, 5, c.context_dim, generator=gen)
    return kw


@pytest.mark.parametrize("fields", [CLASS, TEXT, CIN], ids=["attention-class", "transformer-text", "transformer-classembedder"])
def test_forward_keeps_the_image_shape_and_reads_the_condition(fields):
    model = tiny(fields)
    kw = inputs(model)
    with torch.no_grad():
        out = model(**kw)
        assert out.shape == kw["x"].shape
        other = dict(kw, y=kw["y"].flip(0)) if "y" in kw else dict(kw, context=kw["context"] + 1)
        assert not torch.allclose(model(**other), out), "the condition must change the prediction"


def test_state_dict_names_are_the_original_layout():
    # input: 0 conv, 1 ResBlock (level 0), 2 Downsample, 3 ResBlock 16->32 + attention (ds 2);
    # output (deepest first): 0, 1 (+ Upsample), 2, 3 at level 0; the middle ResBlock, attention, ResBlock
    keys = set(tiny(CLASS).state_dict())
    want = {
        "time_embed.0.weight", "time_embed.2.weight", "label_emb.weight", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.0.weight", "input_blocks.1.0.out_layers.3.weight", "input_blocks.2.0.op.weight",
        "input_blocks.3.0.skip_connection.weight", "input_blocks.3.1.norm.weight", "input_blocks.3.1.qkv.weight",
        "input_blocks.3.1.proj_out.weight", "middle_block.0.in_layers.2.weight", "middle_block.1.qkv.weight",
        "middle_block.2.out_layers.3.weight", "output_blocks.0.1.qkv.weight", "output_blocks.1.2.conv.weight",
        "output_blocks.2.0.skip_connection.weight", "output_blocks.3.0.in_layers.2.weight", "out.0.weight", "out.2.weight",
    }
    assert want <= keys
    assert not any(k.startswith(("input_blocks.1.1", "output_blocks.2.1", "input_blocks.4")) for k in keys)  # no attention at ds 1
    model = tiny(CLASS)
    assert model.input_blocks[3][1].qkv.weight.shape == (96, 32, 1) and model.input_blocks[1][0].emb_layers[1].weight.shape == (32, 64)
    text = set(tiny(TEXT).state_dict())
    block = "middle_block.1.transformer_blocks.0."
    assert {f"{block}attn1.to_q.weight", f"{block}attn2.to_k.weight", f"{block}attn2.to_out.0.weight", f"{block}ff.net.0.proj.weight",
            f"{block}ff.net.2.weight", f"{block}norm3.weight", "middle_block.1.proj_in.weight", "input_blocks.3.1.proj_out.weight"} <= text
    assert tiny(TEXT).middle_block[1].transformer_blocks[0].attn2.to_k.weight.shape == (32, 12)
    assert not any(k.startswith("label_emb") for k in text)


def test_config_round_trips_and_refuses_unknown_or_missing_fields():
    config = LDMConfig.from_dict(CLASS)
    assert LDMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert LDMConfig.from_dict(dict(CLASS, use_checkpoint=True, legacy=False)) == config  # runtime-only, dropped
    with pytest.raises(CompressKitError, match="unknown LDM UNet config field.*n_embed"):
        LDMConfig.from_dict(dict(CLASS, n_embed=16))
    with pytest.raises(CompressKitError, match="lacks image_size"):
        LDMConfig.from_dict({k: v for k, v in CLASS.items() if k != "image_size"})
    with pytest.raises(CompressKitError, match="context_dim go together"):
        LDMConfig.from_dict(dict(BASE, num_heads=2, use_spatial_transformer=True))


def _ldm_checkpoint(model: LDMUNet, path, class_table: bool = False):
    """A LatentDiffusion-style training checkpoint: the UNet under model.diffusion_model., other parts beside."""
    state = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items() if not k.startswith("context_embed")}
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    if class_table:
        state["cond_stage_model.embedding.weight"] = model.context_embed.weight.detach().clone()
    torch.save({"state_dict": state, "global_step": 10}, path)


@pytest.mark.parametrize("fields", [CLASS, CIN], ids=["label_emb", "classembedder"])
def test_a_training_checkpoint_with_a_sidecar_loads_and_is_recognised(fields, tmp_path):
    model = tiny(fields)
    path = tmp_path / "model.ckpt"
    _ldm_checkpoint(model, path, class_table="context_classes" in fields)
    (tmp_path / "model.json").write_text(json.dumps(fields))
    assert LDMUNetAdapter.recognises(str(path)) and adapter_for(str(path)) is LDMUNetAdapter
    loaded = ADAPTER.load(str(path))
    kw = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**kw), model(**kw), rtol=0, atol=0)
    meta = ADAPTER.meta_model(str(path))
    assert all(p.is_meta for p in meta.model.parameters()) and meta.model.config == model.config


def test_without_a_sidecar_shapes_are_read_but_the_heads_need_one(tmp_path):
    from safetensors.torch import save_file

    model = tiny(CLASS)
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert LDMUNetAdapter.recognises(str(path))
    with pytest.raises(CompressKitError, match="matches no shipped config.*next to the file"):
        ADAPTER.load(str(path))
    with torch.device("meta"):
        sd = LDMUNet(LDMConfig.from_dict(shipped_configs()["sd-v1-unet"]["architecture"]))
    alias, config = config_from_shapes({k: tuple(v.shape) for k, v in sd.state_dict().items()})
    assert alias == "sd-v1-unet" and config == sd.config


def test_bad_files_get_one_line_errors(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, other)
    assert not LDMUNetAdapter.recognises(str(other))
    with pytest.raises(CompressKitError, match="no UNetModel of the LDM") as err:
        ADAPTER.load(str(other))
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CompressKitError, match="could not be read") as err:
        ADAPTER.load(str(broken))
    assert "\n" not in str(err.value) and not LDMUNetAdapter.recognises(str(broken))
    with pytest.raises(CompressKitError, match="weights are not shipped"):
        ADAPTER.load("ldm-cin256-v2")


def test_blocks_in_execution_order_and_dense_embeddings():
    model = tiny(CLASS)
    assert ADAPTER.blocks(model) == [f"input_blocks.{i}" for i in range(4)] + ["middle_block"] + [f"output_blocks.{i}" for i in range(4)]
    assert set(ADAPTER.embeddings(model)) == {"input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2", "label_emb"}
    assert "context_embed" in ADAPTER.embeddings(tiny(CIN))


def _file(fields, tmp_path):
    model = tiny(fields)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    (tmp_path / "m.json").write_text(json.dumps({"architecture": fields}))
    return ADAPTER.load(str(path))


@pytest.mark.parametrize("fields", [CLASS, TEXT], ids=["attention-class", "transformer-text"])
def test_rtn_4_bits_without_calibration_compresses_every_block_layer_and_stays_close(fields, tmp_path):
    loaded = _file(fields, tmp_path)
    model = loaded.model
    (), kw = ADAPTER.example_inputs(loaded)
    with torch.no_grad():
        before = model(**kw)
    compresskit.compress(loaded, CompressConfig(method="rtn", bits=4), adapter=ADAPTER)
    quantized = set(quantized_tensors(model))
    layers = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))}
    assert quantized == layers - set(ADAPTER.embeddings(model))
    assert any(isinstance(model.get_submodule(n), torch.nn.Conv1d) for n in quantized) or fields is TEXT
    with torch.no_grad():
        after = model(**kw)
    rel = ((after - before).norm() / before.norm()).item()
    assert 0 < rel < 0.2


def test_save_then_load_round_trips(tmp_path):
    loaded = _file(CLASS, tmp_path)
    report = compresskit.compress(loaded, CompressConfig(method="rtn", bits=4), adapter=ADAPTER)
    compresskit.save(loaded.model, report, tmp_path / "out", source={"model": loaded.source, "adapter": "ldm-unet"},
                     save_architecture=lambda d: ADAPTER.save_architecture(loaded, d))
    again = compresskit.load(tmp_path / "out")
    assert isinstance(again, LDMUNet) and set(quantized_tensors(again)) == set(quantized_tensors(loaded.model))
    (), kw = ADAPTER.example_inputs(loaded)
    with torch.no_grad():
        torch.testing.assert_close(again(**kw), loaded.model(**kw), rtol=0, atol=0)


@pytest.mark.parametrize("fields", [CLASS, TEXT, CIN], ids=["label_emb", "text", "classembedder"])
def test_dense_export_is_a_checkpoint_of_the_layout_that_loads_back(fields, tmp_path):
    from safetensors.torch import load_file

    loaded = _file(fields, tmp_path)
    compresskit.compress(loaded, CompressConfig(method="rtn", bits=2), adapter=ADAPTER)
    (), kw = ADAPTER.example_inputs(loaded)
    with torch.no_grad():
        want = loaded.model(**kw)
    out = tmp_path / "dense"
    out.mkdir()
    ADAPTER.export_dense(loaded, out)
    keys = set(load_file(str(out / "unet.safetensors")))
    bare = set(tiny(fields).state_dict())
    if fields is CLASS:  # guided-diffusion: the bare UNetModel state dict
        assert keys == bare
    else:  # LDM: under model.diffusion_model., the ClassEmbedder table under LDM's own name
        table = {"cond_stage_model.embedding.weight"} if fields is CIN else set()
        assert keys == {"model.diffusion_model." + k for k in bare - {"context_embed.weight"}} | table
    assert set(quantized_tensors(loaded.model))  # the compressed model is left compressed
    again = ADAPTER.load(str(out / "unet.safetensors"))
    assert not set(quantized_tensors(again.model))
    with torch.no_grad():
        torch.testing.assert_close(again.model(**kw), want, rtol=0, atol=0)


def test_ddpm_side_is_class_conditional_only():
    from compresskit.adapters.base import LoadedModel

    text = LoadedModel(tiny(TEXT), "t", "t")
    with pytest.raises(CompressKitError, match="text-conditioned"):
        ADAPTER.noise_batches(text, ADAPTER.calib_spec(n_samples=2))
    cls = LoadedModel(tiny(CLASS), "c", "c")
    batches = ADAPTER.noise_batches(cls, ADAPTER.calib_spec(n_samples=8))
    assert {b["y"].item() for b in batches} <= set(range(5))  # label_emb: no null class, none dropped
    cin = ADAPTER.noise_batches(LoadedModel(tiny(CIN), "c", "c"), ADAPTER.calib_spec(n_samples=2))
    assert set(cin[0]) == {"x", "t", "y"} and cin[0]["x"].shape == (1, 3, 8, 8)
    with pytest.raises(CompressKitError, match="Fashion-MNIST"):
        ADAPTER.calibration_batches(cls, ADAPTER.calib_spec(n_samples=2))


@pytest.mark.parametrize("alias, params", [("ldm-cin256-v2", 401_433_091), ("sd-v1-unet", 859_520_964)])
def test_estimate_of_a_shipped_config_builds_it_on_meta(alias, params):
    result = estimate_spec(alias, CompressConfig(method="pq", bits=2))
    assert result["adapter"] == "ldm-unet" and result["weights"] == "none"
    assert result["counted"]["n_parameters"] == params
    totals = result["totals"]
    assert 2 < totals["total_bits"] / totals["n_values"] < 3  # 2-bit codes plus codebooks and the dense rest
    assert "input_blocks.0.0" in result["kept_dense"] and "out.2" in result["kept_dense"]


def test_cli_estimate(capsys):
    main(["estimate", "--model", "ldm-cin256-v2", "--method", "pq", "--bits", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["counted"]["n_parameters"] == 401_433_091


def test_matches_diffusers_conversion_of_the_same_ldm_state_dict():
    """A reference outside this code: diffusers' own converter of LDM checkpoints (keys under
    model.diffusion_model.) gives a UNet2DConditionModel that must predict exactly what ours does."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    fields = dict(TEXT, in_channels=4, out_channels=4, attention_resolutions=[2, 1], transformer_depth=1)
    ours = tiny(fields)
    unet_params = {k: v for k, v in fields.items() if k != "num_groups"}  # the original always has 32 groups
    original = {"model": {"params": {"unet_config": {"params": unet_params}, "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    config = dict(create_unet_diffusers_config_from_ldm(original, checkpoint), norm_num_groups=8)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    kw = inputs(ours)
    with torch.no_grad():
        want = reference(kw["x"], kw["t"], encoder_hidden_states=kw["context"]).sample
        torch.testing.assert_close(ours(**kw), want, rtol=1e-5, atol=1e-5)
