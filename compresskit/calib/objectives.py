"""The calibration objectives, each in one place.

- **layer output** (:func:`fit_layer`): fit a layer's quantizer with its inputs' ``H = X^T X``: GPTQ's
  error feedback for a quantizer that ``uses_hessian``; for one that ``supports_codebook_update``,
  the activation-aware E-step and the layer-wise M-step (output-optimal centroids and row scales);
- **block output** (:class:`BlockObjective`): train one block's codebooks to reproduce the
  uncompressed block's output (hard codes, or VQ4DiT's soft candidate assignments);
- **task loss / distillation** (:class:`ModelObjective`, DPQ's EM round): M-step on the family's
  task loss (or the distance to the uncompressed model's predictions recorded before the walk),
  dead-centroid re-initialisation, E-step; each guarded so that a round never makes a layer (or the
  calibration loss) worse.

Calibration dispatches on what a quantizer declares (``uses_hessian``, ``supports_codebook_update``),
never on its name, so a quantizer registered by another package gets every step it supports.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Callable

import torch
from torch import nn

from compresskit.calib.capture import run_call
from compresskit.calib.offload import ActivationStore
from compresskit.errors import CompressKitError
from compresskit.nn import QuantizedTensor, quantized_tensors


def fit_layer(quantizer, W: torch.Tensor, H: torch.Tensor, config) -> None:
    """Fit ``quantizer`` on ``W [out, ...]`` for the least output error on inputs with ``H [n, n]``
    (``config``: a :class:`CalibrationConfig`); a quantizer that can use neither is fitted on ``W``."""
    if quantizer.uses_hessian:
        quantizer.fit(W, hessian=H)
        return
    quantizer.fit(W)
    if quantizer.supports_codebook_update and config.e_sweeps:
        from compresskit.calib.codebook import refine_layer
        from compresskit.calib.estep import e_step, feedback_codes

        if config.e_init == "feedback":
            quantizer.set_codes(feedback_codes(quantizer, W, H, damp=config.damp))
        quantizer.set_codes(e_step(quantizer, W, H, n_sweeps=config.e_sweeps, damp=config.damp))
        if config.local_rounds:
            refine_layer(quantizer, W, H, rounds=config.local_rounds, e_sweeps=config.e_sweeps, iters=config.cg_iters, damp=config.damp)


def uses_statistics(quantizer, config) -> bool:
    """Does fitting this quantizer use the layer's input statistics (GPTQ, or a codebook with the E-step)?"""
    return quantizer.uses_hessian or (quantizer.supports_codebook_update and config.e_sweeps > 0)


def codebook_tensors(model: nn.Module) -> dict[str, QuantizedTensor]:
    """The compressed tensors of ``model`` whose quantizer supports codebook updates, by target name."""
    return {name: qt for name, (_, _, qt) in quantized_tensors(model).items() if qt.quantizer.supports_codebook_update}


def trainable_tensors(model: nn.Module) -> list[tuple[nn.Parameter, float]]:
    """The centroid table and row scales (``codebook_layout()``) of ``model``'s codebook layers, each with its learning-rate
    multiplier. ``lr`` is in weight units (the DPQ setting, 1e-4, is for raw weights): centroids
    of a row-scaled layer live in units of the row scale, so their step is ``lr / mean(scale)``,
    which moves the rebuilt weight about as far as ``lr`` moves an unscaled centroid."""
    params = []
    for module in codebook_tensors(model).values():
        layout = module.bind().codebook_layout()  # the module's own tensors, bound
        scale = layout.row_scales
        unit = _unit(scale) if scale is not None else 1.0
        params.append((layout.table, 1.0 / unit))  # the centroid table (not an 8-bit table's grid)
        if scale is not None:
            params.append((scale, 1.0))
    return params


def settle(model: nn.Module) -> None:
    """Round every compressed tensor's learned state to what the file stores, after an optimiser
    wrote the bound tensors (:meth:`Quantizer.settle`: a codebook's 8-bit table back onto its grid)."""
    for _, _, qt in quantized_tensors(model).values():
        qt.bind().settle()


