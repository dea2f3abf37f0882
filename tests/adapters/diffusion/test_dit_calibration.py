"""The ``dit`` adapter calibrates and evaluates: Fashion-MNIST batches that carry their noise, the DDPM
task loss, zero-data inputs, FID / IS, and the CLI from a checkpoint file to a saved, re-evaluated model.

A tiny random pixel-space DiT (1 channel, 32 x 32, patch 4, hidden 32, 2 blocks, 10 classes + null)
keeps each test to a few seconds. Tests that read Fashion-MNIST skip without its Debian package.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from compresskit import CompressConfig, compress
from compresskit.adapters import DiTAdapter
from compresskit.adapters.base import LoadedModel
from compresskit.adapters.diffusion import DiT, DiTConfig
from compresskit.adapters.diffusion import metrics
from compresskit.calib.config import CalibrationConfig
from compresskit.cli.main import main
from compresskit.errors import CompressKitError
from compresskit.io import load_compressed as compresskit_load
from compresskit.nn.quantized import quantized_tensors

FMNIST_DIT = DiTConfig(input_size=32, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
ADAPTER = DiTAdapter()
BLOCK_LAYERS = {f"blocks.{i}.{name}" for i in range(2) for name in ("adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
EVAL = {"n_samples": 20, "steps": 5, "effnet": False}  # tiny: the protocol, not a meaningful FID


def tiny_dit(seed: int = 0) -> DiT:
    """Random weights everywhere (the original init zeroes adaLN and the output, which would hide errors)."""
    torch.manual_seed(seed)
    model = DiT(FMNIST_DIT)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def loaded(seed: int = 0) -> LoadedModel:
    return LoadedModel(tiny_dit(seed), "tiny", "tiny", extras={"layout": "original"})


def ddpm_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(ADAPTER.task_loss(model, b).item() for b in batches) / len(batches)


def test_calibration_batches_carry_their_noise_which_the_model_never_sees(fmnist_dir):
    model = loaded()
    batches = ADAPTER.calibration_batches(model, ADAPTER.calib_spec(n_samples=8, seed=3))
    assert len(batches) == 8 and set(batches[0]) == {"x", "t", "y", "noise"} and ADAPTER.loss_keys == ("noise",)
    assert batches[0]["x"].shape == batches[0]["noise"].shape == (1, 1, 32, 32)
    again = ADAPTER.calibration_batches(model, ADAPTER.calib_spec(n_samples=8, seed=3))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)
    # the task loss is exactly the eps MSE against the batch's own noise (learned sigma: the first channel)
    b = batches[0]
    with torch.no_grad():
        want = torch.mean((model.model(b["x"], b["t"], b["y"])[:, :1] - b["noise"]) ** 2)
        assert ADAPTER.task_loss(model.model, b).item() == pytest.approx(want.item(), rel=1e-6)
    none_dropped = ADAPTER.calibration_batches(model, ADAPTER.calib_spec(n_samples=64, options={"class_dropout": 0.0}))
    all_dropped = ADAPTER.calibration_batches(model, ADAPTER.calib_spec(n_samples=8, options={"class_dropout": 1.0}))
    assert all(int(b["y"]) < 10 for b in none_dropped) and all(int(b["y"]) == 10 for b in all_dropped)


def test_compress_on_fashion_mnist_compresses_the_blocks_and_keeps_the_embedders_dense(fmnist_dir):
    model = loaded()
    report = compress(model, CompressConfig(method="pq", bits=2), adapter=ADAPTER, calibration=CalibrationConfig.preset("fast", n_samples=8))
    assert set(quantized_tensors(model.model)) == BLOCK_LAYERS
    assert {layer.name for layer in report.layers} == BLOCK_LAYERS
    for dense in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.adaLN_modulation.1", "final_layer.linear"):
        assert dense in report.kept_dense
    assert report.calibration["data"] == "data" and report.calibration["n_samples"] == 8


def test_a_task_loss_em_round_lowers_the_ddpm_loss_of_the_walk(fmnist_dir):
    batches = ADAPTER.calibration_batches(loaded(), ADAPTER.calib_spec(n_samples=8))  # what both runs calibrate on
    walk_only, with_round = loaded(), loaded()
    compress(walk_only, CompressConfig(method="pq", bits=2), adapter=ADAPTER, calibration=CalibrationConfig.preset("fast", n_samples=8))
    compress(
        with_round, CompressConfig(method="pq", bits=2), adapter=ADAPTER,
        calibration=CalibrationConfig(m_objective="task", em_rounds=1, m_steps=3, n_samples=8),
    )
    walk, em = ddpm_loss(walk_only.model, batches), ddpm_loss(with_round.model, batches)
    assert em <= walk  # the same walk, then codebooks trained on exactly this loss
    assert em != walk  # the round changed something (it is not skipped)


def test_distillation_trains_towards_the_uncompressed_models_epsilon(fmnist_dir):
    teacher = loaded()
    batches = ADAPTER.calibration_batches(teacher, ADAPTER.calib_spec(n_samples=8))
    b = batches[0]
    with torch.no_grad():
        target = ADAPTER.distill_targets(teacher.model, b)
        assert target.shape == b["noise"].shape  # the epsilon channels only (this DiT learns sigma too)
        assert torch.equal(target, teacher.model(b["x"], b["t"], b["y"])[:, :1])
        assert ADAPTER.distill_loss(teacher.model, b, target).item() == 0.0
    assert ADAPTER.supports("distill_loss")

    def distance(model) -> float:
        with torch.no_grad():
            return sum(ADAPTER.distill_loss(model, b, ADAPTER.distill_targets(teacher.model, b)).item() for b in batches) / len(batches)

    walk_only, with_round = loaded(), loaded()
    compress(walk_only, CompressConfig(method="pq", bits=2), adapter=ADAPTER, calibration=CalibrationConfig.preset("fast", n_samples=8))
    compress(
        with_round, CompressConfig(method="pq", bits=2), adapter=ADAPTER,
        calibration=CalibrationConfig(m_objective="distill", em_rounds=1, m_steps=3, n_samples=8),
    )
    walk, em = distance(walk_only.model), distance(with_round.model)
    assert 0 < em < walk  # the round moved the compressed model towards the teacher, on the batches it trained on


def test_zero_data_calibration_needs_no_dataset():
    model = loaded()
    noise = ADAPTER.noise_batches(model, ADAPTER.calib_spec(n_samples=4, seed=1))
    assert set(noise[0]) == {"x", "t", "y"} and noise[0]["x"].shape == (1, 1, 32, 32)
    compress(model, CompressConfig(method="pq", bits=2), adapter=ADAPTER, calibration=CalibrationConfig.preset("zero-data", n_samples=8))
    assert set(quantized_tensors(model.model)) == BLOCK_LAYERS


def test_evaluate_is_seeded_and_reports_fid_is_and_effnet(fmnist_dir):
    model = loaded()
    result = ADAPTER.evaluate(model, ADAPTER.eval_spec(options=EVAL))
    assert ADAPTER.primary_metric == "fid" and ADAPTER.higher_is_better is False
    assert result["fid"] > 0 and 1 <= result["is"] <= 10 and result["steps"] == 5 and result["n_samples"] == 20
    assert result == ADAPTER.evaluate(model, ADAPTER.eval_spec(options=EVAL))
    assert result["fid"] != ADAPTER.evaluate(model, ADAPTER.eval_spec(seed=1, options=EVAL))["fid"]
    assert "effnet=False" in result["fid_effnet_skipped"]
    with_effnet = ADAPTER.evaluate(model, ADAPTER.eval_spec(options={**EVAL, "effnet": True}))
    assert with_effnet["fid"] == result["fid"]
    reason = metrics.effnet_missing()
    assert (with_effnet["fid_effnet"] > 0) if reason is None else with_effnet["fid_effnet_skipped"] == reason
    assert ADAPTER.eval_spec(options={"cfg_scale": 2}).options["cfg_scale"] == 2.0  # an int is a float value
    with pytest.raises(CompressKitError, match="cfg_scale.*float"):
        ADAPTER.eval_spec(options={"cfg_scale": "strong"})


def test_architecture_round_trips_through_save_and_load(tmp_path):
    model = loaded()
    ADAPTER.save_architecture(model, tmp_path)
    rebuilt = ADAPTER.load_architecture(tmp_path)
    assert isinstance(rebuilt.model, DiT) and rebuilt.model.config == FMNIST_DIT
    assert set(rebuilt.model.state_dict()) == set(model.model.state_dict())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressKitError, match="incomplete"):
        ADAPTER.load_architecture(tmp_path / "empty")


def test_a_diffusers_dit_rebuilds_with_its_tied_embedders(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'compresskit[diffusion]')")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()
    with torch.no_grad():
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        model.transformer_blocks[1].norm1.emb.load_state_dict(first)  # block 1 a copy of block 0's embedder, block 2 its own
    (tmp_path / "m").mkdir()
    model.save_pretrained(tmp_path / "m")
    original = ADAPTER.load(str(tmp_path / "m"))
    ADAPTER.save_architecture(original, tmp_path)
    rebuilt = ADAPTER.load_architecture(tmp_path)
    assert type(rebuilt.model) is type(model) and rebuilt.extras["shared"] == original.extras["shared"]
    blocks = rebuilt.model.transformer_blocks
    assert blocks[1].norm1.emb is blocks[0].norm1.emb and blocks[2].norm1.emb is not blocks[0].norm1.emb
    rebuilt.model.load_state_dict(original.model.state_dict())
    kwargs = ADAPTER.example_inputs(original)[1]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.model(**kwargs)[0], original.model(**kwargs)[0])
    with pytest.raises(CompressKitError, match="original layout"):
        ADAPTER.evaluate(original, ADAPTER.eval_spec())


def test_cli_quantize_then_eval_gives_the_same_fid(fmnist_dir, tmp_path, capsys):
    weights = tmp_path / "tiny-dit.safetensors"
    save_file(tiny_dit().state_dict(), str(weights))
    weights.with_suffix(".json").write_text(json.dumps({"architecture": FMNIST_DIT.to_dict()}))  # the heads: no shape says them
    out = tmp_path / "out"
    options = [a for k, v in EVAL.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    main(["quantize", "--model", str(weights), "--method", "pq", "--bits", "2", "--calib-samples", "8", *options, "--out", str(out), "--json"])
    quantized = json.loads(capsys.readouterr().out)
    report = quantized["report"]
    after = report["metrics"]["after"]
    assert report["n_layers_compressed"] == len(BLOCK_LAYERS) and report["calibration"]["n_samples"] == 8
    assert after["fid"] > 0 and report["metrics"]["before"]["fid"] != after["fid"]
    main(["eval", str(out), "--json", *options])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["adapter"] == "dit" and evaluated["primary_metric"] == "fid"
    assert evaluated["metrics"]["fid"] == after["fid"]  # the saved model samples exactly as the in-memory one


def test_vs_source_measures_the_distance_to_the_uncompressed_models_images(fmnist_dir, tmp_path, capsys):
    weights = tmp_path / "tiny-dit.safetensors"
    save_file(tiny_dit().state_dict(), str(weights))
    weights.with_suffix(".json").write_text(json.dumps({"architecture": FMNIST_DIT.to_dict()}))
    out = tmp_path / "out"
    main(["quantize", "--model", str(weights), "--method", "rtn", "--bits", "2", "--preset", "none", "--no-eval", "--out", str(out)])
    capsys.readouterr()
    options = [a for k, v in {**EVAL, "vs_source": True}.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    main(["eval", str(out), "--json", *options])
    result = json.loads(capsys.readouterr().out)["metrics"]
    compressed = ADAPTER.fmnist_denoiser(compresskit_load(out)[0], "test")
    draw = dict(steps=EVAL["steps"], variance=ADAPTER.sampling_variance(compressed))
    mine = metrics.draw_samples(compressed, EVAL["n_samples"], seed=0, **draw)
    theirs = metrics.draw_samples(tiny_dit(), EVAL["n_samples"], seed=metrics.SOURCE_SEED_OFFSET, **draw)  # the source, other seeds
    features = [metrics.classifier_outputs(images)[0] for images in (mine, theirs)]
    assert result["fid_source"] == pytest.approx(metrics.fid_from_features(*features))
    assert "fid_effnet_source" not in result  # effnet=False skips both effnet distances
    floor = ADAPTER.evaluate(ADAPTER.load(str(weights)), ADAPTER.eval_spec(options={**EVAL, "vs_source": True}))
    assert 0 < floor["fid_source"] != result["fid_source"]  # two draws of one model are apart: the sampling floor
    assert "fid_source" not in ADAPTER.evaluate(loaded(), ADAPTER.eval_spec(options=EVAL))  # only on request
    weights.unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(out), *options])
    assert exit_.value.code != 0 and "tiny-dit.safetensors" in capsys.readouterr().err
