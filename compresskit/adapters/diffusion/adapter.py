"""Diffusion transformers (DiT, PixArt): the ``dit`` adapter — loading, structure, architecture-only models.

Model specs, all read from this machine only:

* ``fmnist-dit``: the project's reference model (:mod:`.reference`), trained on Fashion-MNIST;
* an alias, one JSON file of ``configs/`` (``dit-xl-2-256``: the layout of ``facebook/DiT-XL-2-256``);
  its weights come from the hub cache when that model is there (diffusers' layout); without weights
  it still builds the architecture, which is all ``compresskit estimate`` needs;
* a ``.pt`` (read with ``torch.load(weights_only=True)``) or ``.safetensors`` file of the original
  layout (:mod:`.dit`), e.g. ``DiT-XL-2-256x256.pt``; an optional ``<same name>.json`` config beside
  it says what the shapes cannot (the number of heads of an unpublished size);
* a diffusers directory — a model (``config.json``) or a pipeline (``transformer/config.json``) — of
  ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel`` (hub configs say ``Transformer2DModel``
  and diffusers picks the class by ``norm_type``; so do we), or the hub id of one in the local cache.

diffusers' DiT gives every block its own copy of the timestep and class embedders (converted
checkpoints hold 28 identical copies; the final layer reads block 0's). Loading ties the copies that
are equal, value for value, to block 0's module, so they are one tensor: stored once, counted once,
compressed once; the forward pass is unchanged. :attr:`LoadedModel.extras` ``["shared"]`` says which.

Calibration and evaluation (original layout; Fashion-MNIST DiTs: 1 channel, 32 x 32, 10 classes):
calibration batches are noised Fashion-MNIST training images that carry their noise
(``{"x": x_t, "t", "y", "noise"}``; ``noise`` is a :attr:`loss_keys` entry, never passed to the
model), the task loss is the DDPM loss on them, zero-data calibration draws Gaussian inputs
(VQ4DiT), and evaluation samples images and scores ``fid`` / ``is`` / ``fid_effnet``
(:mod:`.metrics`). See ``docs/diffusion.md``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.adapters.base import LoadedModel, register_adapter
from compresskit.adapters.diffusion import data as fmnist
from compresskit.adapters.diffusion.dit import DiT, DiTConfig, config_from_shapes, looks_like_dit, shipped_configs
from compresskit.adapters.diffusion.export import save_diffusers, save_original_dit
from compresskit.adapters.diffusion.family import DiffusionAdapter
from compresskit.adapters.diffusion.reference import is_reference, reference_files
from compresskit.errors import CompressKitError
from compresskit.optional import require
from compresskit.targets import module_layout

DEFAULT_SPEC = "dit-xl-2-256"
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
BY_NORM_TYPE = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}  # as diffusers remaps Transformer2DModel
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")

PATCH_REASON = "the patch embedding: one small convolution every token passes through; DPQ compresses only the AdaLN, attention and MLP weights"
TIME_REASON = "the timestep embedder: a small MLP run once per step, outside the blocks DPQ compresses"
LABEL_REASON = "a lookup table (class labels or captions in), not a block weight: each sample reads one row; DPQ keeps it dense"
CAPTION_REASON = "the caption projection: the text conditioning's way in, outside the blocks DPQ compresses"
FINAL_REASON = "the final layer writes the predicted noise and variance, the most error-sensitive output; DPQ compresses only the blocks"


def _diffusers():
    return require("diffusers", "diffusion", "diffusion models")


# ---- specs -> files ------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def diffusers_class(config: dict) -> str | None:
    """The diffusers class a ``config.json`` describes, if it is a DiT or PixArt transformer."""
    name = config.get("_class_name")
    if name == "Transformer2DModel":
        name = BY_NORM_TYPE.get(config.get("norm_type"))
    return name if name in DIFFUSERS_CLASSES else None


def diffusers_dir(path: Path) -> tuple[Path, str] | None:
    """``(model directory, class name)`` of a diffusers DiT/PixArt model or pipeline directory, else None."""
    for folder in (path, path / "transformer"):
        config = _read_json(folder / "config.json")
        if config is not None and diffusers_class(config):
            return folder, diffusers_class(config)
    return None


def cached_snapshot(repo_id: str) -> Path | None:
    """The local hub-cache snapshot of ``repo_id``, or None; never reaches the network."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # the LM family names the extra that brings it; a DiT hub id then is simply not found
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # not cached; not a valid id
        return None


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict: the EMA weights of a training checkpoint (as DiT samples with), else the model's."""
    if isinstance(state, dict):
        for key in ("ema", "model", "state_dict"):
            if isinstance(state.get(key), dict):
                return state[key]
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
    raise CompressKitError(f"{path} holds no state dict of tensors; save one with torch.save(model.state_dict(), path)")


