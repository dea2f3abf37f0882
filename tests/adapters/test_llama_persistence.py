"""The LLaMA adapter's persistence: architecture round trip, dense export readable by plain transformers."""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import compresskit
from compresskit import CompressConfig
from compresskit.adapters import LlamaAdapter, LoadedModel
from compresskit.io import load_compressed


def tiny_loaded():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model=model, source="tiny", resolved="tiny", extras={"tokenizer": None})


def test_save_reload_and_dense_export(tmp_path):
    adapter = LlamaAdapter()
    loaded = tiny_loaded()
    args, kwargs = adapter.example_inputs(loaded)
    report = compresskit.compress(loaded.model, CompressConfig(method="pq", bits=3), example_args=args,
                                  example_kwargs=kwargs, keep_dense=[p for p, _ in adapter.keep_dense])
    assert report.graph_method == "export"
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        ref = loaded.model(ids).logits
    out = tmp_path / "m"
    compresskit.save(loaded.model, report, out, source={"model": "tiny", "adapter": "llama"},
                     save_architecture=lambda d: adapter.save_architecture(loaded, d),
                     export_dense=lambda d: adapter.export_dense(loaded, d))
    # compressed directory -> the same model, rebuilt from the saved config
    again, _ = load_compressed(out)
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, ref, rtol=0, atol=0)
    # the dense export is an ordinary checkpoint: plain transformers loads it and computes the same
    plain = AutoModelForCausalLM.from_pretrained(str(out / "dense"), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_noise_batches_match_the_embedding_statistics():
    loaded = tiny_loaded()
    batches = LlamaAdapter().noise_batches(loaded, n_samples=3, seq_len=16, seed=0)
    assert len(batches) == 3 and batches[0]["inputs_embeds"].shape == (1, 16, 64)
    emb = loaded.model.get_input_embeddings().weight.detach()
    x = torch.cat([b["inputs_embeds"] for b in batches])
    assert abs(float(x.std()) - float(emb.std())) < 0.2 * float(emb.std())
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batches[0]).logits).all()
