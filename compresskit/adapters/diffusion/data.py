"""Fashion-MNIST for the diffusion family: read from the Debian package, padded to 32 x 32, in [-1, 1].

The images come from Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
which installs the four gzipped IDX files of Zalando's release (60 000 training and 10 000 test
28 x 28 greyscale images, 10 classes). Nothing is downloaded. The files are found with
``dpkg -L dataset-fashion-mnist``, or in a directory given as the data source.

Images are padded by 2 pixels of background on every side (28 -> 32, so patch-2 / patch-4 DiTs and
U-Nets with three downsamplings fit, without resampling the pixels) and scaled from [0, 255] to
[-1, 1]: float32 ``[N, 1, 32, 32]``.

Disjointness: calibration draws only from the training split, evaluation reads only the test split.
"""
from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from compresskit.adapters.diffusion.ddpm import CLASS_DROPOUT, Batch, GaussianDiffusion, drop_labels
from compresskit.errors import CompressKitError

PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package puts the files
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label id of "no class" for class dropout and guidance (DiT's convention)
IMAGE_SHAPE = (1, 32, 32)  # [C, H, W] after padding
PAD = 2
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _missing(what: str) -> CompressKitError:
    return CompressKitError(f"Fashion-MNIST {what}: install it with `apt-get install {PACKAGE}` (or pass the directory holding its IDX files)")


def data_dir(source: str | Path | None = None) -> Path:
    """The directory holding the four IDX files: ``source`` if given, else the Debian package's."""
    if source is not None:
        path = Path(source).expanduser()
        if not all((path / name).is_file() for pair in FILES.values() for name in pair):
            raise CompressKitError(f"{path} does not hold Fashion-MNIST's four IDX files ({', '.join(FILES['train'] + FILES['test'])})")
        return path
    return _package_dir()


@lru_cache(maxsize=1)
def _package_dir() -> Path:
    listed: list[str] = []
    if shutil.which("dpkg"):
        run = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True)
        if run.returncode == 0:
            listed = run.stdout.splitlines()
    wanted = FILES["train"][0]
    for line in listed:
        if line.endswith("/" + wanted):
            return Path(line).parent
    if (DEFAULT_DIR / wanted).is_file():
        return DEFAULT_DIR
    raise _missing("is not installed")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not) as a uint8 array: ``[N, 28, 28]`` for images, ``[N]`` for labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:  # 0x08: unsigned bytes, the only type Fashion-MNIST uses
        raise CompressKitError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()}); reinstall {PACKAGE}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise CompressKitError(f"{path} holds {body.size} bytes for shape {shape}; the file is truncated, reinstall {PACKAGE}")
    return body.reshape(shape)


@lru_cache(maxsize=4)
def _split(split: str, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    images, labels = read_idx(directory / images_file), read_idx(directory / labels_file)
    if images.shape[0] != labels.shape[0]:
        raise CompressKitError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels; reinstall {PACKAGE}")
    return images, labels


def to_model_images(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` pixels -> float32 ``[N, 1, 32, 32]`` in [-1, 1] (background -1, 2-pixel pad)."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32))[:, None] / 127.5 - 1.0  # a copy: the IDX buffer is read-only
    return torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)


def load_split(split: str, source: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as ``(images, labels)``: float32 ``[N, 1, 32, 32]`` in [-1, 1] and long ``[N]``.

    ``split``: ``"train"`` (60 000, calibration) or ``"test"`` (10 000, evaluation only).
    """
    if split not in FILES:
        raise CompressKitError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    images, labels = _split(split, data_dir(source))
    return to_model_images(images), torch.as_tensor(labels.astype(np.int64))


def eval_images(n: int | None = None, source: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images and labels (all 10 000 for ``None``), as :func:`load_split`."""
    images, labels = load_split("test", source)
    if n is not None and not 1 <= n <= images.shape[0]:
        raise CompressKitError(f"the Fashion-MNIST test split has {images.shape[0]} images; ask for 1..{images.shape[0]}")
    return (images, labels) if n is None else (images[:n], labels[:n])


def calibration_batches(
    diffusion: GaussianDiffusion,
    n_samples: int,
    *,
    seed: int = 0,
    class_dropout: float = CLASS_DROPOUT,
    source: str | Path | None = None,
) -> list[Batch]:
    """``n_samples`` noised training images as model-call kwargs of one sample each.

    Distinct training images are drawn without replacement (seeded), each noised at a uniform
    timestep of ``diffusion`` with fresh Gaussian noise; labels are dropped to :data:`NULL_CLASS`
    with probability ``class_dropout``. Each batch is ``{"x": float32 [1, 1, 32, 32] (x_t), "t": long
    [1], "y": long [1], "noise": float32 [1, 1, 32, 32]}``: ``noise`` is what ``x_t`` was made with,
    read only by the DDPM loss (:func:`~compresskit.adapters.diffusion.ddpm.batch_loss`; the adapter
    declares it in ``loss_keys`` so it is never passed to the model). The same seed gives the same batches.
    """
    pixels, labels = _split("train", data_dir(source))  # uint8 [60000, 28, 28], [60000]
    if not 1 <= n_samples <= pixels.shape[0]:
        raise CompressKitError(f"calibration draws 1..{pixels.shape[0]} distinct training images, not {n_samples}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(pixels.shape[0], generator=gen)[:n_samples].numpy()
    x0, y = to_model_images(pixels[idx]), torch.from_numpy(labels[idx].astype(np.int64))  # [n, 1, 32, 32], [n]
    t = diffusion.random_timesteps(n_samples, gen)
    noise = torch.randn(x0.shape, generator=gen)
    y = drop_labels(y, NULL_CLASS, class_dropout, gen)
    x_t = diffusion.q_sample(x0, t, noise)
    t_model = diffusion.timesteps[t]
    return [
        {"x": x_t[i : i + 1], "t": t_model[i : i + 1], "y": y[i : i + 1], "noise": noise[i : i + 1]} for i in range(n_samples)
    ]
