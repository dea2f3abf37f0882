"""A random LLaMA saved in safetensors shards with the tiny tokenizer of the LM tests."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters" / "lm"))

from tiny_lms import VOCAB, tiny_tokenizer  # noqa: E402


def write_llama(path: Path, layers: int = 4, hidden: int = 64, intermediate: int = 128, tied: bool = False, shard: str = "60KB", seed: int = 0) -> Path:
    """A random LLaMA of that shape at ``path`` (fp32 safetensors shards of about ``shard``) with the tokenizer."""
    import torch
    import transformers as t

    torch.manual_seed(seed)
    config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)
    t.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(path)
    return path
