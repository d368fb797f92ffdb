import os
import pickle

import numpy as np
import pytest

from still.data.safe_pickle import load_numpy_pickle
from still.errors import StillError


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"data": Payload(marker)}, protocol=2)
    with pytest.raises(StillError, match="refusing to unpickle"):
        load_numpy_pickle(data, "evil.pkl")
    assert not marker.exists()


def test_numpy_pickles_of_both_protocols_load():
    value = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"labels": [1, 2, 3]}
    for protocol in (2, 4, 5):  # (5 stores an array's bytes through numpy's _frombuffer)
        got = load_numpy_pickle(pickle.dumps(value, protocol=protocol), "ok.pkl")
        assert np.array_equal(got[b"data"], value[b"data"]) and got[b"labels"] == [1, 2, 3]


def test_empty_arrays_load_and_bytes_of_a_size_is_refused():
    """Protocol 2 stores an empty Python 3 bytes (an empty array's data) as a call of `bytes()`:
    allowed without arguments only, since `bytes(n)` would allocate n bytes that no file holds."""
    empty = np.zeros((0, 3072), dtype=np.uint8)
    for protocol in (2, 4, 5):
        got = load_numpy_pickle(pickle.dumps({"data": empty}, protocol=protocol), "empty.pkl")
        assert got["data"].shape == (0, 3072)
    for module in (b"__builtin__", b"builtins"):
        sized = b"\x80\x02c" + module + b"\nbytes\nJ\x00\xca\x9a;\x85R."  # bytes(10**9)
        with pytest.raises(StillError, match="big.pkl: refusing to unpickle bytes"):
            load_numpy_pickle(sized, "big.pkl")
        assert load_numpy_pickle(b"\x80\x02c" + module + b"\nbytes\n)R.", "empty.pkl") == b""


def test_truncated_pickle_is_a_clear_error():
    data = pickle.dumps(np.zeros((10, 10)), protocol=2)
    with pytest.raises(StillError, match="half.pkl is not a readable data pickle"):
        load_numpy_pickle(data[: len(data) // 2], "half.pkl")
