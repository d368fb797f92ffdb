"""CIFAR-10 from the standard "python version" batches.

The archive `cifar-10-python.tar.gz` unpacks to `cifar-10-batches-py/` holding `data_batch_1` ..
`data_batch_5` (10,000 images each) and `test_batch`: pickled dicts with `data`, a (10000, 3072)
uint8 array of row-major 32x32 images, red plane then green then blue, and `labels`, a list of
ints in 0..9. The data cannot be fetched here (no package on PyPI ships it); point `load_cifar10`
at a directory that holds the batches. They are read with a NumPy-only unpickler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from still.data.safe_pickle import load_numpy_pickle
from still.errors import StillError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
ARCHIVE = "cifar-10-python.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NORMALIZATIONS = {"mean_std": (MEAN, STD), "half": ((0.5,) * 3, (0.5,) * 3)}
"""The per-channel (mean, std) each normalisation subtracts and divides by: "mean_std", CIFAR-10's
training images'; "half", 0.5 and 0.5 (labml's `Normalize((0.5,) * 3, (0.5,) * 3)`: pixels in [-1, 1])."""


@dataclass(frozen=True)
class Cifar10:
    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, 3, 32, 32) uint8
    test_y: torch.Tensor  # (M,) int64


def _batch_dir(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        if data_dir.is_file() and data_dir.name in (*TRAIN_BATCHES, TEST_BATCH):  # (a probe: told to unpack it)
            raise StillError(f"CIFAR-10 directory {data_dir} is one of the batch files: give the folder that holds "
                             f"them ({data_dir.parent})")
        if data_dir.is_file():
            raise StillError(f"CIFAR-10 directory {data_dir} is a file: unpack it (tar xzf) and give the folder "
                             "cifar-10-batches-py (or the one holding it)")
        raise StillError(f"CIFAR-10 directory {data_dir} does not exist")
    nested = data_dir / "cifar-10-batches-py"
    # (the archive's own folder unless the given one holds every batch and it does not: a probe's empty
    # cifar-10-batches-py, left by a failed unpacking, hid the batches beside it)
    return nested if nested.is_dir() and (_holds_batches(nested) or not _holds_batches(data_dir)) else data_dir


def _holds_batches(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH))


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images (N, 3, 32, 32) uint8, labels (N,) int64), shapes checked."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StillError(f"cannot read {path}: {e.strerror or e}") from None
    batch = load_numpy_pickle(data, str(path))
    if not isinstance(batch, dict):
        raise StillError(f"{path}: expected a dict with 'data' and 'labels', got {type(batch).__name__}")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise StillError(f"{path}: missing 'data' or 'labels' (keys: {', '.join(map(str, batch))})")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except ValueError as e:  # (lists of rows of unequal lengths)
        raise StillError(f"{path}: 'data' and 'labels' must be arrays or lists of equal rows ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise StillError(f"{path}: data has shape {data.shape} and dtype {data.dtype}, expected (N, 3072) uint8")
    if labels.shape != (data.shape[0],):
        raise StillError(f"{path}: labels have shape {labels.shape}, expected ({data.shape[0]},): one for each "
                         "image")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):  # (fractions: cut to whole classes unsaid)
        raise StillError(f"{path}: labels are {labels.dtype}, expected whole numbers 0..9")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise StillError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(data_dir: str | Path) -> Cifar10:
    """Read the five training batches and the test batch from `data_dir` (or its cifar-10-batches-py/)."""
    directory = _batch_dir(Path(data_dir).expanduser())
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (directory / n).is_file()]
    archive = directory / ARCHIVE
    if len(missing) == len(TRAIN_BATCHES) + 1 and archive.is_file():  # (a probe: it said batch files were missing)
        # (the archive holds cifar-10-batches-py/: unpacked into a folder of that name, it nests one deeper,
        # and a review probe was told the same again)
        into = directory.parent if directory.name == "cifar-10-batches-py" else directory
        raise StillError(f"{directory} holds {ARCHIVE}, not unpacked: unpack it (tar xzf {archive} -C {into})")
    if missing:
        raise StillError(f"{directory} is missing CIFAR-10 batch file(s) {', '.join(missing)}; "
                         "expected the python version (data_batch_1..5, test_batch)")
    train = [read_batch(directory / n) for n in TRAIN_BATCHES]
    test_x, test_y = read_batch(directory / TEST_BATCH)
    if not len(test_x):
        raise StillError(f"{directory / TEST_BATCH} holds no images: expected CIFAR-10's 10,000 test images")
    if not sum(len(x) for x, _ in train):
        raise StillError(f"{directory}'s training batches ({', '.join(TRAIN_BATCHES)}) hold no images: "
                         "expected CIFAR-10's 50,000")
    return Cifar10(
        train_x=torch.from_numpy(np.concatenate([x for x, _ in train])),
        train_y=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
    )


def normalize(images: torch.Tensor, normalization: str = "mean_std") -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> float32 standardised per channel (`NORMALIZATIONS`)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS[normalization])
    return (images.float() / 255 - mean) / std
