"""Streaming block-by-block calibration: the one calibration loop every adapter uses.

The adapter supplies the repeated blocks (in execution order), calibration batches (real data or,
for zero-data calibration, Gaussian noise) and its task loss. The calibrator then walks the blocks:

1. capture the inputs of block 0 once (the forward pass stops there); when blocks are chained (each
   block's output is the next one's input, as in LLaMA) later inputs come from the previous block's
   outputs, otherwise the compressed prefix of the model is re-run up to each block;
2. for each block: run it on its inputs while hooks accumulate ``X^T X`` for every selected layer
   (GPTQ's streaming ``add_batch``; the activations themselves are never stored), fit each layer's
   quantizer with that Hessian (GPTQ) or fit it and re-assign codes against the layer's output error
   (the EM calibrator's E-step, for ``pq``/``vq``; with ``local_rounds``, then alternate it with
   output-error-optimal centroids and row scales, see ``codebook.py``), swap in the compressed module, optionally train
   the block's codebooks to reproduce the uncompressed block's output (teacher-student M-step), and
   feed the *compressed* block's outputs to the next block.

Only one block's inputs are held at a time (on disk with ``offload_dir``, see ``offload.py``), so memory does not grow with
depth. After the walk, ``em_rounds`` rounds of the EM calibrator run on the whole model: an M-step
(AdamW on every codebook/pool with the task loss), dead-centroid re-initialisation, and an E-step.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from compresskit.calib.hessian import HessianAccumulator, asymmetric_target, conv_inputs
from compresskit.calib.offload import ActivationStore
from compresskit.errors import CompressKitError
from compresskit.nn import QuantizedModule, qmodule_for
from compresskit.rewrite import replace_module

Batch = dict[str, torch.Tensor]
CODEBOOK_METHODS = ("pq", "vq")


@dataclass(frozen=True)
class CalibConfig:
    """How to calibrate. ``m_objective``: "task" (the adapter's loss through the whole model, after
    the block walk), "distill" (the same place, but the loss is the distance to what the uncompressed
    model predicted, e.g. KL on next-token distributions) or "block" (match the uncompressed block's
    output, during the walk)."""

    e_sweeps: int = 3  # E-step sweeps over the subspaces of each layer
    local_rounds: int = 2  # layer-wise EM rounds after the E-step: centroids, row scales, codes (codebook.py)
    cg_iters: int = 10  # conjugate-gradient iterations per layer-wise centroid update
    em_rounds: int = 0  # whole-model EM rounds after the block walk (M-step, re-init, E-step)
    m_steps: int = 0  # optimizer steps per M-step
    m_objective: str = "task"
    lr: float = 1e-4
    weight_decay: float = 0.0
    tau_dead: int = 256
    damp: float = 0.01
    soft_candidates: int = 0  # > 0: VQ4DiT soft assignments over that many candidates in the block M-step
    entropy_weight: float = 1e-3  # pushes soft assignments towards one candidate as training goes
    logit_lr: float = 0.05  # soft-assignment logits move in logit units: a far larger step than centroids
    seed: int = 0
    offload_dir: str | None = None  # keep block activations in files under this directory, not in memory
    asymmetric: bool = True  # chained blocks: layers match the uncompressed model's outputs (hessian.asymmetric_target)
    asym_damp: float = 0.3  # ridge on the asymmetric correction, relative to mean(diag H): 0.01 overfits 8k tokens
    sequential: bool = True  # layers of a block in stages; each stage's statistics see the earlier stages compressed

    def validated(self) -> "CalibConfig":
        if self.m_objective not in ("task", "distill", "block"):
            raise CompressKitError(f"m_objective must be 'task', 'distill' or 'block', got {self.m_objective!r}")
        if not self.asym_damp > 0:
            raise CompressKitError(f"asym_damp must be > 0, got {self.asym_damp!r}")
        for name in ("e_sweeps", "local_rounds", "cg_iters", "em_rounds", "m_steps", "soft_candidates"):
            if getattr(self, name) < 0:
                raise CompressKitError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self


@dataclass
class _Stats:
    """What :meth:`BlockwiseCalibrator._statistics` measured on one block."""

    hessians: dict[str, torch.Tensor]
    crosses: dict[str, torch.Tensor]
    fp_outputs: list | None
    stages: list[list[str]]


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


@dataclass
class _Call:
    args: tuple
    kwargs: dict[str, Any]


class BlockwiseCalibrator:
    """Compresses selected layers block by block with activation statistics (see module docstring).

    ``blocks``: dotted names of the repeated blocks in execution order; ``batches``: model-call
    kwargs; ``task_loss(model, batch)``: the adapter's loss (only for the task-loss M-step);
    ``m_batches``: what the task-loss M-step trains on (default: ``batches``); ``distill``: the
    adapter's ``(distill_targets, distill_loss)`` pair, for ``m_objective="distill"``.
    """

    def __init__(
        self,
        blocks: Sequence[str],
        batches: Sequence[Batch],
        task_loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
        config: CalibConfig | None = None,
        m_batches: Sequence[Batch] | None = None,
        distill: tuple[Callable[[nn.Module, Batch], Any], Callable[[nn.Module, Batch, Any], torch.Tensor]] | None = None,
    ):
        if not blocks:
            raise CompressKitError("calibration needs the model's blocks; the adapter returned none")
        if not batches:
            raise CompressKitError("calibration needs at least one calibration batch")
        self.blocks = list(blocks)
        self.batches = list(batches)
        self.task_loss = task_loss
        # the task-loss M-step trains on these (more, smaller batches than the walk needs: measured on
        # SmolLM2 at 1 bit, 64 steps of 2 sequences beat 16 steps of 8 at the same cost, 44.8 vs 76.9)
        self.m_batches = list(m_batches) if m_batches else self.batches
        self.config = (config or CalibConfig()).validated()
        if self.config.m_objective == "distill" and distill is None:
            raise CompressKitError("m_objective 'distill' needs the adapter's distill_targets and distill_loss")
        self.distill = distill
        # the uncompressed model's predictions, taken before the walk: batch index -> targets
        self.teacher: dict[int, Any] = {}
        self.m_teacher: dict[int, Any] = {}
        # kept only for whole-model EM rounds (em_rounds > 0): per codebook layer, its Hessian and
        # original weight; O(sum of n^2 + m n) floats, which is why they are not kept otherwise
        self.hessians: dict[str, torch.Tensor] = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.block_losses: dict[str, float] = {}
        self.store = ActivationStore()  # replaced for each walk by one honouring offload_dir
        self.asymmetric = False  # set by the walk: asymmetric targets were used (config asks, blocks chained)

    # ---- the walk ---------------------------------------------------------------------------
    def run(self, model: nn.Module, layers: dict[str, Any], make_quantizer, report_layer, compress_plain, progress=None) -> list:
        """Compress ``layers`` (name -> override) of ``model``; returns one report per layer.

        ``make_quantizer(override)`` builds a layer's quantizer, ``report_layer`` describes a
        compressed layer, ``compress_plain(name, override)`` compresses a layer outside every block
        without activations (all three come from :func:`compresskit.compress`).
        """
        if self._distilling():
            self._take_teacher(model)
        with ActivationStore(self.config.offload_dir) as self.store:
            reports = self._walk(model, layers, make_quantizer, report_layer, compress_plain, progress)
        for _ in range(self.config.em_rounds):
            self.em_round(model)
        return reports

    def _walk(self, model, layers, make_quantizer, report_layer, compress_plain, progress) -> list:
        reports = []
        keep_h = self.config.em_rounds > 0
        by_block = {b: [n for n in layers if n == b or n.startswith(b + ".")] for b in self.blocks}
        outside = [n for n in layers if not any(n in names for names in by_block.values())]
        chained = self._chained(model)
        self.asymmetric = asym = self.config.asymmetric and chained
        calls = self._capture(model, model.get_submodule(self.blocks[0]), slot=0)
        fp_calls = calls  # with asym: the uncompressed model's inputs of the current block
        done = 0
        for i, block_name in enumerate(self.blocks):
            names = by_block[block_name]
            block = model.get_submodule(block_name)
            if i and not chained:  # something runs between blocks: re-run the (compressed) prefix
                calls = self._capture(model, block, slot=i % 2)
            fp_tag = f"f{(i + 1) % 2}_"
            fp_outs, teacher = None, None
            if names:
                # with sequential, later stages see this block's compressed layers, so the original
                # model's stream runs on a copy of the block kept aside
                original = (copy.deepcopy(block) if self.config.sequential else block, fp_calls) if asym else None
                stats = self._statistics(block, block_name, names, calls, original, fp_tag)
                fp_outs = stats.fp_outputs
                if self.config.m_objective == "block" and self.config.m_steps:
                    teacher = fp_outs if asym else self._outputs(block, calls, tag="teacher")
                for k, stage in enumerate(stats.stages if self.config.sequential else [names]):
                    if k:  # the earlier stages are compressed now: measure this one's inputs again
                        stats = self._statistics(block, block_name, stage, calls, original, None)
                    for name in stage:
                        if progress is not None:
                            progress(name, done, len(layers))
                        reports.append(self._compress_named(model, name, layers[name], make_quantizer, report_layer, stats, keep_h))
                        done += 1
                del original
            if teacher is not None:
                if self.config.soft_candidates:
                    self.block_losses[block_name] = self._soft_block_m_step(model, block_name, names, calls, teacher)
                else:
                    self.block_losses[block_name] = self._block_m_step(block, calls, teacher)
            if chained:  # the next block's inputs go to the other slot: this block's are still being read
                if asym and fp_outs is None:  # nothing compressed here: the block is still the original
                    fp_outs = self._outputs(block, fp_calls, tag=fp_tag)
                outs = self._outputs(block, calls, tag=f"x{(i + 1) % 2}_")
                calls = [_Call((out,) + c.args[1:], c.kwargs) for c, out in zip(calls, outs)]
                if asym:
                    fp_calls = [_Call((out,) + c.args[1:], c.kwargs) for c, out in zip(fp_calls, fp_outs)]
        for name in outside:  # layers outside every block (rare): the front door's plain fit
            reports.append(compress_plain(name, layers[name]))
        return reports

    def _compress_named(self, model, name: str, override, make_quantizer, report_layer, stats: "_Stats", keep_h: bool):
        """Compress layer ``name`` with its statistics (towards its asymmetric target when ``stats``
        has a cross term for it), swap it into ``model`` and return its report."""
        start = time.perf_counter()
        module = model.get_submodule(name)
        W = module.weight.detach().clone()
        quantizer = make_quantizer(override)
        H = stats.hessians[name]
        target = W
        if name in stats.crosses and self._hessian_driven(quantizer):
            target = asymmetric_target(W, H, stats.crosses[name], damp=self.config.asym_damp).to(W.dtype)
        qmodule = self._compress_layer(module, quantizer, target, H)
        replace_module(model, name, qmodule)
        if keep_h and qmodule.quantizer.name in CODEBOOK_METHODS:
            self.hessians[name] = H.float()
            self.originals[name] = target
        return report_layer(name, qmodule.quantizer, W, time.perf_counter() - start)

    def _hessian_driven(self, quantizer) -> bool:
        """Does this quantizer's fit use the Hessian (GPTQ, or a codebook with the E-step)?"""
        return "damp" in quantizer.param_defaults() or (quantizer.name in CODEBOOK_METHODS and self.config.e_sweeps > 0)

    def _chained(self, model: nn.Module) -> bool:
        """Is each block's output the next block's first input (LLaMA decoder layers are)?

        Checked on the first batch; when not, each block's inputs are captured by running the model's
        already-compressed prefix again (slower, always right).
        """
        seen: dict[str, tuple] = {}
        handles = []
        for name in self.blocks:

            def hook(_m, args, output, name=name):
                seen[name] = (args[0] if args else None, output[0] if isinstance(output, (tuple, list)) else output)

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(**self.batches[0])
        finally:
            for h in handles:
                h.remove()
        for a, b in zip(self.blocks, self.blocks[1:]):
            out, nxt = seen.get(a, (None, None))[1], seen.get(b, (None, None))[0]
            if not (torch.is_tensor(out) and torch.is_tensor(nxt) and out.shape == nxt.shape and torch.equal(out, nxt)):
                return False
        return True

    def _capture(self, model: nn.Module, first_block: nn.Module, slot: int) -> list[_Call]:
        """The inputs of ``first_block`` for every batch; the first positional tensor (the hidden
        states, the large one) goes to the activation store under slot ``slot``."""
        calls: list[_Call] = []

        def hook(_module, args, kwargs):
            args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            kwargs = _without_cache(kwargs)
            if args and torch.is_tensor(args[0]):
                args = (self.store.put(f"x{slot}_{len(calls)}", args[0]),) + args[1:]
            calls.append(_Call(args, dict(kwargs)))
            raise _Stop

        handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in self.batches:
                    try:
                        model(**batch)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        if len(calls) != len(self.batches):
            raise CompressKitError("a block was not reached by every calibration batch; wrong block names?")
        return calls

    def _run(self, block: nn.Module, call: _Call) -> torch.Tensor:
        """``block``'s (first) output on one captured call."""
        out = block(*(self.store.resolve(a) for a in call.args), **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _outputs(self, block: nn.Module, calls: list[_Call], tag: str | None = None) -> list:
        """Run ``block`` on every call; with ``tag``, store each output as it comes (key tag + index)
        and return their references, else return nothing (a pass for the hooks)."""
        refs = []
        with torch.no_grad():
            for j, c in enumerate(calls):
                out = self._run(block, c)
                if tag is not None:
                    refs.append(self.store.put(f"{tag}{j}", out))
        return refs

    def _statistics(self, block, block_name: str, names: list[str], calls: list[_Call], original, fp_tag: str | None) -> "_Stats":
        """Input statistics of the selected layers ``names`` of ``block`` on the compressed model's
        inputs ``calls``: ``H = X_q^T X_q / N`` per layer, and the layers grouped into stages (layers
        reading the same input tensor, in execution order: q/k/v, o, gate/up, down in LLaMA).

        ``original``: ``(original block, original model's inputs)`` for asymmetric calibration; then
        also ``G = X_q^T X / N`` per layer (``X``: the layer's inputs in the original model) and, with
        ``fp_tag``, the original block's outputs stored under that tag. While both streams are the
        same (the first block, nothing of it compressed yet) ``G == H``: one pass runs and ``crosses``
        stays empty, so the targets are the weights themselves.
        """
        modules = {n: block.get_submodule(n[len(block_name) + 1 :]) if n != block_name else block for n in names}
        accs = {n: HessianAccumulator(math.prod(m.weight.shape[1:]), dtype=torch.float32) for n, m in modules.items()}
        fp_block, fp_calls = original if original is not None else (block, calls)
        dual = fp_calls is not calls or fp_block is not block
        fp_modules = {n: fp_block.get_submodule(n[len(block_name) + 1 :]) if n != block_name else fp_block for n in names} if dual else {}
        cross = {n: torch.zeros_like(a.xtx_) for n, a in accs.items()} if dual else {}
        stash: dict[str, torch.Tensor] = {}
        first_inputs: dict[str, torch.Tensor] = {}  # batch 0's input tensor of each layer, in call order
        running_fp = [False]  # the hooks of both streams may sit on the same modules (fp_block is block)

        def q_hook(name):
            def hook(mod, args):
                if running_fp[0] and dual:
                    return
                first_inputs.setdefault(name, args[0])
                rows = _rows(mod, args[0].detach())
                accs[name].add_batch(rows)
                if dual:
                    cross[name] += rows.T.float() @ stash.pop(name).float()

            return hook

        def fp_hook(name):
            def hook(mod, args):
                if running_fp[0]:
                    stash[name] = _rows(mod, args[0].detach())

            return hook

        handles = [m.register_forward_pre_hook(q_hook(n)) for n, m in modules.items()]
        handles += [m.register_forward_pre_hook(fp_hook(n)) for n, m in fp_modules.items()]
        fp_outs = [] if original is not None and fp_tag is not None else None
        try:
            with torch.no_grad():
                for j, (c, f) in enumerate(zip(calls, fp_calls)):
                    if dual or fp_outs is not None:
                        running_fp[0] = True
                        out = self._run(fp_block, f)
                        running_fp[0] = False
                        if fp_outs is not None:
                            fp_outs.append(self.store.put(f"{fp_tag}{j}", out))
                    if dual or fp_outs is None:
                        self._run(block, c)
        finally:
            for h in handles:
                h.remove()
        stages: list[list[str]] = []
        for name, x in first_inputs.items():
            stage = next((s for s in stages if first_inputs[s[0]] is x), None)
            stage.append(name) if stage is not None else stages.append([name])
        missing = [n for n in names if n not in first_inputs]
        if missing:
            raise CompressKitError(f"calibration: layer {missing[0]} did not run in its block's forward pass")
        return _Stats(
            hessians={n: a.hessian for n, a in accs.items()},
            crosses={n: cross[n] / accs[n].n_samples_ for n in names} if dual else {},
            fp_outputs=fp_outs,
            stages=stages,
        )

    def _compress_layer(self, module: nn.Module, quantizer, W: torch.Tensor, H: torch.Tensor) -> QuantizedModule:
        qcls = qmodule_for(module)
        if qcls is None:
            raise CompressKitError(f"a {type(module).__name__} cannot be compressed; exclude it")
        if "damp" in quantizer.param_defaults():  # GPTQ: the Hessian drives the rounding
            quantizer.fit(W, hessian=H)
        else:
            quantizer.fit(W)
            if quantizer.name in CODEBOOK_METHODS and self.config.e_sweeps:
                from compresskit.calib.estep import e_step

                quantizer.codes_ = e_step(quantizer, W, H, n_sweeps=self.config.e_sweeps, damp=self.config.damp)
                if self.config.local_rounds:
                    from compresskit.calib.codebook import refine_layer

                    refine_layer(quantizer, W, H, rounds=self.config.local_rounds, e_sweeps=self.config.e_sweeps, iters=self.config.cg_iters, damp=self.config.damp)
        return qcls.from_module(module, quantizer)

    # ---- M-steps ----------------------------------------------------------------------------
    @staticmethod
    def _trainable(model: nn.Module) -> list[tuple[nn.Parameter, float]]:
        """Every codebook/pool/row-scale tensor of ``model``'s codebook layers, with its learning-rate
        multiplier. ``lr`` is in weight units (the DPQ setting, 1e-4, is for raw weights): centroids
        of a row-scaled layer live in units of the row scale, so their step is ``lr / mean(scale)``,
        which moves the rebuilt weight about as far as ``lr`` moves an unscaled centroid."""
        params = []
        for module in model.modules():
            if isinstance(module, QuantizedModule) and module.quantizer.name in CODEBOOK_METHODS:
                tensors = module.state_tensors()
                scale = tensors.get("scale_")
                unit = float(scale.float().abs().mean()) if scale is not None else 1.0
                for name, p in tensors.items():
                    if p.is_floating_point():
                        params.append((p, 1.0 if name == "scale_" or not unit > 0 else 1.0 / unit))
        return params

    def _optimise(self, module: nn.Module, loss_fn: Callable[[int], torch.Tensor]) -> float:
        """AdamW on ``module``'s codebooks/pools/row scales for m_steps steps (float32 while training)."""
        trainable = self._trainable(module)
        if not trainable or not self.config.m_steps:
            return float("nan")
        params = [p for p, _ in trainable]
        originals = [p.data for p in params]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        groups = [{"params": [p], "lr": self.config.lr * mult} for p, mult in trainable]
        opt = torch.optim.AdamW(groups, lr=self.config.lr, weight_decay=self.config.weight_decay)
        loss_value = float("nan")
        try:
            for step in range(self.config.m_steps):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(step)
                loss.backward()
                opt.step()
                loss_value = loss.item()
        finally:
            for p, orig in zip(params, originals):
                p.requires_grad_(False)
                p.grad = None
                p.data = p.data.to(orig.dtype)  # stored precision (float16): what is saved is what is evaluated
        return loss_value

    def _block_m_step(self, block: nn.Module, calls: list[_Call], teacher: list[torch.Tensor]) -> float:
        def loss_fn(step: int) -> torch.Tensor:
            j = step % len(calls)
            return (self._run(block, calls[j]) - self.store.resolve(teacher[j])).pow(2).mean()

        return self._optimise(block, loss_fn)

    def _soft_block_m_step(self, model, block_name: str, names: list[str], calls: list[_Call], teacher) -> float:
        """VQ4DiT: train soft candidate assignments and centroids of the block's codebook layers to
        reproduce the uncompressed block; freeze confident subvectors as it goes, then harden."""
        from compresskit.calib.soft import SoftAssignment

        block = model.get_submodule(block_name)
        softs: dict[str, tuple[QuantizedModule, SoftAssignment]] = {}
        for name in names:
            qm = model.get_submodule(name)
            if isinstance(qm, QuantizedModule) and qm.quantizer.name in CODEBOOK_METHODS:
                qm._sync()
                W = qm.quantizer.inverse_transform().float()
                softs[name] = (qm, SoftAssignment(qm.quantizer, W, n_candidates=self.config.soft_candidates))
        if not softs or not self.config.m_steps:
            return float("nan")
        handles = [qm.register_forward_pre_hook(_soft_weight_hook(soft)) for qm, soft in softs.values()]
        tables = [soft.table for _, soft in softs.values()]
        logits = [soft.logits for _, soft in softs.values()]
        opt = torch.optim.AdamW(
            [{"params": tables, "lr": self.config.lr}, {"params": logits, "lr": self.config.logit_lr}],
            weight_decay=self.config.weight_decay,
        )
        loss_value = float("nan")
        try:
            for step in range(self.config.m_steps):
                j = step % len(calls)
                ramp = (step + 1) / self.config.m_steps
                loss = (self._run(block, calls[j]) - self.store.resolve(teacher[j])).pow(2).mean()
                loss_value = loss.item()
                loss = loss + self.config.entropy_weight * ramp * sum(soft.entropy() for _, soft in softs.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if (step + 1) % 10 == 0:
                    for _, soft in softs.values():
                        soft.freeze_confident()
        finally:
            for h in handles:
                h.remove()
        for name, (qm, soft) in softs.items():
            soft.write_back(qm.quantizer)
            replace_module(model, name, type(qm)(qm.quantizer, qm.bias, qm.cache_weight)._adopt(qm))
        return loss_value

    def em_round(self, model: nn.Module) -> float:
        """One whole-model EM round: task-loss M-step, dead-centroid re-init, E-step.

        A layer whose output error (on its calibration Hessian) would rise through the re-init is
        restored and only re-assigned: the E-step never lets the error grow, so the round cannot
        make a layer worse than the M-step left it. With a task loss, the re-init and E-step are
        kept only if the mean calibration loss does not rise through them (else the round ends with
        the M-step's state).

        Returns the last M-step loss (nan without an M-step).
        """
        loss = float("nan")
        if self._distilling():
            loss = self._optimise(model, lambda step: self._m_loss(model, step % len(self.m_batches)))
        elif self.config.m_steps and self.task_loss is not None and self.config.m_objective == "task":
            loss = self._optimise(model, lambda step: self.task_loss(model, self.m_batches[step % len(self.m_batches)]))
        # re-assignment serves each layer's output error, which is not the task loss the M-step just
        # lowered; measured on small models it can undo the M-step, so keep it only if the task agrees
        after_m = self._calibration_loss(model)
        snapshots = {} if after_m is None else {
            name: _snapshot(m) for name, m in model.named_modules() if name in self.originals and isinstance(m, QuantizedModule)
        }
        self._reassign(model)
        if after_m is not None and not self._calibration_loss(model) <= after_m:
            for name, snap in snapshots.items():
                _restore(model.get_submodule(name), snap)
        return loss

    def _calibration_loss(self, model: nn.Module) -> float | None:
        """Mean M-step loss (task or distillation) over the calibration batches (None without one)."""
        if self._distilling():
            _, loss_fn = self.distill
            with torch.no_grad():
                return sum(float(loss_fn(model, b, self.teacher[j])) for j, b in enumerate(self.batches)) / len(self.batches)
        if self.task_loss is None:
            return None
        with torch.no_grad():
            return sum(float(self.task_loss(model, b)) for b in self.batches) / len(self.batches)

    # ---- distillation M-step ----------------------------------------------------------------
    def _distilling(self) -> bool:
        return self.config.m_objective == "distill" and self.config.em_rounds > 0 and self.config.m_steps > 0

    def _take_teacher(self, model: nn.Module) -> None:
        """Record the uncompressed model's predictions on the calibration and M-step batches."""
        targets_fn, _ = self.distill
        with torch.no_grad():
            self.teacher = {j: targets_fn(model, b) for j, b in enumerate(self.batches)}
            same = self.m_batches is self.batches
            self.m_teacher = self.teacher if same else {j: targets_fn(model, b) for j, b in enumerate(self.m_batches)}

    def _m_loss(self, model: nn.Module, j: int) -> torch.Tensor:
        _, loss_fn = self.distill
        return loss_fn(model, self.m_batches[j], self.m_teacher[j])

    def _reassign(self, model: nn.Module) -> None:
        """Dead-centroid re-initialisation and E-step on every codebook layer (guarded per layer)."""
        from compresskit.calib.deadcode import reinit_dead, usage_counts
        from compresskit.calib.estep import e_step, output_error

        for name, module in model.named_modules():
            if name not in self.originals or not isinstance(module, QuantizedModule):
                continue
            module._sync()
            q, W, H = module.quantizer, self.originals[name], self.hessians[name]
            before = output_error(W, q.inverse_transform().float(), H)
            saved = _snapshot(module)
            # the paper's tau_dead counts uses over forward passes: each M-step pass used the current codes once
            usage = usage_counts(q) * max(1, self.config.m_steps)
            reinit_dead(q, W, usage, tau_dead=self.config.tau_dead, seed=self.config.seed)
            module.codes.copy_(e_step(q, W, H, n_sweeps=max(1, self.config.e_sweeps), damp=self.config.damp))
            module._sync()
            if output_error(W, q.inverse_transform().float(), H) > before:
                # with few passes the usage count flags live centroids as dead; never pay for a re-init
                _restore(module, saved)
                module.codes.copy_(e_step(q, W, H, n_sweeps=max(1, self.config.e_sweeps), damp=self.config.damp))


def _snapshot(module: QuantizedModule) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Copies of a compressed module's learned tensors and codes, for :func:`_restore`."""
    return {k: t.detach().clone() for k, t in module.state_tensors().items()}, module.codes.clone()


def _restore(module: QuantizedModule, snapshot: tuple[dict[str, torch.Tensor], torch.Tensor]) -> None:
    """Write a :func:`_snapshot` back in place (the quantizer shares the module's tensors)."""
    tensors, codes = snapshot
    with torch.no_grad():
        for k, t in module.state_tensors().items():
            t.copy_(tensors[k])
        module.codes.copy_(codes)
    module._sync()


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input ``x`` as rows ``[N, n]`` matching ``module.weight.flatten(1)`` (Linear, Conv1d, Conv2d)."""
    if isinstance(module, nn.Conv2d):
        return conv_inputs(x, module)
    if isinstance(module, nn.Conv1d):
        k, pad, stride = module.kernel_size[0], module.padding[0], module.stride[0]
        cols = torch.nn.functional.unfold(x.unsqueeze(-1), (k, 1), padding=(pad, 0), stride=(stride, 1))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _without_cache(kwargs: dict) -> dict:
    """Block kwargs with any KV cache dropped. A cache captured with the inputs (transformers creates
    one unless ``use_cache=False``) would be appended to by every later call of the block, so each
    pass would attend to the keys of earlier passes and autograd would reach into old graphs."""
    kwargs = dict(kwargs)
    for key in ("past_key_values", "past_key_value", "layer_past"):
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _soft_weight_hook(soft):
    """While training soft assignments, the compressed module computes with the soft weight."""

    def hook(module, args):
        module._soft_weight = soft.weight()

    return hook
