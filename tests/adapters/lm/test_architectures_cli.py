"""Every tested architecture through the CLI, end to end: quantize (the adapter picked by
``recognises``, no ``--adapter``), save, ``compresskit.load``, ``eval``; GPT-2's Conv1D compressed;
layers keep their class; greedy generation identical before and after the round trip; ``--embeddings``
compresses a tied embedding once.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import compresskit  # noqa: E402
from compresskit.adapters import CausalLMAdapter  # noqa: E402
from compresskit.cli.main import main  # noqa: E402

from tiny_lms import ARCHS, TIED  # noqa: E402

EVAL = ["--option", "eval_tokens=64", "--option", "window=32"]
PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3]])  # [1, 6] token ids, any vocabulary above 100


def cli(*argv: str) -> int:
    """Run the CLI in this process; its exit status (0 when it returns normally)."""
    try:
        main(list(argv))
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def greedy(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of :data:`PROMPT`: the 5 new tokens ``[5]`` and their logits ``[5, vocab]``
    (random tiny models repeat tokens a lot, so the logits are what tells two models apart)."""
    with torch.no_grad():
        out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, PROMPT.shape[1]:], torch.cat(out.logits)


def assert_same_generation(got, expected):
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def manifest_layers(out) -> dict:
    return json.loads((out / "manifest.json").read_text())["layers"]


def stored_keys(out) -> list[str]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def quantize(saved, tmp_path_factory):
    """``quantize(arch, *extra) -> (OUT, in-memory record)``: one CLI run per argument list. The record
    holds what the compressed model did in memory, seen from inside the save (``save_architecture``
    receives it): its greedy generation and its perplexity."""
    runs: dict[tuple, tuple] = {}

    def run(arch: str, *extra: str):
        key = (arch, *extra)
        if key in runs:
            return runs[key]
        out = tmp_path_factory.mktemp(f"cli-{arch}") / "out"
        record: dict = {}
        original = CausalLMAdapter.save_architecture

        def spy(self, loaded, directory):
            record["generation"] = greedy(loaded.model)
            record["perplexity"] = self.evaluate(loaded, self.eval_spec(options={"eval_tokens": 64, "window": 32}))["perplexity"]
            return original(self, loaded, directory)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(CausalLMAdapter, "save_architecture", spy)
            code = cli("quantize", "--model", str(saved(arch)[0]), "--method", "pq", "--bits", "3", "--calib-samples", "2",
                       "--option", "seq_len=16", *EVAL, "--out", str(out), *extra)
        assert code == 0, f"quantize {arch} exited {code}"
        assert "generation" in record, "the compressed model was saved without its architecture"
        runs[key] = (out, record)
        return runs[key]

    return run


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_save_load_eval(arch, quantize, saved, capsys):
    out, record = quantize(arch)
    capsys.readouterr()
    assert cli("eval", str(out), "--json", *EVAL) == 0
    after = json.loads(capsys.readouterr().out)["metrics"]["perplexity"]
    assert math.isfinite(after) and after == pytest.approx(record["perplexity"], rel=1e-5)

    original = saved(arch)[1]
    model = compresskit.load(out)
    assert type(model) is type(original)
    layers = manifest_layers(out)
    assert layers and "lm_head" not in layers  # embeddings and head stay dense without --embeddings
    for name in layers:
        kind = type(original.get_submodule(name))
        assert kind in (nn.Linear, Conv1D), name
        module = model.get_submodule(name)
        assert isinstance(module, kind) and parametrize.is_parametrized(module, "weight")  # the owner keeps its class
        assert parametrize.is_parametrized(module, "weight")
    block_layers = {n for n, m in original.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and ".0." in n}
    assert block_layers <= set(layers)  # every layer of the first block was compressed
    if arch == "gpt2":
        assert "transformer.h.0.attn.c_attn" in layers and "transformer.h.0.mlp.c_proj" in layers


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_the_same_after_save_and_load(arch, quantize):
    out, record = quantize(arch)
    assert_same_generation(greedy(compresskit.load(out)), record["generation"])


@pytest.mark.parametrize("arch", [a for a in ARCHS if TIED[a]][:2])
def test_embeddings_flag_compresses_the_tied_embedding_once(arch, quantize):
    dense_out, _ = quantize(arch)
    out, record = quantize(arch, "--embeddings")
    model = compresskit.load(out)
    token = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    layers = manifest_layers(out)
    assert token in layers or "lm_head" in layers
    keys = stored_keys(out)
    holders = [name for name in (token, "lm_head") if any(k.startswith(f"{name}.") for k in keys)]
    assert len(holders) == 1, holders  # one tensor, stored once
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    assert (out / "model.safetensors").stat().st_size < (dense_out / "model.safetensors").stat().st_size
    assert_same_generation(greedy(model), record["generation"])
