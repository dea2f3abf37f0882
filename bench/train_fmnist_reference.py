"""Train the project's reference diffusion models on Fashion-MNIST: a class-conditional DiT and a UNet2DModel DDPM.

    apt-get install -y dataset-fashion-mnist
    PYTHONPATH=. python bench/train_fmnist_reference.py --model dit  --checkpoint /tmp/dit.ckpt  --resume --sample-grid dit.png --eval
    PYTHONPATH=. python bench/train_fmnist_reference.py --model unet --checkpoint /tmp/unet.ckpt --resume --sample-grid unet.png --eval

Both learn epsilon with the DDPM loss of :meth:`GaussianDiffusion.loss` (linear schedule, 1000 steps)
on the 60 000 training images (32 x 32, [-1, 1], :func:`data.load_split`), labels dropped to the null
class 10 with probability 0.1 (classifier-free guidance). AdamW (lr 2e-4, no weight decay, grad
norm clipped at 1), an EMA of the weights (decay 0.999, warmed up as ``min(decay, (1+s)/(10+s))``);
**the EMA weights are what is saved**, in float32 safetensors (``--save-dtype float16`` halves the
file), with a JSON config next to them.

* ``dit``: :class:`compresskit.adapters.diffusion.dit.DiT`, patch 4 (64 tokens), hidden 128, depth 6,
  4 heads, ``in_channels`` 1, ``num_classes`` 10 (+1 null row), no learned sigma (sample with
  ``fixed_small``): 1.87M parameters, 7.5 MB float32 (hidden 192 would be 4.0M, 16 MB).
* ``unet``: diffusers ``UNet2DModel(block_out_channels=(32, 64, 96), layers_per_block=1,
  DownBlock2D, DownBlock2D, AttnDownBlock2D, num_class_embeds=11)`` (class 10 is the null class),
  called as ``unet(x, t, class_labels=y).sample`` through :class:`UNetEps`: 1.81M parameters, 7.2 MB
  float32.

Both models run in ``eval()`` mode while training: neither has dropout or batch norm, and DiT's own
label drop (which reads the global RNG when ``self.training``) would otherwise drop labels a second
time on top of the seeded drop of the loss.

Measured seconds per step at batch 64 (torch 2.13.0 CPU, ``--time-steps 5..8``, after 2 warm-up steps),
on the project's 2-core machine, which was SHARED with other agents (load average 1-3.5 while
measuring): the lower figure of each pair is from a quiet moment, the upper from a busy one; two
threads suffer most when the other cores are busy.

| model | 1 thread | 2 threads |
|---|---|---|
| dit (p4, h128, d6) | 0.50 - 0.55 | 0.27 - 0.33 (4.7 when busy) |
| unet (32, 64, 96) | 1.43 | 0.74 (3.9 - 8.4 when busy) |
| unet (32, 64, 128), attention at 16 and 8 px | 1.84 | 1.1 - 1.5 |

Plan (``DEFAULTS``): batch 64; dit 20 000 steps (21 epochs, ~1.7 h at 0.31 s on 2 quiet threads),
unet 9 000 steps (9.6 epochs, ~1.9 h at 0.74 s). On a busy machine ``--threads 1`` is the safer
choice (dit ~3 h, unet ~3.6 h); checkpoints make a run survive being stopped.

Resumable: with ``--checkpoint PATH`` the model, the EMA, AdamW's state, the step, the loss generator's
state (timesteps, noise, label drop) and torch's global RNG state are written every
``--checkpoint-every`` steps and at the end (``torch.save`` to ``PATH.tmp`` then ``os.replace``, so a kill never leaves half a file; read back
with ``torch.load(weights_only=True)``); ``--resume`` continues from it, bit-identically on the same
device and thread count. The data order is a per-epoch permutation seeded by ``(seed, epoch)``, so
it needs no state. ``--init-from WEIGHTS`` starts a second stage from weights this script wrote (its
EMA becomes both the model and the EMA, AdamW starts afresh, the step count goes on from the file's,
the loss generator is seeded by ``(seed, step)``), for when a first stage's checkpoint is gone; the
JSON keeps the earlier stage's ``training`` record under ``training.previous``. ``--device cuda`` trains on a GPU when one is there (the noise is still drawn
on the CPU generator, so the run is the same random process).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from compresskit.adapters.diffusion.data import CLASS_NAMES, IMAGE_SHAPE, NULL_CLASS, NUM_CLASSES, load_split
from compresskit.adapters.diffusion.ddpm import CFG_SCALE, CLASS_DROPOUT, GaussianDiffusion
from compresskit.adapters.diffusion.dit import DiT, DiTConfig
from compresskit.errors import CompressKitError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "compresskit" / "adapters" / "diffusion" / "weights"
FORMAT_VERSION = 1
# per model: architecture and the run plan (batch, steps) measured for ~2 h on 2 CPU threads
DEFAULTS = {
    "dit": {"batch": 64, "steps": 20000, "hidden": 128, "depth": 6, "heads": 4, "patch": 4},
    "unet": {"batch": 64, "steps": 9000, "channels": "32,64,96"},
}


class UNetEps(nn.Module):
    """A diffusers ``UNet2DModel`` with the family's model interface: ``(x [B, 1, H, W], t [B] long,
    y [B] long, 10 = no class) -> eps [B, 1, H, W]``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=y).sample


