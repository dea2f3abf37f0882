"""Write a LLaMA-2-7B-shaped checkpoint with random weights: the streaming benchmark's model.

No 7B model can be downloaded here, and the streaming code only needs the real shapes: the
LLaMA-2-7B config (hidden 4096, MLP 11008, 32 blocks, 32 heads, vocabulary 32000) with
Gaussian weights (std 0.02; norms 1) written as float16 safetensors shards of about
``--shard-gb`` each, with the ``model.safetensors.index.json`` transformers writes, and a byte-level
BPE tokenizer trained on the default calibration text (vocabulary up to 32000).

The tensors are made one at a time (seeded by their index) and a shard is flushed when full, so
writing the 13.5 GB checkpoint never holds more than one shard. Smaller shapes for tests:
``--layers 2 --hidden 64 --intermediate 128 --heads 4 --vocab 384``.

    python bench/make_7b_shaped.py --out /tmp/llama2-7b-shaped
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, vocab: int):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )


def tokenizer(vocab: int):
    """A byte-level BPE trained on the default text (the LM adapter's calibration source)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compresskit.adapters.lm import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([load_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def write_checkpoint(out: Path, config, shard_bytes: int, seed: int = 0) -> dict[str, int]:
    """Random float16 tensors for every state_dict key of ``config``'s model, in shards; returns
    ``{"tensors", "bytes", "shards"}``."""
    import transformers

    from compresskit.stream import empty_parameters

    with empty_parameters():
        shapes = {k: tuple(v.shape) for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    names: list[str] = []
    weight_map: dict[str, str] = {}
    total, held = 0, 0

    def flush() -> None:
        nonlocal held
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shards[-1]})
        names.append(name)
        shards[-1], held = {}, 0

    for i, (key, shape) in enumerate(shapes.items()):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.float16)
        else:
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        nbytes = tensor.numel() * 2
        if held and held + nbytes > shard_bytes:
            flush()
        shards[-1][key] = tensor
        held += nbytes
        total += nbytes
    if shards[-1]:
        flush()
    # transformers' names: model-0000k-of-0000n
    final = {n: f"model-{k + 1:05d}-of-{len(names):05d}.safetensors" for k, n in enumerate(names)}
    for old, new in final.items():
        (out / old).rename(out / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(str(out))
    return {"tensors": len(shapes), "bytes": total, "shards": len(names)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write (must not exist)")
    for name, default in LLAMA2_7B.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"error: {out} exists; choose another --out")
    start = time.perf_counter()
    config = llama_config(args.hidden, args.intermediate, args.layers, args.heads, args.vocab)
    written = write_checkpoint(out, config, int(args.shard_gb * 2**30), args.seed)
    tokenizer(args.vocab).save_pretrained(str(out))
    print(json.dumps({"out": str(out), **written, "gb": round(written["bytes"] / 1e9, 2), "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
