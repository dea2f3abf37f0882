"""DiT: our model against the original layout, loading through the ``dit`` adapter, and whole-model size
estimates against what ``compress`` and the saved file really hold.

Tiny random DiTs (hidden 64, 2 blocks) keep every test fast; the DiT-XL/2 figures are estimates on the
meta device, no weights. diffusers tests build tiny diffusers models and skip without diffusers.
"""
import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compresskit
from compresskit import CompressConfig, compress
from compresskit.adapters import DiTAdapter, adapter_for, get_adapter
from compresskit.adapters.diffusion import DiT, DiTConfig, config_from_shapes, shipped_configs
from compresskit.adapters.diffusion.dit import sincos_2d
from compresskit.cli.main import main
from compresskit.errors import CompressKitError
from compresskit.estimate import estimate_model, estimate_spec
from compresskit.nn.quantized import quantized_tensors

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
ADAPTER = DiTAdapter()
XL_PARAMETERS = 674_834_720  # the paper's 674.8M: every parameter of DiT-XL/2, the fixed pos_embed (294,912 values) apart


def tiny_dit(seed: int = 0, config: DiTConfig = TINY) -> DiT:
    """A tiny DiT with random weights everywhere (the original init zeroes adaLN and the output)."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def inputs(n: int = 2, config: DiTConfig = TINY, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    return x, torch.randint(0, 1000, (n,), generator=gen), torch.randint(0, config.num_classes, (n,), generator=gen)


def original_names(depth: int) -> set[str]:
    """The state-dict keys of facebookresearch/DiT's ``DiT`` (``models.py``) with ``depth`` blocks."""
    layers = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    for i in range(depth):
        layers += [f"blocks.{i}.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
    return {"pos_embed", "y_embedder.embedding_table.weight"} | {f"{n}.{p}" for n in layers for p in ("weight", "bias")}


# ---- the model -------------------------------------------------------------------------------------
def test_forward_shape_and_learned_sigma_channels():
    x, t, y = inputs()
    assert tiny_dit()(x, t, y).shape == (2, 8, 8, 8)  # epsilon and sigma: 2 * in_channels
    assert tiny_dit(config=DiTConfig(**{**TINY.to_dict(), "learn_sigma": False}))(x, t, y).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("guided", [None, 3])
def test_cfg_guides_the_epsilon_channels_only(guided):
    model, scale = tiny_dit(), 4.0
    x, t, y = inputs(n=2)
    null = torch.full_like(y, TINY.num_classes)
    with torch.no_grad():
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), scale, guided_channels=guided)
        cond, uncond = model(x, t, y), model(x, t, null)
    g = TINY.in_channels if guided is None else guided
    expected = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    torch.testing.assert_close(out[:2, :g], expected)
    torch.testing.assert_close(out[2:, :g], expected)
    torch.testing.assert_close(out[:2, g:], cond[:, g:])  # the sigma channels are the conditional prediction's
    torch.testing.assert_close(out[2:, g:], uncond[:, g:])
    assert not torch.allclose(out[:2, :g], cond[:, :g])  # guidance did something


def test_state_dict_names_match_the_original_layout():
    model = DiT(TINY)
    assert set(model.state_dict()) == original_names(TINY.depth)
    assert model.y_embedder.embedding_table.weight.shape == (TINY.num_classes + 1, 64)  # + the "no class" row
    no_cfg = DiT(DiTConfig(**{**TINY.to_dict(), "class_dropout_prob": 0.0}))
    assert no_cfg.y_embedder.embedding_table.weight.shape == (TINY.num_classes, 64)
    assert "pos_embed" not in dict(model.named_parameters())  # fixed: never trained
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(64, 4), rtol=0, atol=0)


def test_shipped_configs_and_shape_inference():
    configs = shipped_configs()
    assert {"dit-xl-2-256", "dit-xl-2-512", "dit-l-2-256", "dit-b-2-256", "dit-s-2-256"} <= set(configs)
    assert configs["dit-xl-2-256"]["hub_id"] == "facebook/DiT-XL-2-256"
    xl = DiTConfig.from_dict(configs["dit-xl-2-256"]["architecture"])
    with torch.device("meta"):
        model = DiT(xl)
    assert config_from_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}) == xl
    with pytest.raises(CompressKitError, match="number of heads is unknown"):
        config_from_shapes({k: tuple(v.shape) for k, v in DiT(TINY).state_dict().items()})


