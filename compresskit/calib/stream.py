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
(AdamW on every codebook/pool with the task loss, or the distance to the uncompressed model's
predictions), dead-centroid re-initialisation, and an E-step; those M-steps live in ``mstep.py``.
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
from compresskit.calib.mstep import CODEBOOK_METHODS, MSteps
from compresskit.calib.offload import ActivationStore
from compresskit.errors import CompressKitError
from compresskit.nn import QuantizedModule, qmodule_for
from compresskit.rewrite import replace_module

Batch = dict[str, torch.Tensor]


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


class BlockwiseCalibrator(MSteps):
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
        self.block_losses: dict[str, float] = {}  # block M-step: its last loss
        # relative squared error of each compressed block's output against the original model's
        # (asymmetric walk) or the uncompressed block's on the same inputs (block M-step's teacher)
        self.block_errors: dict[str, float] = {}
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
        for r in range(self.config.em_rounds):
            self.em_round(model, progress=progress, label=f"EM round {r + 1}/{self.config.em_rounds}")
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
        done, last = 0, ""  # last: the latest block's output error, shown beside each layer name
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
                            progress(name + last, done, len(layers))
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
                reference = fp_outs if asym else teacher
                if names and reference is not None:
                    self.block_errors[block_name] = err = self._relative_error(outs, reference)
                    last = f"  ({block_name} output error {err:.3g})"
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

    def _relative_error(self, outs: list, reference: list) -> float:
        """``sum |out - ref|^2 / sum |ref|^2`` over the calibration batches (stored references)."""
        num = den = 0.0
        for o, r in zip(outs, reference):
            o, r = self.store.resolve(o).float(), self.store.resolve(r).float()
            num += float((o - r).pow(2).sum())
            den += float(r.pow(2).sum())
        return num / den if den > 0 else float("nan")

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
