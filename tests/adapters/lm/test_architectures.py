"""The causal-LM adapter on every tested architecture (LLaMA, Mistral, Qwen2, Phi-3, GPT-2): nothing
in it may depend on one family's module names."""
import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from compresskit.adapters import CausalLMAdapter, adapter_for  # noqa: E402
from compresskit.targets import Layout  # noqa: E402

from tiny_lms import ARCHS, BLOCK_LIST, TIED, VOCAB  # noqa: E402

ADAPTER = CausalLMAdapter()


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def loaded(arch, saved):
    return ADAPTER.load(str(saved(arch)[0]))


def layer_modules(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


# ---- recognising and loading ------------------------------------------------------------------------
def test_recognises_the_saved_directory_without_loading_it(arch, saved):
    path = saved(arch)[0]
    assert CausalLMAdapter.recognises(str(path))
    assert adapter_for(str(path)) is CausalLMAdapter


def test_recognises_only_causal_lms(tmp_path):
    assert CausalLMAdapter.recognises(None)  # the default model
    assert CausalLMAdapter.recognises(str(tmp_path / "model.Q4_K_M.gguf"))
    for name, config in {
        "gpt2-style": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},  # known by model_type only
        "named": {"model_type": "my-own-lm", "architectures": ["MyOwnForCausalLM"]},  # known by architecture only
        "seq2seq": {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
        "vision": {"model_type": "vit", "architectures": ["ViTForImageClassification"]},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        assert CausalLMAdapter.recognises(str(tmp_path / name)) is (name in ("gpt2-style", "named")), name
    (tmp_path / "scene.ply").write_bytes(b"ply\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for spec in ("scene.ply", "empty", "broken", "nothing-here", "no/such/deep/path"):
        assert not CausalLMAdapter.recognises(str(tmp_path / spec)), spec
    assert not CausalLMAdapter.recognises("someorg/not-in-the-cache")


def test_load_gives_the_saved_model(arch, saved, loaded):
    original = saved(arch)[1]
    assert type(loaded.model) is type(original) and not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, rtol=0, atol=0)


# ---- structure ----------------------------------------------------------------------------------------
def test_blocks_are_found_from_the_structure(arch, loaded):
    blocks = ADAPTER.blocks(loaded.model)
    assert blocks == [f"{BLOCK_LIST[arch]}.0", f"{BLOCK_LIST[arch]}.1"]
    modules = [loaded.model.get_submodule(b) for b in blocks]
    assert len({type(m) for m in modules}) == 1 and all(layer_modules(m) for m in modules)


def test_blocks_skip_lists_inside_blocks_and_may_be_none():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))  # longer than the block list

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.stack = nn.ModuleList(Block() for _ in range(3))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Base()
            self.head = nn.Linear(4, 10)

        @property
        def base_model(self):
            return self.decoder

    assert ADAPTER.blocks(Wrapper()) == ["decoder.stack.0", "decoder.stack.1", "decoder.stack.2"]
    assert ADAPTER.blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) is None


def test_embeddings_are_the_lookup_tables_and_the_head(arch, loaded):
    got = ADAPTER.embeddings(loaded.model)
    names = {n for n, m in loaded.model.named_modules()}
    token = next(n for n, m in loaded.model.named_modules() if m is loaded.model.get_input_embeddings())
    expected = {token, "lm_head"} | ({"transformer.wpe"} if arch == "gpt2" else set())
    assert set(got) == expected and expected <= names
    assert ("tied" in got["lm_head"]) is TIED[arch]
    assert all(reason and "\n" not in reason for reason in got.values())


def test_conv1d_layout_reads_the_weight_as_out_rows(arch, loaded):
    (kind, layout), = ADAPTER.layouts().values()
    assert ADAPTER.layouts() == {Conv1D: ("linear", Layout(out_axis=1))} and kind == "linear"
    conv = [m for m in loaded.model.modules() if isinstance(m, Conv1D)]
    assert bool(conv) is (arch == "gpt2")
    for m in conv:  # Conv1D computes x @ W + b with W stored [in, out]
        x = torch.randn(3, m.weight.shape[0])  # [batch, in]
        rows = layout.to_rows(m.weight)  # [out, in], as nn.Linear stores it
        assert rows.shape == (m.nf, m.weight.shape[0])
        torch.testing.assert_close(m(x), nn.functional.linear(x, rows, m.bias))
        assert torch.equal(layout.from_rows(rows), m.weight)