def read_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``.pt`` file (``device="meta"``: shapes only, nothing read)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if device == "meta":
                return {k: torch.empty(f.get_slice(k).get_shape(), dtype=_st_dtype(f.get_slice(k).get_dtype()), device="meta") for k in f.keys()}
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        state = torch.load(str(path), map_location=device, weights_only=True, mmap=device == "meta")
    except Exception as err:  # pickle.UnpicklingError for Python objects; RuntimeError for a bad file
        raise CompressKitError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(err).__name__}); a training checkpoint "
            "holding Python objects must be reduced to its tensors first: torch.save(ckpt['ema'], 'ema.pt')"
        ) from None
    return _unwrap(state, path)


def _st_dtype(name: str) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}.get(name, torch.float32)


def _file_config(path: Path, shapes: dict[str, torch.Tensor]) -> DiTConfig:
    """The config of an original-layout file: its ``.json`` sidecar, else read from the shapes."""
    if not looks_like_dit(shapes):
        hint = " (keys of diffusers' layout: pass the directory with its config.json)" if any(k.startswith("transformer_blocks.") for k in shapes) else ""
        raise CompressKitError(f"{path} does not hold a DiT of the original layout{hint}; pass a DiT checkpoint such as DiT-XL-2-256x256.pt")
    sidecar = _read_json(path.with_suffix(".json"))
    if sidecar is not None:  # a DiTConfig, {"architecture": DiTConfig}, or the training script's {"architecture": "dit", "model": DiTConfig}
        config = sidecar.get("architecture", sidecar)
        return DiTConfig.from_dict(sidecar.get("model") if config == "dit" else config)
    return config_from_shapes({k: tuple(v.shape) for k, v in shapes.items()})


