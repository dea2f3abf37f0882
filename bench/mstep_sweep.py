"""Task-loss M-step settings, compared from one saved walk (the walk runs once, not per setting).

Loads a model saved by ``compresskit quantize`` (its default preset ``fast``: the block walk, no EM
round), runs the calibrator's task-loss M-step (AdamW on every codebook and row scale, next-token
loss) with the given settings, and prints one JSON line: the settings, the loss every few steps, and
perplexity on the pydoc evaluation slice and on each ``--eval-extra`` text. It leaves out the EM
round's re-init and E-step (``bench/smollm2_rd.py --em-rounds 1`` runs the whole round).

    compresskit quantize --method pq --bits 1 --param pool=false --param row_scale=true --out /tmp/pq1
    python bench/mstep_sweep.py /tmp/pq1 --m-steps 64 --m-batch 2 --m-samples 64 --lr 5e-4

The settings become a :class:`~compresskit.CalibrationConfig` with ``m_objective`` ``--objective``
and one EM round (the round whose M-step this runs); the M-step's sequences are drawn with
``--seed`` (not the config's ``seed + 1``, as the whole round would), so rows stay comparable with
``docs/smollm2_mstep_sweep.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a compressed-model directory written by `compresskit quantize`")
    p.add_argument("--m-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--m-samples", type=int, default=16, help="calibration sequences the M-step trains on")
    p.add_argument("--m-batch", type=int, default=8, help="sequences per AdamW step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="window draw (the walk's own sequences are seed 0)")
    p.add_argument("--norm-lr", type=float, default=0.0, help="> 0: also train the (dense) norm weights at this lr")
    p.add_argument("--objective", choices=["task", "distill"], default="task",
                   help="next-token loss, or KL to the uncompressed model's top-64 next-token distribution")
    p.add_argument("--model", default=None, help="the uncompressed model, for --objective distill (default: smollm2-135m)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-extra", action="append", default=[], metavar="FILE", help="also evaluate on this text")
    args = p.parse_args()

    from compresskit import CalibrationConfig
    from compresskit.calib.calibrator import Calibrator, batched
    from compresskit.io import load_compressed

    torch.manual_seed(0)
    loaded, adapter = load_compressed(args.path)
    model = loaded.model
    spec = adapter.calib_spec(None, args.m_samples, args.seed, options={"seq_len": args.seq_len})
    batches = batched(adapter.calibration_batches(loaded, spec), args.m_batch)
    config = CalibrationConfig(
        m_objective=args.objective, em_rounds=1, m_steps=args.m_steps, lr=args.lr, m_samples=args.m_samples,
        m_batch=args.m_batch, options={"seq_len": args.seq_len},
    ).validated()
    distill = (adapter.distill_targets, adapter.distill_loss) if args.objective == "distill" else None
    calibrator = Calibrator(adapter.blocks(model), batches, adapter.task_loss, config, m_batches=batches, distill=distill,
                            clean=adapter.clean_block_call)
    teacher = {}
    if args.objective == "distill":
        fp = adapter.load(args.model).model
        teacher = {j: adapter.distill_targets(fp, b) for j, b in enumerate(batches)}
        del fp
    norms = [q for n, q in model.named_parameters() if "norm" in n] if args.norm_lr > 0 else []
    objective = calibrator.model_objective
    codebooks = objective.trainable
    objective.trainable = lambda m: codebooks(m) + [(q, args.norm_lr / args.lr) for q in norms]
    losses: list[float] = []

    def loss_fn(step: int) -> torch.Tensor:
        j = step % len(batches)
        loss = adapter.distill_loss(model, batches[j], teacher[j]) if teacher else adapter.task_loss(model, batches[j])
        losses.append(round(loss.item(), 4))
        return loss

    def eval_spec(source: str | None):
        return adapter.eval_spec(source, options={"eval_tokens": args.eval_tokens})

    t0 = time.perf_counter()
    objective.optimise(model, loss_fn)
    seconds = time.perf_counter() - t0
    for q in norms:
        q.requires_grad_(False)
    row = {
        "path": args.path, "m_steps": args.m_steps, "lr": args.lr, "m_samples": args.m_samples, "m_batch": args.m_batch,
        "norm_lr": args.norm_lr, "objective": args.objective, "seconds_m_step": round(seconds, 1),
        "losses": losses[:: max(1, len(losses) // 8)] + losses[-1:],
        "perplexity": adapter.evaluate(loaded, eval_spec(None))["perplexity"],
        "perplexity_extra": {src.rsplit("/", 1)[-1]: adapter.evaluate(loaded, eval_spec(src))["perplexity"] for src in args.eval_extra},
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
