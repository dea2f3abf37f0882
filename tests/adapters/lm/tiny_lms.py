"""Tiny random-weight causal LMs of several architectures, saved to disk with a tiny tokenizer.

Every model has 2 decoder blocks, width 32 and a 384-token vocabulary; the tokenizer is a byte-level
BPE trained on the head of the default text, so calibration and evaluation read real token streams.
Mixed on purpose: tied and untied output heads, grouped-query attention, fused projections (Phi-3's
``qkv_proj``, GPT-2's ``c_attn``), and GPT-2's ``Conv1D`` layers stored ``[in, out]``.
"""
from __future__ import annotations

import torch

VOCAB = 384
_SHAPE = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, **_SHAPE)


def _config(arch: str):
    import transformers as t

    return {
        "llama": lambda: t.LlamaConfig(**_DECODER, tie_word_embeddings=True),
        "mistral": lambda: t.MistralConfig(**_DECODER, tie_word_embeddings=False),
        "qwen2": lambda: t.Qwen2Config(**_DECODER, tie_word_embeddings=True),
        "phi3": lambda: t.Phi3Config(**_DECODER, tie_word_embeddings=False),
        "gpt2": lambda: t.GPT2Config(n_positions=256, n_embd=32, n_layer=2, n_head=4, n_inner=64, **_SHAPE),
    }[arch]()


ARCHS = ("llama", "mistral", "qwen2", "phi3", "gpt2")
BLOCK_LIST = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "phi3": "model.layers",
              "gpt2": "transformer.h"}
TIED = {"llama": True, "mistral": False, "qwen2": True, "phi3": False, "gpt2": True}


def tiny_model(arch: str = "llama", seed: int = 0):
    """A freshly initialised tiny model of ``arch`` (float32, eval mode), the same for the same seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compresskit.adapters.lm import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([load_text()[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)
