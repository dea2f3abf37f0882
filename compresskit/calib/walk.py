"""The walk: compress targets block by block (or layer by layer) with their input statistics.

Three shapes, chosen from the model (``docs/calibration.md``):

* **chained blocks** (each block's output is the next one's input, as in LLaMA): the inputs of block 0
  are captured once; after a block is compressed, its *compressed* outputs are the next block's
  inputs. The original model's activations are carried beside them, so each layer can aim at the
  uncompressed model's outputs (asymmetric targets). Only one block's inputs are held at a time.
* **unchained blocks** (a U-Net's skip connections): every block's inputs are captured from the
  uncompressed model with hooks in one forward pass per batch, then each block is compressed on its
  own inputs; nothing re-runs a prefix of the model per block.
* **no blocks**: one pass accumulates ``X^T X`` for every target, then each is fitted.

Inside a block, hooks accumulate ``X^T X`` for every target layer (GPTQ's streaming ``add_batch``;
activations themselves are never stored), layers are compressed stage by stage (layers reading the
same input: q/k/v, o, gate/up, down in LLaMA), each with :func:`objectives.fit_layer`. Targets with
no input activations (embedding tables, bare tensors) are fitted on their weights alone.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from compresskit.calib.capture import Call, capture_calls, is_chained, layer_rows, run_call
from compresskit.calib.hessian import HessianAccumulator, asymmetric_target, banded_product
from compresskit.calib.offload import ActivationStore
from compresskit.calib.objectives import fit_layer, uses_statistics
from compresskit.calib.sharded import SharedFits, StepPartials
from compresskit.errors import CompressKitError
from compresskit.nn import quantize_tensor
from compresskit.targets import Target


@dataclass
class ChainState:
    """Where a chained walk stands between blocks: the next block's index and its calls on the
    compressed model's stream (``calls``) and the original model's (``fp_calls``, the same list
    without asymmetric targets)."""

    next_block: int
    calls: list[Call]
    fp_calls: list[Call]


# how the walk holds a block's uncompressed copy while its layers are compressed: called with the
# block's name and the block (not yet compressed), it returns an opener whose context gives the copy
OriginalBlock = Callable[[str, nn.Module], Callable[[], ContextManager[nn.Module]]]


class StageFinder:
    """Groups layers into stages (layers reading the same input tensor, in call order) as their forward
    hooks see their inputs, the first time each layer runs.

    It holds only weak references: an input is not kept alive for the rest of the pass (the MLP
    down projection's input of one 8 x 512-token call is 180 MB at LLaMA-2-7B width). An input that
    has been freed cannot be the tensor a later layer reads, so a dead reference never matches.
    """

    def __init__(self) -> None:
        self.stages: list[list[str]] = []
        self._inputs: list[weakref.ref] = []  # each stage's input tensor
        self._seen: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._seen

    def see(self, name: str, x: torch.Tensor) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        for stage, ref in zip(self.stages, self._inputs):
            if ref() is x:
                stage.append(name)
                return
        self.stages.append([name])
        self._inputs.append(weakref.ref(x))


def keep_copy(block_name: str, block: nn.Module) -> Callable[[], ContextManager[nn.Module]]:
    """The default :data:`OriginalBlock`: a copy of the block kept in memory until the block is done."""
    return _opener(copy.deepcopy(block))


def _opener(module: nn.Module) -> Callable[[], ContextManager[nn.Module]]:
    """An opener that gives ``module`` itself."""
    return lambda: contextlib.nullcontext(module)


@dataclass
class _Stats:
    """What :meth:`Walk._statistics` measured on one block."""

    hessians: dict[str, torch.Tensor]
    crosses: dict[str, torch.Tensor]
    fp_outputs: list | None
    stages: list[list[str]]
    targets: dict[str, Target] | None = None  # by name, for a distributed walk
    groups: list[list[str]] | None = None  # the layers compressed together with these statistics


class Walk:
    """The walk over one model's blocks (or layers), on the calibration ``batches``.

    ``blocks``: block names in execution order (empty: layer by layer); ``clean``: the adapter's
    ``clean_block_call``; ``block_objective``: trains a block's codebooks when ``config.m_objective``
    is ``"block"``. ``hessians`` / ``originals`` are filled for codebook targets when EM rounds
    follow (what their E-step aims at). Measured as it goes: ``block_errors`` (each compressed
    block's relative output error against the original model's, or the block objective's teacher),
    ``block_losses`` (the block M-step's last loss), ``asymmetric`` (whether asymmetric targets were used).
    ``original_block`` (an :data:`OriginalBlock`) holds the uncompressed block that the original
    model's stream runs on while a block is compressed in stages: a copy in memory by default; a
    streamed run reads it again from the checkpoint for each pass instead, so it costs memory only
    while a statistics pass runs.

    ``comm`` (a :class:`~compresskit.distributed.Comm`; None: one process): this rank runs the blocks
    on its share of the batches, the statistics are combined in batch order, and each layer is
    fitted by its owner rank and shared (``docs/distributed.md``).
    """

    def __init__(self, config, blocks, batches, clean, block_objective, hessians: dict, originals: dict, comm=None):
        self.config, self.blocks, self.batches, self.clean = config, list(blocks), list(batches), clean
        self.comm = comm
        self.n_batches = len(self.batches)  # in all, over every rank
        if comm is not None:
            if self.n_batches < comm.world:
                raise CompressKitError(
                    f"{comm.world} processes need at least {comm.world} calibration batches, got {self.n_batches}; "
                    "use fewer processes, more samples or a smaller batch_size"
                )
            self.batches = comm.share(self.batches)
            self.shared = SharedFits(comm)
        self.block_objective = block_objective
        self.hessians, self.originals = hessians, originals
        self.block_errors: dict[str, float] = {}
        self.block_losses: dict[str, float] = {}
        self.asymmetric = False
        self.store = ActivationStore()  # replaced for each run by one honouring offload_dir
        self.original_block: OriginalBlock = keep_copy

    def run(self, model: nn.Module, targets: list[Target], plan, compress_plain, report, progress=None) -> list:
        """Compress every target that ``plan(target)`` gives a quantizer for (None keeps it dense);
        ``compress_plain(target)`` fits one from its weight alone, ``report(...)`` describes one."""
        self.begin(plan, compress_plain, report, progress, total=len(targets))
        with ActivationStore(self.config.offload_dir) as self.store:
            return self._walk(model, targets)

    def _walk(self, model: nn.Module, targets: list[Target]) -> list:
        reports: list = []
        with_inputs = [t for t in targets if t.layout.inputs != "none"]
        plain = [t for t in targets if t.layout.inputs == "none"]
        if not self.blocks:
            reports += self._walk_layers(model, with_inputs)
        else:
            by_block = {b: [t for t in with_inputs if t.owner == b or t.owner.startswith(b + ".")] for b in self.blocks}
            inside = {t.name for ts in by_block.values() for t in ts}
            plain += [t for t in with_inputs if t.name not in inside]  # layers outside every block: weights only
            if is_chained(model, self.blocks, self.batches[0]):
                reports += self._walk_chained(model, by_block)
            else:
                reports += self._walk_unchained(model, by_block)
        for target in plain:
            reports.append(self._plain(model, target))
        return [r for r in reports if r is not None]

    # ---- the three shapes ---------------------------------------------------------------------
    def _walk_chained(self, model: nn.Module, by_block: dict[str, list[Target]]) -> list:
        reports = []
        state = self.chain_start(model)
        for block_name in self.blocks:
            reports += self.chain_step(model, state, by_block[block_name])
        return reports

    # ---- the chained walk, one block at a time (streaming compression drives these) ------------
    def begin(self, plan, compress_plain, report, progress=None, total: int = 0, done: int = 0) -> None:
        """Set what a walk calls (see :meth:`run`) without running one; :meth:`run` does this itself.
        ``total`` / ``done``: targets in all and already compressed, for ``progress``."""
        self._compress_plain, self._report = compress_plain, report
        self._plan, self._progress, self._done, self._total, self._last = plan, progress, done, total, ""

    def chain_start(self, model: nn.Module) -> "ChainState":
        """Capture the first block's inputs on every calibration batch (the blocks before it unused)."""
        self.asymmetric = self.config.asymmetric
        calls = self._capture(model, [self.blocks[0]], tag="x")[0]
        return ChainState(0, calls, calls)  # with asym, the original model's stream starts as the same calls

    def chain_step(self, model: nn.Module, state: "ChainState", targets: list[Target]) -> list:
        """Compress block ``state.next_block``'s ``targets`` and move ``state`` to the next block's
        inputs (its compressed outputs, and the original model's beside them with asymmetric targets)."""
        i = state.next_block
        block_name, asym = self.blocks[i], self.asymmetric
        block = model.get_submodule(block_name)
        calls, fp_calls = state.calls, state.fp_calls
        fp_tag = f"f{(i + 1) % 2}_"
        reports, fp_outs, teacher = [], None, None
        if targets:
            # with sequential, later stages see this block's compressed layers, so the original
            # model's stream runs on a copy of the block kept aside
            if asym:
                opener = self.original_block(block_name, block) if self.config.sequential else _opener(block)
                original = (opener, fp_calls)
            else:
                original = None
            reports, fp_outs, teacher = self._compress_block(model, block, block_name, targets, calls, original, fp_tag)
        if asym and fp_outs is None:  # nothing compressed here: the block is still the original
            fp_outs = self._outputs(block, fp_calls, tag=fp_tag)
        outs = self._outputs(block, calls, tag=f"x{(i + 1) % 2}_")
        reference = fp_outs if asym else teacher
        if targets and reference is not None:
            self._record_error(block_name, outs, reference)
        state.calls = [c.with_input(out) for c, out in zip(calls, outs)]
        state.fp_calls = [c.with_input(out) for c, out in zip(fp_calls, fp_outs)] if asym else state.calls
        state.next_block = i + 1
        return reports

    def _walk_unchained(self, model: nn.Module, by_block: dict[str, list[Target]]) -> list:
        if self.comm is not None:
            raise CompressKitError("unchained blocks (a block's output is not the next one's input) cannot be calibrated distributed yet; run it in one process (no torchrun)")
        self.asymmetric = False
        wanted = [b for b in self.blocks if by_block[b]]
        all_calls = self._capture(model, wanted, tag="u") if wanted else []
        reports = []
        for block_name, calls in zip(wanted, all_calls):
            block = model.get_submodule(block_name)
            r, _, teacher = self._compress_block(model, block, block_name, by_block[block_name], calls, None, None)
            reports += r
            if teacher is not None:
                self._record_error(block_name, self._outputs(block, calls, tag="o"), teacher)
        return reports

    def _walk_layers(self, model: nn.Module, targets: list[Target]) -> list:
        self.asymmetric = False
        if not targets:
            return []
        calls = [[Call((), dict(b)) for b in self.batches]]
        stats = self._statistics(model, "", targets, calls[0], None, None, whole_model=True)
        return [self._compress_target(model, t, stats) for t in targets]

    # ---- one block ----------------------------------------------------------------------------
    def _compress_block(self, model, block, block_name, targets: list[Target], calls, original, fp_tag):
        """Compress a block's targets stage by stage; returns (reports, original outputs, teacher)."""
        reports = []
        by_name = {t.name: t for t in targets}
        # sequential: only the first stage's statistics are used from the first pass (later stages
        # are measured again once the earlier ones are compressed), so the stages are found first
        # and the first pass holds one stage's X^T X, not the whole block's
        stages = self._stages(block, block_name, targets, calls) if self.config.sequential else [[t.name for t in targets]]
        stats = self._statistics(block, block_name, [by_name[n] for n in stages[0]], calls, original, fp_tag)
        fp_outs = stats.fp_outputs
        teacher = None
        if self.config.m_objective == "block":
            teacher = fp_outs if original is not None else self._outputs(block, calls, tag="teacher")
        for k, stage in enumerate(stages):
            if k:  # the earlier stages are compressed now: measure this one's inputs again
                stats = self._statistics(block, block_name, [by_name[n] for n in stage], calls, original, None)
            for name in stage:
                reports.append(self._compress_target(model, by_name[name], stats))
        if teacher is not None:
            if self.config.soft_candidates:
                self.block_losses[block_name] = self.block_objective.train_soft(model, block_name, list(by_name), calls, teacher, self.store)
            else:
                self.block_losses[block_name] = self.block_objective.train(block, calls, teacher, self.store)
        return reports, fp_outs, teacher

    def _stages(self, block: nn.Module, block_name: str, targets: list[Target], calls: list[Call]) -> list[list[str]]:
        """``targets`` grouped into stages (layers reading the same input tensor, in execution order),
        from one forward pass on the first calibration call."""
        finder = StageFinder()

        def hook(name):
            return lambda mod, args: finder.see(name, args[0])

        handles = [block.get_submodule(t.owner[len(block_name) + 1 :]).register_forward_pre_hook(hook(t.name)) for t in targets]
        try:
            with torch.no_grad():
                run_call(block, calls[0], self.store)
        finally:
            for h in handles:
                h.remove()
        missing = [t.name for t in targets if t.name not in finder]
        if missing:
            raise CompressKitError(f"calibration: layer {missing[0]} did not run in its block's forward pass")
        return finder.stages

    def _compress_target(self, model: nn.Module, target: Target, stats: _Stats):
        """Fit ``target``'s quantizer with its statistics (towards its asymmetric target when ``stats``
        has a cross term for it), put it in place and return its report."""
        self._tick(target.name)

        def fit(t: Target, quantizer) -> tuple[torch.Tensor, torch.Tensor]:
            """Fit ``quantizer`` for ``t``; returns (its weight, the weight it aimed at)."""
            W = t.layout.to_rows(getattr(model.get_submodule(t.owner), t.attr)).detach().clone()
            H = stats.hessians[t.name]
            goal = W
            if t.name in stats.crosses and uses_statistics(quantizer, self.config):
                # popped: the cross term is used once, and its [n, n] is freed inside asymmetric_target
                goal = asymmetric_target(W, H, stats.crosses.pop(t.name), damp=self.config.asym_damp).to(W.dtype)
            fit_layer(quantizer, goal, H, self.config)
            return W, goal

        if self.comm is not None:  # distributed: the owner rank fits the layers of the group, every rank places them
            def fit_and_report(t: Target, quantizer):
                begin = time.perf_counter()
                W, _ = fit(t, quantizer)
                return self._report(t, quantizer, W, time.perf_counter() - begin)

            group = next(g for g in stats.groups if target.name in g)
            quantizer, report = self.shared.take(target, [stats.targets[n] for n in group], self._plan, fit_and_report)
            if quantizer is not None:
                quantize_tensor(model.get_submodule(target.owner), target.attr, quantizer, target.layout)
            return report
        quantizer = self._plan(target)
        if quantizer is None:
            return None
        start = time.perf_counter()
        owner = model.get_submodule(target.owner)
        W, goal = fit(target, quantizer)
        H = stats.hessians[target.name]
        quantize_tensor(owner, target.attr, quantizer, target.layout)
        if self.config.em_rounds > 0 and quantizer.supports_codebook_update:
            self.hessians[target.name] = H.float()
            self.originals[target.name] = goal
        return self._report(target, quantizer, W, time.perf_counter() - start)

    def _plain(self, model: nn.Module, target: Target):
        self._tick(target.name)
        return self._compress_plain(target)

    def _tick(self, name: str) -> None:
        if self._progress is not None:
            self._progress(name + self._last, self._done, self._total)
        self._done += 1

    def _record_error(self, block_name: str, outs: list, reference: list) -> None:
        self.block_errors[block_name] = err = self._relative_error(outs, reference)
        self._last = f"  ({block_name} output error {err:.3g})"

    # ---- passes -------------------------------------------------------------------------------
    def _capture(self, model: nn.Module, blocks: list[str], tag: str) -> list[list[Call]]:
        return capture_calls(model, [model.get_submodule(b) for b in blocks], self.batches, self.store, tag, self.clean)

    def _outputs(self, block: nn.Module, calls: list[Call], tag: str | None = None) -> list:
        """Run ``block`` on every call; with ``tag``, store each output (key tag + index) and return refs."""
        refs = []
        with torch.no_grad():
            for j, c in enumerate(calls):
                out = run_call(block, c, self.store)
                if tag is not None:
                    refs.append(self.store.put(f"{tag}{j}", out))
        return refs

    def _relative_error(self, outs: list, reference: list) -> float:
        """``sum |out - ref|^2 / sum |ref|^2`` over the calibration batches (stored references)."""
        num = den = 0.0
        terms = []  # a distributed walk's per-batch terms, summed in the global batch order
        for o, r in zip(outs, reference):
            o, r = self.store.resolve(o).float(), self.store.resolve(r).float()
            if self.comm is not None:
                terms.append([float((o - r).pow(2).sum()), float(r.pow(2).sum())])
                continue
            num += float((o - r).pow(2).sum())
            den += float(r.pow(2).sum())
        if self.comm is not None:
            for n, d in self.comm.in_global_order(terms):
                num += n
                den += d
        return num / den if den > 0 else float("nan")

    def _statistics(self, block, block_name: str, targets: list[Target], calls: list[Call], original, fp_tag, whole_model=False) -> _Stats:
        """Input statistics of ``targets`` (layers of ``block``) on the compressed model's inputs ``calls``:
        ``H = X_q^T X_q / N`` per layer, and the layers grouped into stages (layers reading the same
        input tensor, in execution order).

        ``original``: ``(opener of the original block, original model's inputs)`` for asymmetric calibration; then
        also ``G = X_q^T X / N`` per layer (``X``: the layer's inputs in the original model) and, with
        ``fp_tag``, the original block's outputs stored under that tag. While both streams are the
        same (the first block, nothing of it compressed yet) ``G == H``: one pass runs and ``crosses``
        stays empty, so the targets are the weights themselves.
        """
        def sub(root, t: Target) -> nn.Module:
            return root.get_submodule(t.owner if whole_model else t.owner[len(block_name) + 1 :])

        opener, fp_calls = original if original is not None else (_opener(block), calls)
        with opener() as fp_block:
            return self._statistics_on(block, fp_block, sub, targets, calls, fp_calls, original is not None, fp_tag, whole_model)

    def _statistics_on(self, block, fp_block, sub, targets, calls, fp_calls, has_original, fp_tag, whole_model) -> _Stats:
        """:meth:`_statistics` with the original block open (``fp_block``; ``block`` itself without asymmetric targets)."""
        modules = {t.name: (t, sub(block, t)) for t in targets}
        accs = {n: HessianAccumulator(math.prod(t.weight_shape[1:]), dtype=torch.float32) for n, (t, _) in modules.items()}
        dual = fp_calls is not calls or fp_block is not block
        fp_modules = {n: (t, sub(fp_block, t)) for n, (t, _) in modules.items()} if dual else {}
        cross = {n: torch.zeros_like(a.xtx_) for n, a in accs.items()} if dual else {}
        stash: dict[str, torch.Tensor] = {}
        finder = StageFinder()  # the stages, from the inputs each layer reads on its first call
        running_fp = [False]  # the hooks of both streams may sit on the same modules (fp_block is block)
        parts = StepPartials() if self.comm is not None else None
        # lock-step: in a distributed walk every rank takes part in each step's combination, with or without a batch
        n_steps = len(calls) if self.comm is None else self.comm.steps(self.n_batches)

        def q_hook(name, target):
            def hook(mod, args):
                if running_fp[0] and dual:
                    return
                finder.see(name, args[0])
                rows = layer_rows(mod, target.layout, args[0].detach())
                if parts is not None:  # distributed: added in the global batch order after the step
                    parts.add(name, accs[name].partial(rows), banded_product(rows.float(), stash.pop(name).float()) if dual else None)
                    return
                accs[name].add_batch(rows)
                if dual:  # in bands, as the distributed partials are made: the same sum, no [n, n] temporary
                    banded_product(rows.float(), stash.pop(name).float(), into=cross[name])

            return hook

        def fp_hook(name, target):
            def hook(mod, args):
                if running_fp[0]:
                    stash[name] = layer_rows(mod, target.layout, args[0].detach())

            return hook

        handles = [m.register_forward_pre_hook(q_hook(n, t)) for n, (t, m) in modules.items()]
        handles += [m.register_forward_pre_hook(fp_hook(n, t)) for n, (t, m) in fp_modules.items()]
        fp_outs = [] if has_original and fp_tag is not None else None
        try:
            with torch.no_grad():
                for j in range(n_steps):
                    if j < len(calls):
                        c, f = calls[j], fp_calls[j]
                        if dual or fp_outs is not None:
                            running_fp[0] = True
                            out = run_call(fp_block, f, self.store)
                            running_fp[0] = False
                            if fp_outs is not None:
                                fp_outs.append(self.store.put(f"{fp_tag}{j}", out))
                            del out  # not alive through the compressed stream's pass (a [B, T, D] block output)
                        if dual or fp_outs is None:
                            run_call(block, c, self.store)
                    if parts is not None:
                        parts.combine(self.comm, accs, cross, ran=j < len(calls))
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in modules if n not in finder]
        if missing:
            raise CompressKitError(f"calibration: layer {missing[0]} did not run in its block's forward pass")
        stages = finder.stages
        if self.comm is not None:  # every rank walks rank 0's stages (the ones one process finds on batch 0)
            stages = self.comm.broadcast_object(stages, 0)
        # divided in place (the same values as a.hessian and cross / N): no second [n, n] per layer
        crosses = {n: cross.pop(n).div_(accs[n].n_samples_) for n in modules} if dual else {}
        return _Stats(
            hessians={n: a.take_hessian() for n, a in accs.items()},
            crosses=crosses,
            fp_outputs=fp_outs,
            stages=stages,
            targets={n: t for n, (t, _) in modules.items()},
            groups=stages if self.config.sequential and not whole_model else [list(modules)],
        )
