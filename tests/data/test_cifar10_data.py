import re
import shutil

import pytest
import torch

from conftest import write_cifar_batch
from still.data.cifar10 import load_cifar10, normalize
from still.errors import StillError


def test_loads_the_python_batches(cifar_dir):
    data = load_cifar10(cifar_dir)
    assert data.train_x.shape == (200, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.train_y.shape == (200,) and data.test_x.shape == (50, 3, 32, 32)
    # also accepts the batch directory itself
    assert load_cifar10(cifar_dir / "cifar-10-batches-py").test_y.shape == (50,)
    x = normalize(data.test_x)
    assert x.dtype == torch.float32 and x.abs().max() < 3


def test_the_batches_beside_an_empty_archive_folder_are_read(cifar_dir):
    batches = cifar_dir / "cifar-10-batches-py"
    for path in batches.iterdir():
        path.rename(cifar_dir / path.name)
    assert load_cifar10(cifar_dir).test_y.shape == (50,)  # (the empty folder, a failed unpacking's, hid them)
    shutil.copy(cifar_dir / "test_batch", batches)  # (or one unpacked in part)
    assert load_cifar10(cifar_dir).test_y.shape == (50,)


def test_half_normalization_is_labmls():
    """labml's `Normalize((0.5,) * 3, (0.5,) * 3)`: pixels 0..255 to -1..1; the default stays CIFAR-10's
    mean and std."""
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    torch.testing.assert_close(normalize(pixels, "half")[0, :, 0], torch.tensor([[-1.0, -0.6, 1.0]] * 3))
    torch.testing.assert_close(normalize(pixels)[0, :, 0, 0], -torch.tensor([0.4914, 0.4822, 0.4465])
                               / torch.tensor([0.2470, 0.2435, 0.2616]))


def test_row_major_planes(tmp_path):
    """The 3072 bytes are the red plane, then green, then blue, each 32x32 row-major."""
    import pickle

    import numpy as np

    root = tmp_path
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, 1024 + 32 * 5 + 7] = 200  # green, row 5, column 7
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": data, b"labels": [4]}, protocol=2))
    images = load_cifar10(root).test_x
    assert images[0, 1, 5, 7] == 200 and images.sum() == 200


def test_empty_batches_are_refused_before_any_work(tmp_path):
    """A test batch of no images would otherwise fail at the first prediction, after the teacher
    had trained; training batches of none at all, at the first step."""
    for i in range(1, 6):
        write_cifar_batch(tmp_path / f"data_batch_{i}", 4, seed=i)
    write_cifar_batch(tmp_path / "test_batch", 0, seed=0)
    with pytest.raises(StillError, match="test_batch holds no images"):
        load_cifar10(tmp_path)
    write_cifar_batch(tmp_path / "test_batch", 3, seed=0)
    write_cifar_batch(tmp_path / "data_batch_2", 0, seed=2)  # one empty batch among others is read
    assert load_cifar10(tmp_path).train_x.shape[0] == 16
    for i in range(1, 6):
        write_cifar_batch(tmp_path / f"data_batch_{i}", 0, seed=i)
    with pytest.raises(StillError, match="training batches .* hold no images"):
        load_cifar10(tmp_path)


def test_missing_files_are_named(cifar_dir):
    (cifar_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(StillError, match="missing CIFAR-10 batch file\\(s\\) data_batch_3"):
        load_cifar10(cifar_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(StillError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(StillError, match="is a file: unpack it"):
        load_cifar10(archive)


def test_an_archive_or_a_batch_file_for_the_folder_is_told_what_to_give(cifar_dir, tmp_path):
    """A probe: a folder holding only the archive was told its batch files were missing, and a
    batch file given for the folder was told to unpack it."""
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(StillError, match=r"holds cifar-10-python.tar.gz, not unpacked: unpack it \(tar xzf "
                                         + re.escape(f"{folder / 'cifar-10-python.tar.gz'} -C {folder})")):
        load_cifar10(folder)
    inner = folder / "cifar-10-batches-py"  # (unpacked there, it would nest one deeper: a review probe)
    inner.mkdir()
    (folder / "cifar-10-python.tar.gz").rename(inner / "cifar-10-python.tar.gz")
    with pytest.raises(StillError, match=re.escape(f"tar xzf {inner / 'cifar-10-python.tar.gz'} -C {folder})")):
        load_cifar10(inner)
    batches = cifar_dir / "cifar-10-batches-py"
    with pytest.raises(StillError, match=f"is one of the batch files: give the folder that holds them \\({batches}\\)"):
        load_cifar10(batches / "data_batch_1")


def test_unreadable_batch_is_named(cifar_dir, monkeypatch):
    real = type(cifar_dir).read_bytes

    def read_bytes(self):
        if self.name == "test_batch":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(type(cifar_dir), "read_bytes", read_bytes)
    with pytest.raises(StillError, match="cannot read .*test_batch: Permission denied"):
        load_cifar10(cifar_dir)


def test_wrong_shape_is_named(cifar_dir):
    write_cifar_batch(cifar_dir / "cifar-10-batches-py" / "test_batch", 5, seed=1, shape=(None, 3000))
    with pytest.raises(StillError, match=r"shape \(5, 3000\).*expected \(N, 3072\) uint8"):
        load_cifar10(cifar_dir)


def test_label_count_mismatch(cifar_dir):
    write_cifar_batch(cifar_dir / "cifar-10-batches-py" / "data_batch_1", 5, seed=1, labels_count=4)
    with pytest.raises(StillError, match=r"labels have shape \(4,\), expected \(5,\): one for each image"):
        load_cifar10(cifar_dir)


@pytest.mark.parametrize("field, value, shape", [
    ("labels", [[1], [1, 2], [3], [4], [5]], None),
    ("data", [[0] * 3072, [0] * 3000, [0] * 3072, [0] * 3072, [0] * 3072], None),
    ("labels", [[1], [2], [3], [4], [5]], r"\(5, 1\)"),
])
def test_ragged_or_column_fields_are_named(cifar_dir, field, value, shape):
    """Found by a probe: lists of rows of unequal lengths raised NumPy's ValueError (exit 1), and
    labels as a column were said to be "5 labels for 5 images"."""
    import pickle

    import numpy as np

    batch = {b"labels": list(range(5)), b"data": np.zeros((5, 3072), np.uint8), field.encode(): value}
    path = cifar_dir / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    message = (f"labels have shape {shape}, expected \\(5,\\)" if shape else
               "'data' and 'labels' must be arrays or lists of equal rows")
    with pytest.raises(StillError, match=f"test_batch: {message}"):
        load_cifar10(cifar_dir)


@pytest.mark.parametrize("labels, dtype", [(["cat"] * 5, "<U3"), ([None] * 5, "object"),
                                           ([0.2, 1.7, 2.5, 8.9, 3.0], "float64")])
def test_labels_that_are_not_whole_numbers_are_named(cifar_dir, labels, dtype):
    """Strings and None raised NumPy's own errors (exit 1 from the CLI); fractions were cut to whole
    classes without a word."""
    import pickle

    import numpy as np

    path = cifar_dir / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"labels": labels, b"data": np.zeros((5, 3072), np.uint8)}, protocol=2))
    with pytest.raises(StillError, match=f"test_batch: labels are {dtype}, expected whole numbers 0..9"):
        load_cifar10(cifar_dir)
