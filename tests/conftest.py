import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

# MKL's products in a fixed order whatever the number of rows (set before PyTorch first calls it): by
# default its AVX2 code (Intel processors without AVX-512) sums them in an order that depends on it,
# and after four Adam steps a run split in two shards lay 3e-5 from the whole batch's, against 2e-8
# with this (an emulated Haswell, docs/performance.md, session 34). The tests check the splitting.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("STILL_PROGRESS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _aot_cache(tmp_path_factory):
    """Compiled packages (still.train.aot, still.compressive.native) go to directories of this test run,
    never the user's cache."""
    from still.compressive import native
    from still.train import aot

    with pytest.MonkeyPatch.context() as patch:
        root, built = tmp_path_factory.mktemp("aot"), tmp_path_factory.mktemp("native")
        patch.setattr(aot, "cache_root", lambda: root)
        patch.setattr(native, "cache_root", lambda: built)  # the hand-written decoding step, built once a run
        _emulated(patch, native, aot)
        yield root


@pytest.fixture(autouse=True, scope="session")
def _corpus_cache(tmp_path_factory):
    """Encoded corpora (still.data.encoded) go to a directory of this test run, for this process and
    the ones it starts (torchrun's), never the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("corpora")
        patch.setenv("STILL_CORPUS_CACHE", str(root))
        yield root


def _emulated(patch: pytest.MonkeyPatch, native, aot) -> None:
    """Under `scripts/emulated_tests.sh` (this process on an emulated processor, whose /proc/cpuinfo
    is still the host's): the hand-written libraries built with STILL_TEST_TUNE, as `-march=native`
    would build them there, and the compiled packages' compiling process run under the same emulator
    (STILL_TEST_EMULATOR; PyTorch there chooses its code for the emulated processor)."""
    tune, emulator = os.environ.get("STILL_TEST_TUNE"), os.environ.get("STILL_TEST_EMULATOR")
    if tune is not None:
        patch.setattr(native, "TUNE", tuple(tune.split()))
    if extra := os.environ.get("STILL_TEST_CFLAGS"):  # every build's, after its own (scripts/sanitized_tests.sh)
        patch.setattr(native, "FLAGS", (*native.FLAGS, *extra.split()))
    if emulator:
        def popen(args, **kwargs):
            if args[0] == sys.executable:
                args = [*emulator.split(), *args]
            return subprocess.Popen(args, **kwargs)

        patch.setattr(aot, "subprocess", SimpleNamespace(Popen=popen, PIPE=subprocess.PIPE, DEVNULL=subprocess.DEVNULL))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


def write_cifar_batch(path: Path, n: int, seed: int, labels_count: int | None = None, shape=(None, 3072)) -> None:
    """A CIFAR-10 python-version batch: a protocol-2 pickle of a dict with bytes keys, as the
    official archive holds (written by Python 2's cPickle; the layout is the same)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=labels_count if labels_count is not None else n).tolist()
    data = rng.integers(0, 256, size=(n, shape[1]), dtype=np.uint8)
    # make the classes learnable: brighten a class-dependent stripe
    for i, y in enumerate(labels[:n]):
        data[i, y * 300 : y * 300 + 300] = 255
    batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        write_cifar_batch(root / f"data_batch_{i}", 40, seed=i)
    write_cifar_batch(root / "test_batch", 50, seed=99)
    return tmp_path


@pytest.fixture
def reads(monkeypatch):
    """The names of the corpus files read from now on (`still.data.text._read`'s calls)."""
    import still.data.text as text

    read, real = [], text._read
    monkeypatch.setattr(text, "_read", lambda path, byte_level: read.append(path.name) or real(path, byte_level))
    return read


HAMLET = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of six small text documents of different lengths (a corpus for the language model)."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (folder / f"doc{i}.txt").write_text((HAMLET * (3 + i))[i * 7 :])
    return folder


def mnist_available() -> bool:
    from still.data.cache import cache_dir
    from still.data.mnist import MNIST_FILE

    return MNIST_FILE.path(cache_dir()).is_file()


def shakespeare_available() -> bool:
    from still.data.cache import cache_dir
    from still.data.text import SHAKESPEARE_FILE

    return SHAKESPEARE_FILE.path(cache_dir()).is_file()


requires_mnist = pytest.mark.skipif(not mnist_available(),
                                    reason="MNIST cache missing: run `make data` (make test does)")
requires_shakespeare = pytest.mark.skipif(not shakespeare_available(),
                                          reason="Shakespeare cache missing: run `make data` (make test does)")


@pytest.fixture(params=["AMX tiles", "AVX-512 bf16"])
def bf16_products(request):
    """The bf16 attention kernels (`native_attention.cpp`) with their products on AMX tiles, then on
    AVX-512 bf16's dot products; each skipped where it cannot run here."""
    from still.compressive import native

    if native.attention_library() is None:
        pytest.skip("the bf16 attention kernels cannot run here (no compiler or no AVX-512 bf16)")
    try:
        if native.allow_tiles(request.param == "AMX tiles") != request.param:
            pytest.skip(f"the bf16 attention kernels' products cannot run on {request.param} here")
        yield request.param
    finally:
        native.allow_tiles(True)