# ---- loading through the adapter -------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(.pt path, .safetensors path, model): one tiny DiT saved both ways, with its JSON sidecar config."""
    folder = tmp_path_factory.mktemp("tiny-dit")
    model = tiny_dit()
    pt, st = folder / "tiny.pt", folder / "tiny-st.safetensors"
    torch.save({"ema": model.state_dict()}, pt)  # a training-style checkpoint: its EMA weights are read
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    for path in (pt, st):
        path.with_suffix(".json").write_text(json.dumps({"architecture": TINY.to_dict()}))
    return pt, st, model


@pytest.mark.parametrize("which", [0, 1])
def test_checkpoint_loads_back_and_is_recognised(saved, which):
    path, model = saved[which], saved[2]
    assert adapter_for(str(path)) is DiTAdapter
    loaded = ADAPTER.load(str(path))
    assert loaded.resolved == str(path.resolve()) and not loaded.model.training
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), model(x, t, y))
    assert ADAPTER.blocks(loaded.model) == ["blocks.0", "blocks.1"]
    assert set(ADAPTER.embeddings(loaded.model)) == {
        "x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.embedding_table", "final_layer.linear", "final_layer.adaLN_modulation.1",
    }
    assert set(ADAPTER.example_inputs(loaded)[1]) == {"x", "t", "y"}


def test_recognises_only_what_it_can_load(tmp_path):
    assert get_adapter("dit") is DiTAdapter
    assert DiTAdapter.recognises("dit-xl-2-256") and DiTAdapter.recognises("DiT-B-2-256")
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2)}, other)
    for spec in (None, "smollm2-135m", str(other), str(tmp_path), str(tmp_path / "missing.pt"), "no/such-model"):
        assert not DiTAdapter.recognises(spec), spec


def test_loading_errors_are_one_sentence(tmp_path, saved):
    with pytest.raises(CompressKitError, match="no weights were found.*DiT-XL-2-256x256.pt"):
        ADAPTER.load("dit-xl-2-256")
    pickled = tmp_path / "args.pt"
    torch.save({"model": saved[2].state_dict(), "args": nn.Linear(1, 1)}, pickled)  # a Python object: refused
    with pytest.raises(CompressKitError, match="weights_only=True"):
        ADAPTER.load(str(pickled))
    bare = tmp_path / "bare.pt"
    torch.save(saved[2].state_dict(), bare)  # hidden 64 is no published size, and no sidecar says the heads
    with pytest.raises(CompressKitError, match="heads"):
        ADAPTER.load(str(bare))
    loaded = ADAPTER.load(str(saved[0]))
    # a latent DiT (4 channels, 8 x 8) is no Fashion-MNIST model: its data and evaluation are refused in one sentence
    with pytest.raises(CompressKitError, match="Fashion-MNIST.*zero-data") as err:
        ADAPTER.calibration_batches(loaded, ADAPTER.calib_spec())
    assert "\n" not in str(err.value)
    with pytest.raises(CompressKitError, match="Fashion-MNIST"):
        ADAPTER.evaluate(loaded, ADAPTER.eval_spec())


# ---- estimates -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [CompressConfig(method="pq", bits=2), CompressConfig(method="pq", bits=1, include_embeddings=True)])
def test_estimate_equals_compress_and_the_file(saved, tmp_path, config):
    loaded = ADAPTER.load(str(saved[0]))
    with torch.device("meta"):
        skeleton = DiT(TINY)
    on_meta = estimate_model(skeleton, config, adapter=ADAPTER)
    estimate = estimate_model(loaded, config, adapter=ADAPTER)
    assert on_meta == estimate
    report = compress(loaded, config, adapter=ADAPTER)
    totals = report.to_dict()
    assert estimate["totals"]["total_bits"] == report.total.total_bits
    assert estimate["totals"]["original_fp16_bytes"] == totals["original_fp16_bytes"]
    assert estimate["kept_dense"] == report.kept_dense and estimate["notes"] == report.notes
    assert {l["name"]: l["parts_bits"] for l in estimate["layers"]} == {l.name: l.size.parts_bits for l in report.layers}
    fitted = {name: qt.quantizer for name, (_, _, qt) in quantized_tensors(loaded.model).items()}
    for layer in estimate["layers"]:  # automatic choices are reported resolved, as the fit made them
        assert (layer["params"]["d"], layer["params"]["share"]) == (fitted[layer["name"]].d_, fitted[layer["name"]].share_)
    out = compresskit.save(loaded.model, report, tmp_path / "out", source={"model": "tiny"})
    raw = (out / "model.safetensors").read_bytes()
    data_bytes = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # safetensors: 8-byte header length, header, data
    assert data_bytes == estimate["totals"]["compressed_bytes"]


