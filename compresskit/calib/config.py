"""How to calibrate: one typed config, named presets, and no setting that silently does nothing.

The objectives (see ``docs/calibration.md``):

* **layer output** (always, for every layer whose quantizer can use it): each layer's output error
  ``tr(R H R^T)`` on its inputs' ``H = X^T X`` drives GPTQ's rounding (``uses_hessian``) or the
  E-step and layer-wise M-step of codebook quantizers (``supports_codebook_update``);
* ``m_objective="block"``: during the walk, a block's codebooks train to reproduce the uncompressed
  block's output (VQ4DiT's soft assignments with ``soft_candidates``);
* ``m_objective="task"`` / ``"distill"``: after the walk, ``em_rounds`` whole-model EM rounds whose
  M-step trains every codebook on the family's task loss, or on the distance to the uncompressed
  model's predictions; with ``latent_steps``, each M-step starts with quantization in the loop
  (float latents under straight-through estimates, codes re-assigned every ``reassign_every`` steps).

:meth:`CalibrationConfig.validated` refuses combinations in which a setting would do nothing (a
learning rate without M-steps, soft candidates outside the block objective, ...): one clear error
instead of a silently ignored option.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from compresskit.errors import CompressKitError

OBJECTIVES = (None, "block", "task", "distill")
DATA_KINDS = ("data", "zero-data")
E_INITS = ("nearest", "feedback")


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything calibration does, in one place. Units are in the comments.

    Data: ``data`` is ``"data"`` (the family's real data, or what the caller passes) or
    ``"zero-data"`` (VQ4DiT: noise inputs from the adapter); ``source`` the family's data source
    (``None``: its default), ``n_samples`` samples, grouped ``batch_size`` per model call;
    ``options`` the family's data options (an LM's ``seq_len``).
    """

    # data
    data: str = "data"
    source: str | None = None
    n_samples: int = 16
    batch_size: int = 8  # samples per model call during the walk
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    offload_dir: str | None = None  # keep block activations in files under this directory, not in memory
    # layer-output objective
    e_sweeps: int = 3  # E-step sweeps over the subspaces of each codebook layer
    e_init: str = "nearest"  # codes the E-step starts from: "nearest" (k-means) | "feedback" (GPTQ-style error feedback, estep.feedback_codes)
    local_rounds: int = 2  # layer-wise EM rounds after the E-step: centroids, row scales, codes
    cg_iters: int = 10  # conjugate-gradient iterations per layer-wise centroid update
    damp: float = 0.01  # ridge on H, relative to mean(diag H)
    asymmetric: bool = True  # chained blocks: layers aim at the uncompressed model's outputs
    asym_damp: float = 0.3  # ridge on the asymmetric correction, relative to mean(diag H)
    sequential: bool = True  # a block's layers in stages, each calibrated with the earlier ones compressed
    # M-steps
    m_objective: str | None = None  # None | "block" | "task" | "distill"
    m_steps: int = 0  # AdamW steps per M-step
    em_rounds: int = 0  # whole-model EM rounds after the walk (M-step, dead-centroid re-init, E-step)
    lr: float = 1e-4  # in weight units (row-scaled centroids step lr / mean(scale))
    weight_decay: float = 0.0
    m_samples: int = 0  # samples the task / distill M-step trains on (0: the calibration samples)
    m_batch: int = 8  # samples per task / distill M-step
    m_dense: str = ""  # comma-separated fnmatch patterns: uncompressed parameters the task / distill M-step trains too ("*.bias")
    tau_dead: int = 256  # a centroid used fewer times over the M-step's passes is re-initialised
    latent_steps: int = 0  # > 0: each EM round's M-step starts with this many steps of quantization in the loop (objectives.LatentPhase)
    reassign_every: int = 10  # in those steps: codes re-assigned to the float latents (and centroids Lloyd-updated) every this many steps
    latent_lr: float = 1e-5  # in those steps: the latents' AdamW rate, in weight units, where the family gives none (Adapter.latent_lr)
    soft_candidates: int = 0  # > 0: VQ4DiT soft assignments over that many candidates in the block M-step
    entropy_weight: float = 1e-3  # pushes soft assignments towards one candidate as training goes
    logit_lr: float = 0.05  # soft-assignment logits move in logit units
    # the settings a family's recipe chose (Adapter.calibration_preset), not the caller. A recipe is written for every
    # method the family runs (e_init for codebook methods, under a gptq run too), so the checks that refuse a setting
    # that would do nothing skip these; a setting the caller gives again leaves this set
    from_family: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    # ---- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CalibrationConfig":
        """A named, measured recipe (see ``PRESETS``), with ``overrides`` on top; validated."""
        if name not in PRESETS:
            raise CompressKitError(f"unknown calibration preset {name!r}; available: {', '.join(PRESETS)}")
        return replace(PRESETS[name][0], **overrides).validated()

    def with_settings(self, settings: dict[str, Any]) -> "CalibrationConfig":
        """This config with ``{field: value}`` changed (CLI ``--calib-set``); unknown names are an error."""
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise CompressKitError(f"unknown calibration setting(s) {', '.join(unknown)}; valid: {', '.join(SETTINGS)}")
        return replace(self, **settings, from_family=self.from_family - set(settings)).validated()

    # ---- validation ---------------------------------------------------------------------------
    def validated(self) -> "CalibrationConfig":
        """Check types and ranges, and that no setting would do nothing; returns self."""
        defaults = CalibrationConfig()
        for f in fields(self):
            value, default = getattr(self, f.name), getattr(defaults, f.name)
            kind = type(default) if default is not None else None
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and not isinstance(value, int)):
                raise CompressKitError(f"calibration setting {f.name} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise CompressKitError(f"calibration setting {f.name} must be true or false, got {value!r}")
            if kind in (int, float) and value < 0:
                raise CompressKitError(f"calibration setting {f.name} must be >= 0, got {value!r}")
        if not isinstance(self.m_dense, str):
            raise CompressKitError(f"calibration setting m_dense must be comma-separated parameter-name patterns (a string), got {self.m_dense!r}")
        if self.data not in DATA_KINDS:
            raise CompressKitError(f"calibration data must be one of {', '.join(DATA_KINDS)}, got {self.data!r}")
        if self.m_objective not in OBJECTIVES:
            raise CompressKitError(f"m_objective must be one of block, task, distill (or None), got {self.m_objective!r}")
        for name in ("n_samples", "batch_size", "m_batch", "reassign_every"):
            if getattr(self, name) < 1:
                raise CompressKitError(f"calibration setting {name} must be >= 1, got {getattr(self, name)!r}")
        if self.e_init not in E_INITS:
            raise CompressKitError(f"e_init must be one of {', '.join(E_INITS)}, got {self.e_init!r}")
        if not self.asym_damp > 0:
            raise CompressKitError(f"asym_damp must be > 0, got {self.asym_damp!r}")
        self._check_no_dead_settings()
        return self

    def _check_no_dead_settings(self) -> None:
        changed = self.changed_by_caller()

        def refuse(names: set[str], why: str) -> None:
            hit = sorted(changed & names)
            if hit:
                raise CompressKitError(f"{', '.join(hit)} would do nothing: {why}")

        if self.data == "zero-data":
            if self.m_objective in ("task", "distill"):
                raise CompressKitError("zero-data calibration has no real data for a task or distillation loss: use m_objective 'block'")
            refuse({"source"}, "zero-data calibration reads no data source")
        if self.m_objective is None:
            refuse({"m_steps", "lr", "weight_decay", "m_samples", "m_batch", "m_dense", "soft_candidates", "entropy_weight", "logit_lr"},
                   "they set the M-step, and no m_objective is chosen (block, task or distill)")
        elif self.m_steps == 0:
            raise CompressKitError(f"m_objective {self.m_objective!r} needs m_steps > 0 (the M-step's optimizer steps)")
        if self.m_objective == "block":
            refuse({"m_samples", "m_batch"}, "the block M-step trains on the calibration samples, block by block")
            refuse({"m_dense"}, "the block M-step trains codebooks only; dense parameters train in task or distill EM rounds")
        if self.m_objective in ("task", "distill") and self.em_rounds == 0:
            raise CompressKitError(f"m_objective {self.m_objective!r} runs in whole-model EM rounds: set em_rounds >= 1")
        if self.soft_candidates == 0:
            refuse({"entropy_weight", "logit_lr"}, "they tune soft assignments, which need soft_candidates > 0")
        elif self.m_objective != "block":
            raise CompressKitError("soft_candidates train in the block M-step: set m_objective to 'block'")
        if self.em_rounds == 0:
            refuse({"tau_dead"}, "dead centroids are re-initialised in whole-model EM rounds (em_rounds >= 1)")
        if self.latent_steps and (self.m_objective not in ("task", "distill") or self.em_rounds == 0):
            raise CompressKitError("latent_steps train in the whole-model EM rounds' M-step: set m_objective to 'task' or 'distill' and em_rounds >= 1")
        if self.latent_steps == 0:
            refuse({"reassign_every", "latent_lr"}, "they set quantization in the loop, which needs latent_steps > 0")
        if self.e_sweeps == 0:
            refuse({"e_init"}, "it picks the codes the E-step starts from, and e_sweeps is 0")
        if not self.asymmetric:
            refuse({"asym_damp"}, "it regularises asymmetric targets, and asymmetric is off")

    def changed_by_caller(self) -> set[str]:
        """The settings that differ from the defaults, less those a family's recipe chose (``from_family``):
        what the checks for settings that would do nothing look at."""
        defaults = CalibrationConfig()
        return {name for name in SETTINGS if getattr(self, name) != getattr(defaults, name)} - self.from_family

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SETTINGS}


SETTINGS = tuple(f.name for f in fields(CalibrationConfig) if f.name != "from_family")  # what a caller sets (from_family is bookkeeping)


# Measured recipes (docs/BENCHMARKS.md has the figures and the commands that measured them).
PRESETS: dict[str, tuple[CalibrationConfig, str]] = {
    "fast": (
        CalibrationConfig(),
        "the block walk: activation-aware E-step and two layer-wise rounds per layer, no M-step",
    ),
    "best": (
        CalibrationConfig(m_objective="distill", em_rounds=1, m_steps=64, m_samples=64, m_batch=2, lr=5e-4),
        "the walk, then one whole-model EM round distilling the uncompressed model (64 AdamW steps of 2 samples)",
    ),
    "zero-data": (
        CalibrationConfig(data="zero-data", m_objective="block", m_steps=20, soft_candidates=4),
        "no data: noise inputs, and VQ4DiT's soft assignments trained block by block against the uncompressed blocks",
    ),
}
