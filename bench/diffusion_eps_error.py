"""How far compression moved a diffusion model's one-step prediction: the epsilon error against the FP model.

For noised Fashion-MNIST training images at uniform timesteps (the calibration recipe's data, with its
own seed, so none of the images a model was calibrated on), each compressed directory's epsilon
prediction is compared with the uncompressed model's: the mean squared difference overall and per
timestep range, the difference of the guidance terms ``cfg_scale (eps(y) - eps(null))``, and the
DDPM loss against the true noise (the FP model's own for reference). The sampling-level counterpart is
``fid_source`` (``bench/diffusion_table.py --vs-source``). Issue 13's results page uses it to tell
closeness to the model from closeness to the data.

    PYTHONPATH=. python bench/diffusion_eps_error.py --model fmnist-dit DIR [DIR ...]
"""
from __future__ import annotations

import argparse

import torch

BINS = (0, 100, 300, 600, 1000)


def main(argv: list[str] | None = None) -> None:
    from compresskit.adapters import adapter_for
    from compresskit.adapters.diffusion import data as fmnist
    from compresskit.adapters.diffusion.ddpm import CFG_SCALE, GaussianDiffusion
    from compresskit.io import load_compressed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fmnist-dit", help="the uncompressed model the directories were compressed from")
    p.add_argument("dirs", nargs="+", help="compressed model directories")
    p.add_argument("--n", type=int, default=512, help="noised images")
    p.add_argument("--seed", type=int, default=123, help="data seed (the calibration presets draw with seed 0)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    adapter = adapter_for(args.model)()
    fp = adapter.fmnist_denoiser(adapter.load(args.model), "the epsilon error")
    batches = fmnist.calibration_batches(GaussianDiffusion.linear(), args.n, seed=args.seed, class_dropout=0.0, source=None)
    x, t, y, noise = (torch.cat([b[k] for b in batches]) for k in ("x", "t", "y", "noise"))
    null = torch.full_like(y, fmnist.NULL_CLASS)
    c = x.shape[1]
    with torch.no_grad():
        ref, ref_null = fp(x, t, y)[:, :c], fp(x, t, null)[:, :c]
        print(f"FP {args.model}: DDPM loss {float(((ref - noise) ** 2).mean()):.5f} on {args.n} images (seed {args.seed})")
        print("| model | eps error vs FP | guidance-term error | DDPM loss | " + " | ".join(f"t in [{lo}, {hi})" for lo, hi in zip(BINS, BINS[1:])) + " |")
        print("|---|---|---|---|" + "---|" * (len(BINS) - 1))
        for directory in args.dirs:
            loaded, dir_adapter = load_compressed(directory)
            model = dir_adapter.fmnist_denoiser(loaded, "the epsilon error")
            out, out_null = model(x, t, y)[:, :c], model(x, t, null)[:, :c]
            err = ((out - ref) ** 2).flatten(1).mean(1)
            guidance = float(((CFG_SCALE * ((out - out_null) - (ref - ref_null))) ** 2).mean())
            bins = " | ".join(f"{float(err[(t >= lo) & (t < hi)].mean()):.5f}" for lo, hi in zip(BINS, BINS[1:]))
            print(f"| {directory} | {float(err.mean()):.5f} | {guidance:.5f} | {float(((out - noise) ** 2).mean()):.5f} | {bins} |", flush=True)


if __name__ == "__main__":
    main()