def test_dit_xl_2_counted_honestly():
    paper = {"pool": True, "row_scale": False}  # DPQ's layout; the family's defaults are no pool, row scales
    result = estimate_spec("dit-xl-2-256", CompressConfig(method="pq", bits=2, params=paper))
    counted, totals = result["counted"], result["totals"]
    assert result["weights"] == "none" and result["adapter"] == "dit"
    assert counted["n_parameters"] == XL_PARAMETERS and counted["n_buffers"] == 294_912  # pos_embed
    assert abs(XL_PARAMETERS * 2 / 1e6 - 1349.4) / 1349.4 < 1e-3  # the paper's FP16 size, within 0.1%
    assert totals["n_layers_compressed"] == 28 * 5  # qkv, proj, fc1, fc2, adaLN per block
    assert round(totals["compressed_mb"], 2) == 216.14  # docs/diffusion.md explains the gap to the paper's 211.3
    one_bit = estimate_spec("dit-xl-2-256", CompressConfig(method="pq", bits=1, params={**paper, "d": 8}))  # the paper's d at 1 bit, not the family's
    assert round(one_bit["totals"]["compressed_mb"], 2) == 114.34  # the paper: 103.9
    defaults = [estimate_spec("dit-xl-2-256", CompressConfig(method="pq", bits=b))["totals"]["compressed_mb"] for b in (2, 1)]
    assert [round(mb, 2) for mb in defaults] == [213.06, 105.37]  # at 1 bit the family's d=4, k=16
    paper_shape = estimate_spec("dit-xl-2-256", CompressConfig(method="pq", bits=1, params={"d": 8}))  # k=256 comes back with d
    assert round(paper_shape["totals"]["compressed_mb"], 2) == 115.69


def test_cli_estimate_of_a_model(capsys):
    main(["estimate", "--model", "dit-xl-2-256", "--method", "pq", "--bits", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["counted"]["n_parameters"] == XL_PARAMETERS and len(result["layers"]) == 140
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", "--model", "dit-xl-2-256", "--shape", "4x4"])
    assert exit_info.value.code == 2 and "exactly one of --shape" in capsys.readouterr().err


# ---- diffusers -------------------------------------------------------------------------------------
def tiny_diffusers_dit(copies_equal: bool = True):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'compresskit[diffusion]')")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:  # as converted checkpoints: one embedder, copied into every block
            for key, tensor in block.norm1.emb.state_dict().items():
                tensor.copy_(first[key])
        if not copies_equal:
            model.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[0, 0] += 1
    return model.eval()


@pytest.mark.parametrize("copies_equal", [True, False])
def test_diffusers_dit_counts_its_copied_embedders_once(tmp_path, copies_equal):
    model = tiny_diffusers_dit(copies_equal)
    model.save_pretrained(tmp_path / "transformer")
    config = tmp_path / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "Transformer2DModel"}))  # as hub configs say
    assert DiTAdapter.recognises(str(tmp_path))  # a pipeline directory: transformer/config.json
    loaded = ADAPTER.load(str(tmp_path))
    copies = {"transformer_blocks.1.norm1.emb": "transformer_blocks.0.norm1.emb", "transformer_blocks.2.norm1.emb": "transformer_blocks.0.norm1.emb"}
    if not copies_equal:
        copies.pop("transformer_blocks.2.norm1.emb")  # a copy that differs is its own tensor
    assert loaded.extras["shared"] == copies
    emb_values = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    all_values = sum(p.numel() for p in model.parameters())
    estimate = estimate_model(loaded, CompressConfig(method="pq", bits=2), adapter=ADAPTER)
    assert estimate["counted"]["n_parameters"] == all_values - len(copies) * emb_values
    assert "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight" in estimate["counted"]["shared_counted_once"]
    kwargs = ADAPTER.example_inputs(loaded)[1]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**kwargs)[0], model(**kwargs)[0])  # tying changed nothing
    assert ADAPTER.blocks(loaded.model) == [f"transformer_blocks.{i}" for i in range(3)]
    if copies_equal:
        on_meta = estimate_spec(str(tmp_path), CompressConfig(method="pq", bits=2))
        assert on_meta["weights"] == "none" and on_meta["counted"] == estimate["counted"]