def dense_tensors(model: nn.Module, patterns: str) -> list[tuple[nn.Parameter, float]]:
    """The floating-point parameters of ``model`` outside its compressed tensors whose names match
    one of ``patterns`` (comma-separated fnmatch patterns, e.g. ``"*.bias"``), each at lr multiplier 1.
    One clear error when a pattern matches none: a typo must not silently train nothing."""
    compressed = {id(p) for _, _, qt in quantized_tensors(model).values() for p in qt.parameters()}
    named = [(name, p) for name, p in model.named_parameters() if id(p) not in compressed and p.is_floating_point()]
    out, seen = [], set()
    for pattern in (x.strip() for x in patterns.split(",") if x.strip()):
        hits = [(name, p) for name, p in named if fnmatchcase(name, pattern)]
        if not hits:
            raise CompressKitError(f"m_dense pattern {pattern!r} matches no uncompressed parameter of the model")
        out += [(p, 1.0) for _, p in hits if id(p) not in seen]
        seen |= {id(p) for _, p in hits}
    return out


def optimise(trainable: list[tuple[nn.Parameter, float]], loss_fn: Callable[[int], torch.Tensor], config, progress=None, label: str = "M-step",
             steps: int | None = None, before_step: Callable[[int], None] | None = None) -> float:
    """AdamW on ``trainable`` (``(tensor, lr multiplier)`` pairs, see :func:`trainable_tensors`) for
    ``steps`` steps (default ``config.m_steps``; float32 while training); ``before_step(step)``, if
    given, runs before each step's forward pass; ``progress(description, step, steps)`` hears each
    step's loss."""
    steps = config.m_steps if steps is None else steps
    if not trainable or not steps:
        return float("nan")
    params = [p for p, _ in trainable]
    originals = [p.data for p in params]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    groups = [{"params": [p], "lr": config.lr * mult} for p, mult in trainable]
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    loss_value = float("nan")
    try:
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(step)
            loss.backward()
            opt.step()
            loss_value = loss.item()
            if progress is not None:
                progress(f"{label}: M-step loss {loss_value:.4g}", step + 1, steps)
    finally:
        for p, orig in zip(params, originals):
            p.requires_grad_(False)
            p.grad = None
            p.data = p.data.to(orig.dtype)  # stored precision (float16): what is saved is what is evaluated
    return loss_value