# ---- diffusers' duplicated embedders -------------------------------------------------------------
def _same_values(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def tie_copied_embedders(model: nn.Module, verify: bool = True) -> dict[str, str]:
    """Make each block's copy of the timestep/class embedder (``transformer_blocks.N.norm1.emb``) block
    0's module when their values are equal (``verify``) or unconditionally (a model without weights,
    where only the declaration can be had). Returns ``{copy: "transformer_blocks.0.norm1.emb"}``."""
    blocks = getattr(model, "transformer_blocks", None)
    first = getattr(getattr(blocks[0], "norm1", None), "emb", None) if blocks else None
    if not isinstance(first, nn.Module):
        return {}
    tied = {}
    for i, block in enumerate(blocks):
        emb = getattr(block.norm1, "emb", None)
        if i == 0 or emb is first or not isinstance(emb, nn.Module) or (verify and not _same_values(first, emb)):
            continue
        block.norm1.emb = first
        tied[f"transformer_blocks.{i}.norm1.emb"] = "transformer_blocks.0.norm1.emb"
    return tied


def _named(model: nn.Module, parts: list[tuple[nn.Module | None, str]]) -> dict[str, str]:
    """``{layer name: reason}`` for every compressible layer inside the given submodules."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for part, reason in parts:
        if part is None:
            continue
        for module in part.modules():
            if module_layout(module) is not None and id(module) in names:
                out[names[id(module)]] = reason
    return out


# ---- the adapter ---------------------------------------------------------------------------------
@register_adapter("dit")
class DiTAdapter(DiffusionAdapter):
    """Class-conditional DiTs (original layout or diffusers) and PixArt; see the module docstring."""

    @classmethod
    def recognises(cls, spec: str | None) -> bool:
        """An alias, an original-layout weights file, a diffusers DiT/PixArt directory or cached hub id.
        Reads a JSON file or a checkpoint's key list, never its weights; ``None`` is the LM family's."""
        if spec is None:
            return False
        spec = str(spec)
        if spec.lower() in shipped_configs() or is_reference(spec, "dit"):
            return True
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
            try:
                return looks_like_dit(read_weights(path, device="meta"))
            except CompressKitError:
                return False
        if path.is_dir():
            return diffusers_dir(path) is not None
        snapshot = None if path.exists() else cached_snapshot(spec)
        return snapshot is not None and diffusers_dir(snapshot) is not None

    # ---- loading ----------------------------------------------------------------------------------
    def _build(self, spec: str | None, meta: bool) -> LoadedModel:
        """The model (default ``dit-xl-2-256``); for diffusers' DiT, equal embedder copies tied
        (``extras["shared"]``). On the meta device the copies cannot be compared; they are tied as
        declared (converted DiT checkpoints hold equal copies)."""
        spec = DEFAULT_SPEC if spec is None else str(spec)
        if is_reference(spec, "dit"):
            weights, _ = reference_files(spec)
            return self._file(spec, weights, meta)
        aliases = shipped_configs()
        if spec.lower() in aliases:
            entry = aliases[spec.lower()]
            hub_id = entry.get("hub_id")
            snapshot = cached_snapshot(hub_id) if hub_id and not meta else None
            if snapshot is not None and diffusers_dir(snapshot) is not None:
                return self._diffusers(spec, snapshot, meta, revision=snapshot.name)
            if not meta:
                where = f" (the hub cache has no {hub_id})" if hub_id else ""
                release = f" such as {entry['checkpoint']} from facebookresearch/DiT" if entry.get("checkpoint") else ""
                raise CompressKitError(
                    f"alias {spec!r} names the {entry['name']} architecture but no weights were found{where}; pass a local "
                    f"checkpoint{release} or a diffusers directory (`compresskit estimate --model {spec}` needs no weights)"
                )
            with torch.device("meta"):
                model = DiT(DiTConfig.from_dict(entry["architecture"]))
            return LoadedModel(model.eval(), spec, f"configs/{spec.lower()}.json", extras={"layout": "original", "weights": None})
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
            return self._file(spec, path.resolve(), meta)
        if path.is_dir():
            if diffusers_dir(path) is None:
                raise CompressKitError(f"{path} has no config.json of a diffusers DiT or PixArt transformer (nor transformer/config.json); pass such a directory or a DiT checkpoint file")
            return self._diffusers(spec, path.resolve(), meta)
        snapshot = None if path.exists() else cached_snapshot(spec)
        if snapshot is not None and diffusers_dir(snapshot) is not None:
            return self._diffusers(spec, snapshot, meta, revision=snapshot.name)
        raise CompressKitError(
            f"DiT model {spec!r} not found: no alias ({', '.join([*aliases, 'fmnist-dit'])}), no local .pt/.safetensors file or diffusers "
            "directory, no hub-cache snapshot of that id; pass one of those (nothing is downloaded)"
        )

    def _file(self, spec: str, path: Path, meta: bool) -> LoadedModel:
        shapes = read_weights(path, device="meta")
        config = _file_config(path, shapes)
        with torch.device("meta" if meta else "cpu"):
            model = DiT(config)
        if not meta:
            state = {k: v.float() for k, v in read_weights(path).items()}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise CompressKitError(f"{path} does not match the DiT config {config.to_dict()}: {str(err).splitlines()[0]}; put the right config next to it as {path.with_suffix('.json').name}") from None
        return LoadedModel(model.float().eval(), spec, str(path), extras={"layout": "original", "weights": None if meta else str(path)})

    def _diffusers(self, spec: str, directory: Path, meta: bool, revision: str | None = None) -> LoadedModel:
        diffusers = _diffusers()
        folder, class_name = diffusers_dir(directory)
        cls = getattr(diffusers, class_name)
        try:
            if meta:
                config = cls.load_config(str(folder), local_files_only=True)
                with torch.device("meta"):
                    model = cls.from_config(config)
            else:
                model = cls.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CompressKitError(f"could not load the {class_name} in {folder}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; check that config.json and the weights are complete") from None
        shared = tie_copied_embedders(model, verify=not meta)
        how = "declared: a model without weights cannot be compared" if meta else "identical values"
        extras = {"layout": "diffusers", "class": class_name, "weights": None if meta else str(folder), "shared": shared, "shared_how": how if shared else None}
        return LoadedModel(model.float().eval(), spec, str(folder), revision, extras)

    # ---- structure --------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[str] | None:
        """The transformer blocks (``blocks.N``, diffusers' ``transformer_blocks.N``), chained: x in, x out."""
        for attr in ("blocks", "transformer_blocks"):
            blocks = getattr(model, attr, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return [f"{attr}.{i}" for i in range(len(blocks))]
        return None

    def embeddings(self, model: nn.Module) -> dict[str, str]:
        """What DPQ keeps dense: the patch embedding, the timestep and class (or caption) embedders and
        the final layer; the blocks' AdaLN, attention and MLP weights are compressed."""
        if isinstance(model, DiT):
            return _named(model, [
                (model.x_embedder, PATCH_REASON), (model.t_embedder, TIME_REASON),
                (model.y_embedder, LABEL_REASON), (model.final_layer, FINAL_REASON),
            ])
        blocks = getattr(model, "transformer_blocks", None) or []
        embedders = [getattr(b.norm1, "emb", None) for b in blocks if hasattr(b, "norm1")]
        parts: list[tuple[nn.Module | None, str]] = [(getattr(model, "pos_embed", None), PATCH_REASON)]
        for emb in embedders:  # diffusers' DiT: timestep embedder and class table in every block
            if isinstance(emb, nn.Module):
                parts += [(getattr(emb, "timestep_embedder", None), TIME_REASON), (getattr(emb, "class_embedder", None), LABEL_REASON)]
        adaln = getattr(model, "adaln_single", None)  # PixArt: one shared timestep embedder; its linear is the AdaLN, compressed
        parts += [(getattr(adaln, "emb", None), TIME_REASON), (getattr(model, "caption_projection", None), CAPTION_REASON)]
        parts += [(getattr(model, name, None), FINAL_REASON) for name in ("proj_out_1", "proj_out_2", "proj_out")]
        return _named(model, parts)

    def example_inputs(self, loaded: LoadedModel) -> tuple[tuple, dict[str, Any]] | None:
        """One sample: a latent, a timestep and a class label (or a caption embedding for PixArt)."""
        model = loaded.model
        if isinstance(model, DiT):
            c = model.config
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, c.in_channels, c.input_size, c.input_size, generator=gen)  # [1, C, S, S]
            return (), {"x": x, "t": torch.tensor([500]), "y": torch.tensor([1])}
        config = getattr(model, "config", None)
        if config is None:
            return None
        x = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=torch.Generator().manual_seed(0))
        kwargs: dict[str, Any] = {"hidden_states": x, "timestep": torch.tensor([500]), "return_dict": False}
        if type(model).__name__ == "PixArtTransformer2DModel":
            kwargs["encoder_hidden_states"] = torch.zeros(1, 4, config.caption_channels or config.cross_attention_dim)
            extra = {"resolution": torch.tensor([[1024.0, 1024.0]]), "aspect_ratio": torch.tensor([[1.0]])}
            kwargs["added_cond_kwargs"] = extra if getattr(model, "use_additional_conditions", False) else {"resolution": None, "aspect_ratio": None}
        else:
            kwargs["class_labels"] = torch.tensor([1])
        return (), kwargs

    # ---- data and quality -------------------------------------------------------------------------
    # ---- the DDPM side (family.py) asks ----------------------------------------------------------
    def denoiser(self, loaded: LoadedModel, what: str) -> nn.Module:
        return _dit(loaded, what)

    def fmnist_denoiser(self, loaded: LoadedModel, what: str) -> nn.Module:
        return _fmnist_dit(loaded, what)

    def input_shapes(self, model: nn.Module) -> tuple[tuple[int, int, int], int]:
        c = model.config
        return (c.in_channels, c.input_size, c.input_size), c.num_classes

    def sampling_variance(self, model: nn.Module) -> str:
        return "learned" if model.config.learn_sigma else "fixed_small"

    # ---- persistence ------------------------------------------------------------------------------
    def save_architecture(self, loaded: LoadedModel, directory: Path) -> None:
        """``dit.json``: ``{"layout": "original", "architecture": DiTConfig}``, or for a diffusers model
        ``{"layout": "diffusers", "class", "config", "shared"}`` (its config and which embedder copies
        were tied to block 0's, so the rebuilt model holds the same tensors)."""
        model = loaded.model
        if isinstance(model, DiT):
            saved = {"layout": "original", "architecture": model.config.to_dict()}
        elif type(model).__name__ in DIFFUSERS_CLASSES:
            saved = {"layout": "diffusers", "class": type(model).__name__, "config": dict(model.config), "shared": loaded.extras.get("shared") or {}}
        else:
            raise CompressKitError(f"the dit adapter cannot save the architecture of a {type(model).__name__}; use compresskit.load(dir, model=...)")
        (Path(directory) / ARCHITECTURE_FILE).write_text(json.dumps(saved, indent=2, default=str))

    def load_architecture(self, directory: Path) -> LoadedModel:
        """A freshly initialised float32 model of the saved architecture (compresskit then loads the weights)."""
        path = Path(directory) / ARCHITECTURE_FILE
        saved = _read_json(path)
        layout = saved.get("layout") if saved else None
        if layout == "original" and isinstance(saved.get("architecture"), dict):
            model = DiT(DiTConfig.from_dict(saved["architecture"]))
            return LoadedModel(model.float().eval(), str(directory), str(path), extras={"layout": "original", "weights": None})
        if layout == "diffusers" and saved.get("class") in DIFFUSERS_CLASSES and isinstance(saved.get("config"), dict):
            model = getattr(_diffusers(), saved["class"]).from_config(saved["config"])
            shared = saved.get("shared") or {}
            modules = dict(model.named_modules())
            for copy, first in shared.items():  # the ties of the saved model, exactly (a copy that differed stays its own)
                owner, _, attr = copy.rpartition(".")
                setattr(modules[owner], attr, modules[first])
            extras = {"layout": "diffusers", "class": saved["class"], "weights": None, "shared": shared, "shared_how": "as saved" if shared else None}
            return LoadedModel(model.float().eval(), str(directory), str(path), extras=extras)
        raise CompressKitError(f"{path} is missing or holds no DiT architecture; the compressed model directory is incomplete")

    def export_dense(self, loaded: LoadedModel, directory: Path) -> None:
        """The dequantized model as the checkpoint it came from, the compressed model untouched. diffusers'
        DiT / PixArt: ``save_pretrained`` (``config.json``, ``diffusion_pytorch_model.safetensors``), every
        block's embedder copy written out, so ``DiTTransformer2DModel.from_pretrained(directory)`` loads
        it with no missing keys and ``DiTPipeline(transformer=...)`` samples with it. Our original layout:
        ``dit.safetensors`` (the original key names, float32) and its ``dit.json`` sidecar
        (``{"architecture": DiTConfig}``), so ``--model directory/dit.safetensors`` loads it again."""
        model = loaded.model
        if isinstance(model, DiT):
            save_original_dit(model, directory)
        elif type(model).__name__ in DIFFUSERS_CLASSES:
            save_diffusers(model, directory)
        else:
            raise CompressKitError(f"the dit adapter cannot export a {type(model).__name__} dense; export the DiT or PixArt transformer it was loaded as")

ARCHITECTURE_FILE = "dit.json"
ORIGINAL_ONLY = (
    "supports DiTs of the original layout (compresskit's DiT, called model(x, t, y)) for now; this is a diffusers "
    "model. Convert it to the original layout, or compress it from the weights alone (--preset none) and "
    "pass calibration_data=[{...model kwargs...}] for calibration"
)


def _dit(loaded: LoadedModel, what: str) -> DiT:
    if not isinstance(loaded.model, DiT):
        raise CompressKitError(f"DiT {what} {ORIGINAL_ONLY}")
    return loaded.model


def _fmnist_dit(loaded: LoadedModel, what: str) -> DiT:
    """The model, when it is a pixel-space Fashion-MNIST DiT (1 channel, 32 x 32, 10 classes + null)."""
    model = _dit(loaded, what)
    c = model.config
    want = (fmnist.IMAGE_SHAPE[0], fmnist.IMAGE_SHAPE[1], fmnist.NUM_CLASSES)
    if (c.in_channels, c.input_size, c.num_classes) != want:
        raise CompressKitError(
            f"DiT {what} uses Fashion-MNIST (1 channel, 32 x 32 pixels, 10 classes); this DiT takes {c.in_channels} channels "
            f"of {c.input_size} x {c.input_size} and {c.num_classes} classes. Use zero-data calibration (--preset zero-data) "
            "or pass calibration_data, and --no-eval"
        )
    return model
