"""Any transformers causal LM (LLaMA, Mistral, Qwen2, Phi-3, GPT-2, ...): the ``lm`` adapter.

What the family needs, and nothing the core should know: how a spec becomes files
(:mod:`.resolve`), where text comes from (:mod:`.data`), how quality is measured (:mod:`.metrics`),
which module list holds the decoder blocks, which tensors are embeddings, how a captured block call
drops its KV cache, and GPT-2's ``Conv1D`` layer, whose weight is stored ``[in, out]``.

Everything is found from the model's structure (``get_input_embeddings``, ``base_model``, module
types), never from a family's module names, so a new architecture needs no code here.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.adapters.base import Adapter, Batch, DataSpec, EvalSpec, LoadedModel, Option, register_adapter
from compresskit.adapters.lm import resolve as _resolve
from compresskit.adapters.lm.data import calib_windows, eval_windows, token_stream
from compresskit.adapters.lm.metrics import distill_loss, lm_loss, perplexity, teacher_topk
from compresskit.errors import CompressKitError
from compresskit.optional import require
from compresskit.targets import Layout

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # names across transformers versions
DISTILL_TOP_K = 64  # teacher tokens kept per position for the distillation M-step

TOKEN_EMBEDDING_REASON = (
    "the token embedding: a lookup table, not a matmul (each token reads one row), so compressing it saves "
    "memory but no compute; GPTQ- and AQLM-style results keep it dense"
)
HEAD_REASON = "the output head writes the logits, the most error-sensitive matrix; GPTQ- and AQLM-style results keep it dense"
TIED_HEAD_REASON = HEAD_REASON + "; here it is the token embedding itself (tied weights, one tensor)"
LOOKUP_REASON = "a lookup table (positions or token types), not a matmul: compressing it saves memory but no compute"


def _transformers():
    return require("transformers", "lm", "language models")


def _tokenizer(loaded: LoadedModel):
    tokenizer = loaded.extras.get("tokenizer")
    if tokenizer is None:
        raise CompressKitError(
            f"model {loaded.source!r} has no tokenizer in {loaded.resolved!r}; save one next to it "
            "(tokenizer.save_pretrained) so text can be tokenized"
        )
    return tokenizer


def _load_tokenizer(directory: Path, **kwargs):
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError):
        return None  # weights-only directory; calibration and evaluation will say so


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


@register_adapter("lm")
class CausalLMAdapter(Adapter):
    """Transformers ``AutoModelForCausalLM`` models: next-token perplexity on text, decoder blocks
    found from the base model's structure."""

    primary_metric = "perplexity"
    higher_is_better = False
    calib_options = {"seq_len": Option(512, "tokens per calibration sequence")}
    eval_options = {
        "eval_tokens": Option(8192, "tokens of evaluation text, from its head (at most 32768)"),
        "window": Option(512, "tokens per evaluation window (eval_tokens must be a multiple of it)"),
    }
    method_defaults = {
        "pq": (
            {"pool": False, "row_scale": True},
            "DPQ's shared codebook pool was sized for DiT-scale layers; on a small LM's narrower layers it "
            "merges too much and perplexity suffers at the same bits/weight, and row scales let codebooks "
            "shared by rows of unequal size fit them all (docs/LAB_LOG.md has the measurements); pass "
            "--param pool=true --param row_scale=false for the paper's layout",
        )
    }

    @classmethod
    def recognises(cls, spec: str | None) -> bool:
        """An alias, a ``.gguf`` path, a directory or cached hub id whose ``config.json`` is a causal
        LM, or ``None`` (the default model). Reads at most one JSON file; never loads weights."""
        return _resolve.recognises(spec)

    # ---- loading ----------------------------------------------------------------------------------
    def load(self, spec: str | None) -> LoadedModel:
        """The model and its tokenizer (``extras["tokenizer"]``, ``None`` when the files have none),
        float32, eval mode. A GGUF file is dequantized by transformers; its tokenizer comes from it."""
        transformers = _transformers()
        source = _resolve.DEFAULT_SPEC if spec is None else str(spec)
        found = _resolve.resolve(source)
        kwargs = {}
        if found.gguf_file is not None:
            require("gguf", "lm", "GGUF files")
            kwargs["gguf_file"] = found.gguf_file
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(found.directory), dtype=torch.float32, local_files_only=True, **kwargs
            )
        except (OSError, ValueError, KeyError) as err:
            raise CompressKitError(
                f"could not load model {source!r} from {str(found.directory)!r}: {err}; check that the files are "
                "complete (config.json and weights of a causal LM, or a .gguf of an architecture transformers reads)"
            ) from err
        # nn.Module.float, not the transformers override: a GGUF model is flagged "quantized" although
        # transformers has already dequantized every tensor, and the override refuses any cast.
        nn.Module.float(model).eval()
        resolved = found.directory / found.gguf_file if found.gguf_file else found.directory
        return LoadedModel(
            model=model, source=source, resolved=str(resolved), revision=found.revision,
            extras={"tokenizer": _load_tokenizer(found.directory, **kwargs)},
        )

    def load_empty(self, spec: str | None) -> tuple[LoadedModel, Any]:
        """The model built from its ``config.json`` with parameters on the meta device, its tokenizer,
        and its safetensors checkpoint to read blocks from (streaming; a GGUF file cannot stream)."""
        from compresskit.stream.weights import ShardedWeights, empty_parameters

        transformers = _transformers()
        source = _resolve.DEFAULT_SPEC if spec is None else str(spec)
        found = _resolve.resolve(source)
        if found.gguf_file is not None:
            raise CompressKitError(f"{source!r} is a GGUF file; streaming reads safetensors checkpoints: drop --stream / --resume to load it whole")
        weights = ShardedWeights(found.directory)
        try:
            config = transformers.AutoConfig.from_pretrained(str(found.directory), local_files_only=True)
            with empty_parameters():
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as err:
            raise CompressKitError(f"could not build model {source!r} from {str(found.directory)!r}: {err}") from err
        return LoadedModel(
            model=model.eval(), source=source, resolved=str(found.directory), revision=found.revision,
            extras={"tokenizer": _load_tokenizer(found.directory)},
        ), weights

    # ---- structure --------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[str] | None:
        """The decoder blocks: the longest ``nn.ModuleList`` under the base model (``model.layers``,
        GPT-2's ``transformer.h``) that is not inside another list (so a block's experts never win),
        preferring lists whose children share one class. ``None`` (layer by layer) when there is none."""
        base = getattr(model, "base_model", model)
        names = _module_names(model)
        found: list[tuple[bool, int, str]] = []  # (one class, length, name)

        def walk(module: nn.Module) -> None:
            for child in module.children():
                if isinstance(child, nn.ModuleList):
                    if len(child):
                        found.append((len({type(c) for c in child}) == 1, len(child), names[id(child)]))
                else:
                    walk(child)

        walk(base)
        if not found:
            return None
        best = max(found, key=lambda f: (f[0], f[1]))  # max keeps the first of equals: the shallowest
        return [f"{best[2]}.{i}" for i in range(best[1])]

    def embeddings(self, model: nn.Module) -> dict[str, str]:
        """The token embedding, the output head and any other lookup table (GPT-2's ``wpe``), by
        module name: ``get_input_embeddings()``, ``get_output_embeddings()`` and ``nn.Embedding``s."""
        token = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = head is not None and token is not None and getattr(head, "weight", None) is getattr(token, "weight", 0)
        out: dict[str, str] = {}
        for name, module in model.named_modules():
            if module is token:
                out[name] = TOKEN_EMBEDDING_REASON
            elif module is head:
                out[name] = TIED_HEAD_REASON if tied else HEAD_REASON
            elif isinstance(module, nn.Embedding):
                out[name] = LOOKUP_REASON
        return out

    def layouts(self) -> dict[type[nn.Module], tuple[str, Layout]]:
        """transformers' ``Conv1D`` (GPT-2 and kin): a linear layer whose weight is stored ``[in, out]``."""
        conv1d = require("transformers.pytorch_utils", "lm", "language models").Conv1D
        return {conv1d: ("linear", Layout(out_axis=1))}

    def clean_block_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Drop the KV cache from a captured decoder-block call and set ``use_cache=False`` where given.

        A cache captured with a block's inputs (transformers creates one unless ``use_cache=False``)
        would be appended to by every replay of the block, so each pass would attend to the keys of
        earlier passes and autograd would reach into old graphs. GPT-2 passes the cache positionally,
        so positional ``Cache`` objects become ``None`` too.
        """
        cache_type = getattr(require("transformers.cache_utils", "lm", "language models"), "Cache", ())
        args = tuple(None if isinstance(a, cache_type) else a for a in args)
        kwargs = {k: None if k in CACHE_KWARGS or isinstance(v, cache_type) else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return args, kwargs

    def example_inputs(self, loaded: LoadedModel) -> tuple[tuple, dict[str, Any]]:
        vocab = loaded.model.config.vocab_size
        input_ids = (torch.arange(16) * 7919 % vocab).unsqueeze(0)  # [1, 16] int64, deterministic, any vocab
        return (), {"input_ids": input_ids, "use_cache": False}  # a returned KV cache defeats torch.export

    # ---- data and quality -------------------------------------------------------------------------
    def calibration_batches(self, loaded: LoadedModel, data: DataSpec) -> list[Batch]:
        """``data.n_samples`` batches ``{"input_ids": LongTensor [1, seq_len], "use_cache": False}``,
        sampled (seeded) from after the text's evaluation head."""
        tokens = token_stream(_tokenizer(loaded), data.source)
        windows = calib_windows(tokens, data.n_samples, self.option(data, "seq_len"), seed=data.seed)
        return [{"input_ids": w.unsqueeze(0), "use_cache": False} for w in windows]  # w: [seq_len]

    def noise_batches(self, loaded: LoadedModel, data: DataSpec) -> list[Batch]:
        """``{"inputs_embeds": float32 [1, seq_len, hidden], "use_cache": False}``: Gaussian noise with
        the token embedding table's mean and std (zero-data calibration, VQ4DiT)."""
        emb = loaded.model.get_input_embeddings().weight.detach()  # [vocab, hidden]
        mean, std = float(emb.mean()), float(emb.std())
        seq_len = self.option(data, "seq_len")
        gen = torch.Generator().manual_seed(data.seed)
        return [
            {"inputs_embeds": torch.randn(1, seq_len, emb.shape[1], generator=gen) * std + mean, "use_cache": False}
            for _ in range(data.n_samples)
        ]

    def evaluate(self, loaded: LoadedModel, spec: EvalSpec) -> dict[str, float]:
        """Perplexity over the first ``eval_tokens`` tokens of ``spec.source`` in ``window``-token
        windows: ``{"perplexity", "nll_mean" (nats/token), "n_tokens" (predicted), "seconds"}``."""
        tokens = token_stream(_tokenizer(loaded), spec.source)
        windows = eval_windows(tokens, self.option(spec, "eval_tokens"), self.option(spec, "window"))
        return perplexity(loaded.model, windows)

    def task_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) on ``batch["input_ids"]``; differentiable."""
        return lm_loss(model, batch)

    def distill_targets(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """The teacher's top-64 next-token log-probabilities: ``{"logp": float32 [1, seq, 64], "index": int32 [1, seq, 64]}``."""
        return teacher_topk(model, batch, k=DISTILL_TOP_K)

    def distill_loss(self, model: nn.Module, batch: Batch, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(teacher || model) per token over the teacher's top-k plus one bucket for the rest."""
        return distill_loss(model, batch, targets)

    # ---- persistence ------------------------------------------------------------------------------
    def save_architecture(self, loaded: LoadedModel, directory: Path) -> None:
        """config.json (without the GGUF origin's ``quantization_config``) and the tokenizer files."""
        config = loaded.model.config.to_dict()
        config.pop("quantization_config", None)
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer = loaded.extras.get("tokenizer")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))

    def load_architecture(self, directory: Path) -> LoadedModel:
        """A randomly initialised float32 model of the saved config, with the saved tokenizer."""
        transformers = _transformers()
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise CompressKitError(f"{directory} has no config.json; the compressed model directory is incomplete")
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return LoadedModel(
            model=model.eval(), source=str(directory), resolved=str(directory),
            extras={"tokenizer": _load_tokenizer(directory)},
        )

    def export_dense(self, loaded: LoadedModel, directory: Path) -> None:
        """A plain transformers checkpoint (safetensors) of the dequantized model, plus tokenizer:
        ``AutoModelForCausalLM.from_pretrained(directory)`` reads it without compresskit."""
        from compresskit.nn import densify

        with tempfile.TemporaryDirectory() as tmp:
            self.save_architecture(loaded, Path(tmp))
            fresh = self.load_architecture(Path(tmp))
        dense = densify(copy.deepcopy(loaded.model))
        fresh.model.load_state_dict(dense.state_dict())
        fresh.model.save_pretrained(str(directory), safe_serialization=True)
        if fresh.extras.get("tokenizer") is not None:
            fresh.extras["tokenizer"].save_pretrained(str(directory))
