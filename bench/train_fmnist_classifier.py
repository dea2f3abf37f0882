"""Train the small Fashion-MNIST classifier that the diffusion family's ``fid`` and ``is`` are measured with.

    apt-get install -y dataset-fashion-mnist
    PYTHONPATH=. python bench/train_fmnist_classifier.py            # writes compresskit/adapters/diffusion/weights/fmnist_classifier.safetensors
    PYTHONPATH=. python bench/train_fmnist_classifier.py --sanity --effnet-samples 2000   # the metrics' sanity numbers

:class:`compresskit.adapters.diffusion.metrics.FMNISTClassifier` (156k parameters) on the 60 000
training images (padded to 32 x 32, in [-1, 1], as the diffusion models see them): Adam at 1e-3,
the last epoch at 3e-4, batch 128, 4 epochs, no augmentation, seed 0, 1 CPU thread (on the shared
2-core machine two threads were 3x slower). Only the training split is read for training; the
test split is used once, at the end, for the accuracy below.

Measured (torch 2.13 CPU, the first command): 158 s, final training loss 0.177, test accuracy
0.9176 (9176 / 10 000). The weights are saved in float32 with safetensors (612 KB; ``--out`` to
write elsewhere), the accuracy and the settings in the file's metadata.

Sanity numbers of the metrics with these weights (``--sanity``; noise is N(0, 1) clipped to [-1, 1]):

| measure | value |
|---|---|
| ``fid``, test[:5000] vs test[5000:] | 0.81 |
| ``fid``, noise (5000) vs test[5000:] | 501.1 |
| ``is``, the 10 000 test images (1 split / 10 splits) | 8.17 / 8.14 (at most 10) |
| ``is``, noise | 1.35 |
| ``fid_effnet``, test[:n] vs test[5000:5000+n] at 224 x 224, n = 500 / 2000 | 29.5 / 8.29 |
| ``fid_effnet``, noise vs test, n = 500 / 2000 | 320.6 / 318.4 |

``fid_effnet`` estimates 1280 x 1280 covariances, so with few samples its floor (two halves of one
distribution) is far from 0 and falls as n grows: compare it only at equal sample counts. The
2000-image run took 453 s on one thread of the shared machine (6000 images through the network).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from compresskit.adapters.diffusion.data import load_split
from compresskit.adapters.diffusion.metrics import WEIGHTS, FMNISTClassifier


@torch.no_grad()
def accuracy(model: FMNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(1000), labels.split(1000)))
    return right / labels.numel()


def sanity(effnet_samples: int) -> None:
    """The metrics' sanity numbers with the shipped classifier: two disjoint halves of the test split
    (small), the test split against clipped Gaussian noise (large), the IS-style score of the test split."""
    from compresskit.adapters.diffusion.metrics import classifier_outputs, effnet_features, effnet_missing, fid_from_features, inception_score

    test_x, _ = load_split("test")  # [10000, 1, 32, 32]
    noise = torch.randn(test_x.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    feats, probs = classifier_outputs(test_x)
    noise_feats, noise_probs = classifier_outputs(noise)
    print(f"fid, test[:5000] vs test[5000:]: {fid_from_features(feats[:5000], feats[5000:]):.3f}")
    print(f"fid, noise[:5000] vs test[5000:]: {fid_from_features(noise_feats[:5000], feats[5000:]):.1f}")
    print(f"is, test (10000, 1 split): {inception_score(probs):.3f}; 10 splits: {inception_score(probs, 10):.3f}; noise: {inception_score(noise_probs):.3f}")
    if effnet_samples:
        reason = effnet_missing()
        if reason:
            print(f"fid_effnet skipped: {reason}")
            return
        n = effnet_samples
        start = time.perf_counter()
        a, b, c = effnet_features(test_x[:n]), effnet_features(test_x[5000 : 5000 + n]), effnet_features(noise[:n])
        print(f"fid_effnet ({n} vs {n}, 224 x 224), test halves: {fid_from_features(a, b):.2f}; noise vs test: {fid_from_features(c, b):.1f} "
              f"({time.perf_counter() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--sanity", action="store_true", help="only print the metrics' sanity numbers with the shipped weights")
    parser.add_argument("--effnet-samples", type=int, default=0, help="with --sanity: images per set for fid_effnet (0: skip)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.sanity:
        sanity(args.effnet_samples)
        return
    torch.manual_seed(args.seed)
    images, labels = load_split("train")  # [60000, 1, 32, 32], [60000]
    model = FMNISTClassifier()
    steps_per_epoch = (labels.numel() + args.batch - 1) // args.batch
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # the last epoch at a lower rate: a cheap, deterministic anneal
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [steps_per_epoch * max(args.epochs - 1, 1)], gamma=0.3)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(labels.numel(), generator=gen)
        total = 0.0
        for step, idx in enumerate(order.split(args.batch)):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}: train loss {total / (step + 1):.4f} ({time.perf_counter() - start:.0f} s)")

    test_x, test_y = load_split("test")
    acc = accuracy(model, test_x, test_y)
    print(f"test accuracy {acc:.4f} ({round(acc * test_y.numel())} / {test_y.numel()})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"test_accuracy": f"{acc:.4f}", "epochs": str(args.epochs), "seed": str(args.seed), "script": "bench/train_fmnist_classifier.py"}
    save_file(state, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