class LatentPhase:
    """Quantization in the loop, the first part of an EM round's M-step (``latent_steps`` > 0).

    Every compressed tensor whose value before compression was recorded (``initial``, by target
    name) gets a float *latent* copy. A layer the walk fitted with its inputs' statistics (one with
    a recorded ``H``) starts from the weight the walk aimed at (``goals``: the asymmetric target of
    a chained walk) and from the walk's codes; a tensor without statistics (a bare tensor) starts
    from its value before compression and is re-encoded at once. While the phase runs, the tensor the model
    reads is ``latent + (decode(codes) - latent).detach()`` (a straight-through estimate, through
    :attr:`QuantizedTensor.override`): the forward pass sees the quantized model, the loss's
    gradient reaches the latents, and AdamW moves them. Every ``reassign_every`` steps (and at the
    end) the codes follow the latents:

    * a codebook quantizer (``supports_codebook_update``): E-step towards the latent (nearest
      centroid in the metric of the layer's recorded ``H``, the identity for a bare tensor), then one
      layer-wise round (centroids, row scales, codes) on it: with ``H = I`` a Lloyd update;
    * any other quantizer (rtn, gptq): ``transform(latent)``, its codes under the fitted scales.

    A quantizer that declares ``trains_in_loop = False`` (``morton``, whose stored size depends on the
    order of its codes) gets no latent: its codes stay as fitted.

    Codebooks move only through those updates here; the task M-step after the phase trains them
    with the codes frozen. The file format does not change: codes and tables only.
    ``lr(name)`` gives a target's learning rate (the family's, e.g. 3DGS's per-attribute rates; None:
    ``config.latent_lr``, in weight units: on the 2-bit DiT the codebooks' 3e-4 moved the latents so
    far that the distillation loss rose 50-fold in 40 steps, while 1e-5 lowered it by 11 %).
    """

    def __init__(self, config, initial: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], lr: Callable[[str], float | None] | None = None,
                 goals: dict[str, torch.Tensor] | None = None):
        self.config = config
        self.initial, self.hessians = initial, hessians
        self.goals = {} if goals is None else goals
        self.lr = lr or (lambda name: None)

    def run(self, model: nn.Module, loss_fn: Callable[[int], torch.Tensor], progress=None, label: str = "latent phase") -> float:
        """Run the phase on ``model`` (its compressed tensors change in place); returns the last loss."""
        tensors = {name: qt for name, (_, _, qt) in quantized_tensors(model).items() if name in self.initial and qt.quantizer.trains_in_loop}
        if not tensors:
            return float("nan")
        # a layer fitted on its statistics keeps the walk's codes, which aimed at its goal: re-encoding it
        # at once with one sweep towards its weight would undo what the walk's rounds and asymmetric
        # target bought (on the 2-bit DiT that raised the distillation loss 0.0026 -> 0.0036)
        fitted = {name for name in tensors if name in self.hessians and name in self.goals}
        start = {name: (self.goals if name in fitted else self.initial)[name] for name in tensors}
        latents = {name: nn.Parameter(start[name].detach().float().clone(), requires_grad=False) for name in tensors}
        decoded: dict[str, torch.Tensor] = {}

        def follow(first: bool = False) -> None:
            with torch.no_grad():
                for name, qt in tensors.items():
                    if not (first and name in fitted):
                        self._reencode(name, qt, latents[name].detach())
                    decoded[name] = qt.dequantize().detach()

        def straight_through(name: str) -> Callable[[], torch.Tensor]:
            latent = latents[name]
            return lambda: latent + (decoded[name] - latent).detach()

        def before_step(step: int) -> None:
            if step and step % self.config.reassign_every == 0:
                follow()

        follow(first=True)
        for name, qt in tensors.items():
            qt.override = straight_through(name)
        try:
            trainable = [(latents[name], (self.lr(name) or self.config.latent_lr) / self.config.lr) for name in tensors]
            loss = optimise(trainable, loss_fn, self.config, progress, f"{label} (quantization in the loop)",
                            steps=self.config.latent_steps, before_step=before_step)
        finally:
            for qt in tensors.values():
                qt.override = None
        follow()
        return loss

    def _reencode(self, name: str, qt: QuantizedTensor, latent: torch.Tensor) -> None:
        """Point ``qt``'s codes (and, for a codebook, its centroids) at ``latent`` (see the class docstring)."""
        q = qt.bind()
        if not q.supports_codebook_update:
            qt.codes.copy_(q.transform(latent))
            return
        from compresskit.calib.codebook import refine_layer
        from compresskit.calib.estep import e_step

        H = self.hessians.get(name)
        if H is None:  # a bare tensor: no activations reach it, so the weight metric
            H = torch.eye(latent[0].numel())
        q.set_codes(e_step(q, latent, H, n_sweeps=1, damp=self.config.damp))
        refine_layer(q, latent, H, rounds=1, e_sweeps=1, iters=self.config.cg_iters, damp=self.config.damp)