def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Original-layout DiT weights in diffusers' layout (what diffusers' conversion script does)."""
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"]}
    for p in ("weight", "bias"):
        out[f"proj_out_1.{p}"], out[f"proj_out_2.{p}"] = state[f"final_layer.adaLN_modulation.1.{p}"], state[f"final_layer.linear.{p}"]
        for i in range(depth):
            b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
            out[b + f"norm1.emb.timestep_embedder.linear_1.{p}"] = state[f"t_embedder.mlp.0.{p}"]
            out[b + f"norm1.emb.timestep_embedder.linear_2.{p}"] = state[f"t_embedder.mlp.2.{p}"]
            out[b + f"attn1.to_q.{p}"], out[b + f"attn1.to_k.{p}"], out[b + f"attn1.to_v.{p}"] = state[o + f"attn.qkv.{p}"].chunk(3)
            for mine, theirs in (("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"), ("adaLN_modulation.1", "norm1.linear")):
                out[b + f"{theirs}.{p}"] = state[o + f"{mine}.{p}"]
    for i in range(depth):
        out[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    return out


def test_our_dit_equals_diffusers_independent_implementation():
    """diffusers' DiT is a second implementation of the same network: with the same weights, the same output.

    Except one thing diffusers does differently: its timestep frequencies are ``exp(-ln(1e4) i / (half - 1))``
    (``downscale_freq_shift=1``), the original's ``/ half``; equal at t = 0, and everywhere once diffusers'
    shift is set to 0 (docs/diffusion.md)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'compresskit[diffusion]')")
    ours = tiny_dit()
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_eps=1e-6,
    ).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), TINY.depth), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        zero = torch.zeros_like(t)
        torch.testing.assert_close(ours(x, zero, y), theirs(x, timestep=zero, class_labels=y, return_dict=False)[0])
        assert not torch.allclose(ours(x, t, y), theirs(x, timestep=t, class_labels=y, return_dict=False)[0], atol=1e-3)
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        torch.testing.assert_close(ours(x, t, y), theirs(x, timestep=t, class_labels=y, return_dict=False)[0])


def test_pixart_loads_with_its_blocks_and_embeddings(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'compresskit[diffusion]')")
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=32, sample_size=8, caption_channels=12,
    )
    model.save_pretrained(tmp_path)
    loaded = ADAPTER.load(str(tmp_path))
    assert ADAPTER.blocks(loaded.model) == ["transformer_blocks.0", "transformer_blocks.1"]
    kept = ADAPTER.embeddings(loaded.model)
    assert "pos_embed.proj" in kept and "proj_out" in kept and "adaln_single.linear" not in kept  # the shared AdaLN is compressed
    with torch.no_grad():
        assert loaded.model(**ADAPTER.example_inputs(loaded)[1])[0].shape == (1, 8, 8, 8)


def test_missing_diffusers_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    assert DiTAdapter.recognises(str(tmp_path))  # recognising reads JSON only
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(CompressKitError, match=r"need the 'diffusers' package: pip install 'compresskit\[diffusion\]'"):
        ADAPTER.load(str(tmp_path))


@pytest.mark.parametrize("extra, layout", [((), (4, 16)), (("--param", "d=8"), (8, 256))])
def test_cli_one_bit_takes_the_familys_one_bit_layout_unless_the_user_sets_one(tmp_path, capsys, extra, layout):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), checkpoint)
    checkpoint.with_suffix(".json").write_text(json.dumps({"architecture": TINY.to_dict()}))
    main(["quantize", "--model", str(checkpoint), "--method", "pq", "--bits", "1", "--preset", "none", "--no-eval", *extra,
          "--out", str(tmp_path / "out"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert (result["params"].get("d"), result["params"].get("k", 256)) == layout
    assert result["params"]["pool"] is False  # the method-wide default still holds
    layers = result["report"]["layers"]
    assert layers and all((layer["params"]["d"], layer["params"]["k"]) == layout for layer in layers)
