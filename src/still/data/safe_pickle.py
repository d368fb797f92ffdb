"""Loading the NumPy pickles that MNIST and CIFAR-10 ship as, without letting them run code.

`pickle.load` will call any importable function a file names. These data sets only ever need
NumPy's array reconstruction, so the unpickler below allows exactly those globals and refuses
everything else with a `StillError`.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

from still.errors import StillError

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()`, as protocol 2 stores an empty Python 3 bytes (an empty array's data); with any
    argument refused (`bytes(n)` would allocate n bytes no file holds)."""
    if args:
        raise StillError("refusing to unpickle bytes(...) with arguments: only NumPy arrays are allowed in data files")
    return b""


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # how pickle protocol 5 stores an array (it refuses object arrays, which could hold anything)
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores Python 3 bytes
    ("__builtin__", "bytes"): _empty_bytes,  # ... and empty ones
    ("builtins", "bytes"): _empty_bytes,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise StillError(f"refusing to unpickle {module}.{name}: "
                             "only NumPy arrays are allowed in data files") from None


def load_numpy_pickle(data: bytes, source: str) -> Any:
    """Unpickle `data` (Python 2 or 3 pickles of NumPy arrays, lists, dicts) safely."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except StillError as e:
        raise StillError(f"{source}: {e}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise StillError(f"{source} is not a readable data pickle ({type(e).__name__}: {e})") from None