# ---- calibration, loss, evaluation ----------------------------------------------------------------
def test_calibration_batches(loaded):
    spec = ADAPTER.calib_spec(n_samples=2, seed=3, options={"seq_len": 16})
    batches = ADAPTER.calibration_batches(loaded, spec)
    assert len(batches) == 2
    for batch in batches:
        assert set(batch) == {"input_ids", "use_cache"} and batch["use_cache"] is False
        assert batch["input_ids"].shape == (1, 16) and batch["input_ids"].dtype == torch.long
        assert int(batch["input_ids"].max()) < VOCAB
        with torch.no_grad():
            assert torch.isfinite(loaded.model(**batch).logits).all()


def test_evaluate(loaded):
    result = ADAPTER.evaluate(loaded, ADAPTER.eval_spec(options={"eval_tokens": 64, "window": 32}))
    assert set(result) == {"perplexity", "nll_mean", "n_tokens", "seconds"}
    assert result["n_tokens"] == 2 * 31 and result["perplexity"] == pytest.approx(math.exp(result["nll_mean"]))
    assert 0.3 * VOCAB < result["perplexity"] < 3 * VOCAB  # random weights: near uniform
    again = ADAPTER.evaluate(loaded, ADAPTER.eval_spec(options={"eval_tokens": 64, "window": 32}))
    assert again["perplexity"] == result["perplexity"]


def test_task_loss_reaches_every_layer_of_a_block(loaded):
    batch = ADAPTER.calibration_batches(loaded, ADAPTER.calib_spec(n_samples=1, options={"seq_len": 16}))[0]
    loss = ADAPTER.task_loss(loaded.model, batch)
    loss.backward()
    try:
        assert loss.ndim == 0 and torch.isfinite(loss)
        block = loaded.model.get_submodule(ADAPTER.blocks(loaded.model)[0])
        for name, m in layer_modules(block).items():
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name
    finally:
        loaded.model.zero_grad(set_to_none=True)


# ---- captured block calls -----------------------------------------------------------------------------
def test_clean_block_call_on_plain_arguments():
    args, kwargs = ADAPTER.clean_block_call(
        ("hidden", "cache-object"),
        {"past_key_values": 1, "past_key_value": 2, "layer_past": 3, "cache": 4, "use_cache": True, "mask": "m"},
    )
    assert args == ("hidden", "cache-object")  # only real Cache objects are recognised positionally
    assert kwargs == {"past_key_values": None, "past_key_value": None, "layer_past": None, "cache": None,
                      "use_cache": False, "mask": "m"}
    assert ADAPTER.clean_block_call((), {"mask": "m"}) == ((), {"mask": "m"})  # no use_cache added


def test_clean_block_call_drops_the_kv_cache_so_replays_agree(loaded):
    """transformers creates a KV cache unless told not to (GPT-2 passes it positionally); captured
    with the block's inputs, it made every later run of the block attend to earlier runs' keys."""
    from transformers.cache_utils import Cache

    block = loaded.model.get_submodule(ADAPTER.blocks(loaded.model)[0])
    calls = []

    def capture(_module, args, kwargs):
        calls.append((args, kwargs))

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.arange(16).unsqueeze(0), use_cache=True)
    finally:
        handle.remove()
    (args, kwargs), = calls
    assert any(isinstance(v, Cache) for v in (*args, *kwargs.values()))  # there was a cache to drop
    args, kwargs = ADAPTER.clean_block_call(args, kwargs)
    assert not any(isinstance(v, Cache) for v in (*args, *kwargs.values()))
    assert kwargs.get("use_cache", False) is False

    def run():
        with torch.no_grad():
            out = block(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    first = run()
    assert torch.equal(first, run()) and first.shape == (1, 16, 32)