def unet_config(channels: tuple[int, ...]) -> dict:
    """The ``UNet2DModel`` keyword arguments: one resnet per level, self-attention only at the lowest
    resolution (8 x 8 for three levels; attention at 16 x 16 made a step 1.5x slower)."""
    n = len(channels)
    return {
        "sample_size": IMAGE_SHAPE[1], "in_channels": 1, "out_channels": 1, "block_out_channels": list(channels),
        "layers_per_block": 1, "down_block_types": ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1), "attention_head_dim": min(32, channels[-1]),
        "norm_num_groups": min(32, min(channels)), "num_class_embeds": NUM_CLASSES + 1,
    }


def build_model(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """The model (our interface) and the JSON description of its architecture."""
    if args.model == "dit":
        cfg = DiTConfig(input_size=IMAGE_SHAPE[1], patch_size=args.patch, in_channels=IMAGE_SHAPE[0], hidden_size=args.hidden,
                        depth=args.depth, num_heads=args.heads, mlp_ratio=4.0, class_dropout_prob=CLASS_DROPOUT,
                        num_classes=NUM_CLASSES, learn_sigma=False)
        return DiT(cfg), {"architecture": "dit", "model": cfg.to_dict()}
    from diffusers import UNet2DModel

    kwargs = unet_config(tuple(int(c) for c in args.channels.split(",")))
    return UNetEps(UNet2DModel(**kwargs)), {"architecture": "unet2d", "model": kwargs}


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in the layout the loader expects: DiT's own names, or diffusers' names for the UNet (no ``unet.`` prefix)."""
    inner = model.unet if isinstance(model, UNetEps) else model
    return {k: v.detach().float().cpu().contiguous() for k, v in inner.state_dict().items()}


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


class Trainer:
    """The whole training state: model, EMA, optimizer, step and the two generators."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        torch.manual_seed(args.seed)  # initial weights
        self.model, self.description = build_model(args)
        self.model.to(device).eval()  # eval: no dropout / batch norm in either; stops DiT's second label drop
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.step = 0
        self.loss_gen = torch.Generator().manual_seed(args.seed + 1)  # timesteps, noise, label drop
        self.diffusion = GaussianDiffusion.linear()
        images, labels = load_split("train")  # [60000, 1, 32, 32] float32, [60000] long
        n = args.train_limit or labels.numel()
        self.images, self.labels = images[:n], labels[:n]
        self._perm_epoch, self._perm = -1, None
        self.previous = None  # the earlier stage's training record, with --init-from

    def init_from(self, path: Path) -> None:
        """Start a second stage from weights :func:`write_weights` wrote: they become the model and the
        EMA, AdamW stays fresh, the step count goes on from theirs and the loss generator is reseeded
        by ``(seed, step)`` so the stage does not replay the first stage's noise."""
        from safetensors.torch import load_file

        config = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        if config.get("architecture") != self.description["architecture"]:
            raise CompressKitError(f"--init-from {path} holds a {config.get('architecture')} model, not --model {self.args.model}'s")
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        target = self.model.unet if isinstance(self.model, UNetEps) else self.model
        target.load_state_dict(state)
        self.ema.load_state_dict(self.model.state_dict())
        self.step = int(config["training"]["steps"])
        self.loss_gen.manual_seed((self.args.seed + 1) * 1_000_003 + self.step)
        self.previous = config["training"]

    def batch_indices(self, step: int) -> torch.Tensor:
        """Step ``step``'s images: a slice of the permutation of its epoch, seeded by ``(seed, epoch)``."""
        b = self.args.batch
        per_epoch = max(self.labels.numel() // b, 1)
        epoch = step // per_epoch
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.labels.numel(), generator=torch.Generator().manual_seed(self.args.seed * 100_003 + epoch))
            self._perm_epoch = epoch
        k = step % per_epoch
        return self._perm[k * b : (k + 1) * b]

    def train_step(self) -> float:
        idx = self.batch_indices(self.step)
        x0, y = self.images[idx].to(self.device), self.labels[idx]
        loss = self.diffusion.loss(self.model, x0, y, null_class=NULL_CLASS, generator=self.loss_gen, class_dropout=CLASS_DROPOUT)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        ema_update(self.ema, self.model, min(self.args.ema_decay, (1 + self.step) / (10 + self.step)))
        return loss.item()

    # ---- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        state = {
            "format_version": FORMAT_VERSION, "model_kind": self.args.model, "step": self.step,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
            "loss_gen": self.loss_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "previous": json.dumps(self.previous),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: the old checkpoint stays whole until the new one is complete

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state.get("model_kind") != self.args.model:
            raise CompressKitError(f"{path} is a checkpoint of --model {state.get('model_kind')}, not {self.args.model}; pass the matching --model")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.loss_gen.set_state(state["loss_gen"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step = int(state["step"])
        self.previous = json.loads(state.get("previous", "null"))


def write_weights(trainer: Trainer, out: Path, final_loss: float | None) -> Path:
    """The EMA weights as float32 safetensors at ``out`` and their JSON config at ``out`` with ``.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    a = trainer.args
    dtype = getattr(torch, a.save_dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in saved_state(trainer.ema).items()}
    save_file(state, str(out), metadata={"script": "bench/train_fmnist_reference.py", "step": str(trainer.step)})
    config = {
        "format_version": FORMAT_VERSION, **trainer.description, "weights": out.name, "dtype": a.save_dtype, "ema": True,
        "num_classes": NUM_CLASSES, "null_class": NULL_CLASS, "image_shape": list(IMAGE_SHAPE), "prediction": "epsilon",
        "schedule": {"kind": "linear", "num_timesteps": trainer.diffusion.num_steps}, "variance": "fixed_small",
        "training": {"steps": trainer.step, "batch": a.batch, "lr": a.lr, "ema_decay": a.ema_decay, "seed": a.seed,
                     "class_dropout": CLASS_DROPOUT, "final_loss": final_loss, "train_images": trainer.labels.numel(),
                     "device": trainer.device.type},
    }
    if trainer.previous is not None:
        config["training"]["previous"] = trainer.previous
    out.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


@torch.no_grad()
def sample_grid(model: nn.Module, path: Path, per_class: int, seed: int, device: torch.device) -> None:
    """A PNG with one row per class (:func:`compresskit.grid.image_grid`, names under the pictures),
    ``per_class`` samples each: 50 respaced steps, CFG 1.5."""
    from compresskit.grid import image_grid, save_png

    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class).to(device)
    x = GaussianDiffusion.linear().respaced(50).sample(model, y, IMAGE_SHAPE, null_class=NULL_CLASS, cfg_scale=CFG_SCALE, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(x, [CLASS_NAMES[c] for c in y.tolist()], columns=per_class), path, overwrite=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(DEFAULTS), required=True)
    p.add_argument("--steps", type=int, help="total optimizer steps (default: the model's plan in DEFAULTS)")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, help="dit: hidden size")
    p.add_argument("--depth", type=int, help="dit: blocks")
    p.add_argument("--heads", type=int, help="dit: attention heads")
    p.add_argument("--patch", type=int, help="dit: patch size (2 or 4)")
    p.add_argument("--channels", help="unet: block_out_channels, comma-separated")
    p.add_argument("--train-limit", type=int, default=0, help="train on the first N training images only (tests)")
    p.add_argument("--checkpoint", type=Path, help="write the training state here every --checkpoint-every steps and at the end")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--init-from", type=Path, help="start from weights this script wrote (a second stage: fresh AdamW, the step count goes on)")
    p.add_argument("--out", type=Path, help="EMA weights (default: weights/fmnist_<model>.safetensors); the config goes next to it as .json")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default="float32", help="dtype of the saved EMA weights")
    p.add_argument("--no-save", action="store_true", help="do not write the weights (timing runs)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps (after 2 warm-up steps) and print seconds per step")
    p.add_argument("--sample-grid", type=Path, help="PNG: a 10-class grid from the EMA model (50 steps, CFG 1.5)")
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--eval", action="store_true", help="print fid / is of the EMA model (metrics.evaluate_sampler)")
    p.add_argument("--eval-samples", type=int, default=200)
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.resume and args.checkpoint is None:
        p.error("--resume needs --checkpoint PATH")
    if args.init_from is not None and not args.init_from.with_suffix(".json").is_file():
        p.error(f"--init-from {args.init_from}: no weights with a .json config there")
    if args.out is None:
        args.out = WEIGHTS_DIR / f"fmnist_{args.model}.safetensors"
    return args


def main(argv: list[str] | None = None) -> Trainer:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked, but no CUDA device is available: training on the CPU")
    device = torch.device("cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    trainer = Trainer(args, device)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters ({n_params * 4 / 1e6:.1f} MB float32), batch {args.batch}, {args.steps} steps, {device}, {args.threads} threads")
    if args.time_steps:
        for _ in range(2):
            trainer.train_step()
        start = time.perf_counter()
        for _ in range(args.time_steps):
            trainer.train_step()
        print(f"seconds per step: {(time.perf_counter() - start) / args.time_steps:.3f}")
        return trainer
    if args.resume and args.checkpoint.is_file():
        trainer.load_checkpoint(args.checkpoint)
        print(f"resumed from {args.checkpoint} at step {trainer.step}")
    elif args.init_from is not None:
        trainer.init_from(args.init_from)
        print(f"second stage from {args.init_from} at step {trainer.step}")
    start, losses, loss = time.perf_counter(), [], None  # None: resumed at --steps, no step run
    while trainer.step < args.steps:
        loss = trainer.train_step()
        losses.append(loss)
        if trainer.step % args.log_every == 0 or trainer.step == args.steps:
            mean = sum(losses) / len(losses)
            print(f"step {trainer.step}: loss {mean:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            losses = []
        if args.checkpoint and (trainer.step % args.checkpoint_every == 0 or trainer.step == args.steps):
            trainer.save_checkpoint(args.checkpoint)
    print("final loss " + ("- (no step run)" if loss is None else f"{loss:.4f}"))
    if not args.no_save:
        print(f"wrote {write_weights(trainer, args.out, loss)} and its .json")
    if args.sample_grid:
        sample_grid(trainer.ema, args.sample_grid, args.grid_per_class, args.seed, device)
        print(f"wrote {args.sample_grid}")
    if args.eval:
        from compresskit.adapters.diffusion.metrics import evaluate_sampler

        result = evaluate_sampler(trainer.ema, steps=50, n_samples=args.eval_samples, effnet=False, device=device)
        print(f"fid {result['fid']:.2f}  is {result['is']:.3f}  ({args.eval_samples} samples, 50 steps, CFG {CFG_SCALE})")
    return trainer


if __name__ == "__main__":
    main()
