"""The causal-LM adapter's persistence: architecture round trip, dense export readable by plain transformers."""
import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from compresskit.adapters import CausalLMAdapter  # noqa: E402

from tiny_lms import ARCHS  # noqa: E402

ADAPTER = CausalLMAdapter()
IDS = torch.tensor([[1, 5, 9, 200, 3]])


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, saved):
    return ADAPTER.load(str(saved(request.param)[0]))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_architecture_round_trip(loaded, tmp_path):
    """save_architecture + load_architecture rebuild the same model class; with the weights loaded
    it computes exactly the same logits, and the tokenizer comes back too."""
    loaded.model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF origin leaves it
    try:
        ADAPTER.save_architecture(loaded, tmp_path)
    finally:
        del loaded.model.config.quantization_config
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
    fresh = ADAPTER.load_architecture(tmp_path)
    assert type(fresh.model) is type(loaded.model) and not fresh.model.training
    assert fresh.extras["tokenizer"] is not None
    fresh.model.load_state_dict(loaded.model.state_dict())
    torch.testing.assert_close(logits(fresh.model), logits(loaded.model), rtol=0, atol=0)


def test_dense_export_is_an_ordinary_checkpoint(loaded, tmp_path):
    ADAPTER.export_dense(loaded, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert type(plain) is type(loaded.model) and (tmp_path / "tokenizer.json").is_file()
    torch.testing.assert_close(logits(plain), logits(loaded.model), rtol=1e-4, atol=1e-4)


def test_dense_export_of_a_compressed_model(saved, tmp_path):
    """The compressed model (parametrized weights) exports to plain transformers tensors that
    compute what it computes, for every architecture (GPT-2's Conv1D included)."""
    import compresskit
    from compresskit import CompressConfig

    for arch in ARCHS:
        loaded = ADAPTER.load(str(saved(arch)[0]))
        compresskit.compress(loaded.model, CompressConfig(method="pq", bits=3), adapter=ADAPTER)
        ref = logits(loaded.model)
        ADAPTER.export_dense(loaded, tmp_path / arch)
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / arch), local_files_only=True).eval()
        assert not any("parametrizations" in key for key in plain.state_dict())
        torch.testing.assert_close(logits(plain), ref, rtol=1e-4, atol=1e-4)