class BlockObjective:
    """Block output: train one block's codebooks to reproduce the uncompressed block (during the walk)."""

    def __init__(self, config):
        self.config = config

    def train(self, block: nn.Module, calls: list, teacher: list, store: ActivationStore) -> float:
        """Hard codes: AdamW on the block's codebooks towards the uncompressed block's outputs ``teacher``."""
        def loss_fn(step: int) -> torch.Tensor:
            j = step % len(calls)
            return (run_call(block, calls[j], store) - store.resolve(teacher[j])).pow(2).mean()

        loss = optimise(trainable_tensors(block), loss_fn, self.config)
        settle(block)
        return loss

    def train_soft(self, model: nn.Module, block_name: str, names: list[str], calls: list, teacher: list, store: ActivationStore) -> float:
        """VQ4DiT: train soft candidate assignments and centroids of the block's codebook layers to
        reproduce the uncompressed block; freeze confident subvectors as it goes, then harden."""
        from compresskit.calib.soft import SoftAssignment

        block = model.get_submodule(block_name)
        softs: dict[str, tuple[QuantizedTensor, SoftAssignment]] = {}
        for name, qm in codebook_tensors(block).items():
            if (f"{block_name}.{name}" if name else block_name) in names:
                q = qm.bind()
                softs[name] = (qm, SoftAssignment(q, q.inverse_transform().float(), n_candidates=self.config.soft_candidates))
        if not softs or not self.config.m_steps:
            return float("nan")
        for qm, soft in softs.values():
            qm.override = soft.weight
        # lr in weight units, as in trainable_tensors: a row-scaled table lives in units of its row scales
        tables = [{"params": [soft.table], "lr": self.config.lr / _unit(soft.row_scale)} for _, soft in softs.values()]
        logits = [soft.logits for _, soft in softs.values()]
        opt = torch.optim.AdamW(tables + [{"params": logits, "lr": self.config.logit_lr}], weight_decay=self.config.weight_decay)
        loss_value = float("nan")
        try:
            for step in range(self.config.m_steps):
                j = step % len(calls)
                ramp = (step + 1) / self.config.m_steps
                loss = (run_call(block, calls[j], store) - store.resolve(teacher[j])).pow(2).mean()
                loss_value = loss.item()
                loss = loss + self.config.entropy_weight * ramp * sum(soft.entropy() for _, soft in softs.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if (step + 1) % 10 == 0:
                    for _, soft in softs.values():
                        soft.freeze_confident()
        finally:
            for qm, _ in softs.values():
                qm.override = None
        for qm, soft in softs.values():
            soft.write_back(qm.bind())  # in place: the module holds the same tensors
        return loss_value


class ModelObjective:
    """Task loss or distillation over the whole model, after the walk: DPQ's EM rounds.

    ``batches``: the calibration batches (the guard's calibration loss is measured on them);
    ``m_batches``: what the M-step trains on; ``hessians`` / ``originals``: per codebook target, the
    statistics and weight its E-step aims at (filled by the walk). ``trainable`` is the function that
    lists what the M-step trains (replace it to train more, e.g. norms). With ``latent_steps``, the
    M-step starts with a :class:`LatentPhase` from ``initial`` (every target's tensor before
    compression, filled by the calibrator), at the learning rates ``latent_lr(name)`` gives.
    """

    def __init__(self, config, batches, m_batches, task_loss, distill, hessians: dict, originals: dict,
                 initial: dict | None = None, latent_lr: Callable[[str], float | None] | None = None):
        self.config = config
        self.batches, self.m_batches = batches, m_batches
        self.task_loss, self.distill = task_loss, distill
        self.hessians, self.originals = hessians, originals
        self.initial = {} if initial is None else initial
        self.latent = LatentPhase(config, self.initial, hessians, latent_lr, goals=originals)
        self.teacher: dict[int, Any] = {}  # the uncompressed model's predictions, by batch index
        self.m_teacher: dict[int, Any] = {}
        self.trainable = trainable_tensors if not config.m_dense else (
            lambda model: trainable_tensors(model) + dense_tensors(model, config.m_dense)
        )

    def optimise(self, model: nn.Module, loss_fn, progress=None, label: str = "M-step") -> float:
        loss = optimise(self.trainable(model), loss_fn, self.config, progress, label)
        settle(model)
        return loss

    def em_round(self, model: nn.Module, progress=None, label: str = "EM round") -> float:
        """One whole-model EM round: task-loss M-step, dead-centroid re-init, E-step.

        A layer whose output error (on its calibration Hessian) would rise through the re-init is
        restored and only re-assigned: the E-step never lets the error grow, so the round cannot
        make a layer worse than the M-step left it. With a task loss, the re-init and E-step are
        kept only if the mean calibration loss does not rise through them (else the round ends with
        the M-step's state).

        Returns the last M-step loss (nan without an M-step); ``progress`` (as in the walk) hears each
        M-step's loss, described with ``label``.
        """
        loss = float("nan")
        step_loss = None
        if self.distilling():
            step_loss = lambda step: self.m_loss(model, step % len(self.m_batches))  # noqa: E731
        elif self.config.m_steps and self.task_loss is not None and self.config.m_objective == "task":
            step_loss = lambda step: self.task_loss(model, self.m_batches[step % len(self.m_batches)])  # noqa: E731
        if step_loss is not None:
            if self.config.latent_steps:
                self.latent_phase(model, step_loss, progress, label)
            loss = self.optimise(model, step_loss, progress, label)
        if progress is not None:
            progress(f"{label}: re-init and E-step", self.config.m_steps, self.config.m_steps)
        # re-assignment serves each layer's output error, which is not the task loss the M-step just
        # lowered; measured on small models it can undo the M-step, so keep it only if the task agrees
        after_m = self.calibration_loss(model)
        snapshots = {} if after_m is None else {
            name: _snapshot(m) for name, m in codebook_tensors(model).items() if name in self.originals
        }
        self.reassign(model)
        if after_m is not None and not self.calibration_loss(model) <= after_m:
            for name, snap in snapshots.items():
                _restore(codebook_tensors(model)[name], snap)
        return loss

    def latent_phase(self, model: nn.Module, step_loss, progress=None, label: str = "EM round") -> float:
        """:class:`LatentPhase` on ``model``, kept only if the calibration loss does not rise through
        it (else every compressed tensor is put back as it was); returns the phase's last loss."""
        before = self.calibration_loss(model)
        snapshots = {name: _snapshot(qt) for name, (_, _, qt) in quantized_tensors(model).items() if name in self.initial}
        loss = self.latent.run(model, step_loss, progress, label)
        if before is not None and not self.calibration_loss(model) <= before:
            tensors = quantized_tensors(model)
            for name, snap in snapshots.items():
                _restore(tensors[name][2], snap)
        return loss

    def calibration_loss(self, model: nn.Module) -> float | None:
        """Mean M-step loss (task or distillation) over the calibration batches (None without one)."""
        if self.distilling():
            _, loss_fn = self.distill
            with torch.no_grad():
                return sum(float(loss_fn(model, b, self.teacher[j])) for j, b in enumerate(self.batches)) / len(self.batches)
        if self.task_loss is None:
            return None
        with torch.no_grad():
            return sum(float(self.task_loss(model, b)) for b in self.batches) / len(self.batches)

    # ---- distillation M-step ----------------------------------------------------------------
    def distilling(self) -> bool:
        return self.config.m_objective == "distill" and self.config.em_rounds > 0 and self.config.m_steps > 0

    def take_teacher(self, model: nn.Module) -> None:
        """Record the uncompressed model's predictions on the calibration and M-step batches."""
        targets_fn, _ = self.distill
        with torch.no_grad():
            self.teacher = {j: targets_fn(model, b) for j, b in enumerate(self.batches)}
            same = self.m_batches is self.batches
            self.m_teacher = self.teacher if same else {j: targets_fn(model, b) for j, b in enumerate(self.m_batches)}

    def m_loss(self, model: nn.Module, j: int) -> torch.Tensor:
        _, loss_fn = self.distill
        return loss_fn(model, self.m_batches[j], self.m_teacher[j])

    def reassign(self, model: nn.Module) -> None:
        """Dead-centroid re-initialisation and E-step on every codebook layer (guarded per layer)."""
        from compresskit.calib.deadcode import reinit_dead, usage_counts
        from compresskit.calib.estep import e_step, output_error

        for name, module in codebook_tensors(model).items():
            if name not in self.originals:
                continue
            q, W, H = module.bind(), self.originals[name], self.hessians[name]
            before = output_error(W, q.inverse_transform().float(), H)
            saved = _snapshot(module)
            # the paper's tau_dead counts uses over forward passes: each M-step pass used the current codes once
            usage = usage_counts(q) * max(1, self.config.m_steps)
            reinit_dead(q, W, usage, tau_dead=self.config.tau_dead, seed=self.config.seed)
            q.set_codes(e_step(q, W, H, n_sweeps=max(1, self.config.e_sweeps), damp=self.config.damp))
            if output_error(W, q.inverse_transform().float(), H) > before:
                # with few passes the usage count flags live centroids as dead; never pay for a re-init
                _restore(module, saved)
                q.set_codes(e_step(q, W, H, n_sweeps=max(1, self.config.e_sweeps), damp=self.config.damp))


def _unit(row_scale: torch.Tensor) -> float:
    """The mean magnitude of a layer's row scales (1 where it is not positive): a centroid step of
    ``lr / unit`` moves the rebuilt weight about ``lr``."""
    unit = float(row_scale.float().abs().mean())
    return unit if unit > 0 else 1.0


def _snapshot(module: QuantizedTensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Copies of a compressed module's learned tensors and codes, for :func:`_restore`."""
    return {k: t.detach().clone() for k, t in module.state_tensors().items()}, module.codes.clone()


def _restore(module: QuantizedTensor, snapshot: tuple[dict[str, torch.Tensor], torch.Tensor]) -> None:
    """Write a :func:`_snapshot` back in place (the quantizer shares the module's tensors)."""
    tensors, codes = snapshot
    with torch.no_grad():
        for k, t in module.state_tensors().items():
            t.copy_(tensors[k])
        module.codes.copy_(codes)
    module.bind()
