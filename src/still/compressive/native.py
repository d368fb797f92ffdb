"""The decoding step written by hand for the CPU (`native_step.cpp`), built once per machine.

    step = NativeStep(decoder, threads)               # `decode.Decoder` built with compile=True, native=False
    logits = step(tokens, counters, compress)          # (B, 1, V), the buffers advanced in place
    tokens = step(tokens, counters, compress, uniform, sampling)   # (B,): the draw too

The same step as `decode._step` / `_step_and_compress` and `sampling.next_token`, over the
decoder's own ring buffers (the compiled layout: keys and position tables in blocks of 16 slots),
with the matrices packed in blocks of 16 output rows (the feed-forward's second in blocks of up to
128, `down_width`: the step reads it only for the hidden units that are not zero). Why
(docs/performance.md, session 18): at batch 1 the compiled step of a small model is bound by
OpenMP's barriers (68 a step at d_model 128) and by matrix-vector loops at about 1.3 multiply-adds
a cycle; this one has 2 barriers a layer and vertical multiply-adds, on threads of its own.

The source is compiled with the machine's C++ compiler (`$CXX`, else g++, c++ or clang++;
`-O3 -march=native`) into `<cache>/native/<key>/`, keyed on the source, the compiler (its file), the
flags and the processor, checked against the size and SHA-256 recorded at its build (one cut short
or emptied is built again: loaded, it crashed the process), and loaded with ctypes: a step is one
foreign call with a few integers (no PyTorch headers to compile: a build takes seconds). A build
interrupted (Ctrl-C, SIGTERM) ends its compiler and removes its files; one whose process is killed
outright (SIGKILL) ends its compiler itself, and the next process to build or load one removes its
files. Where no compiler works, `library()` says why once and returns None, and the decoder uses
the ahead-of-time compiled step (`still.train.aot`) instead
(with `generate(compile=None)`, what `still lm generate` does by default: eager steps).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from still.compressive.sampling import TINY, Sampling
from still.train.io import atomic_write_bytes, atomic_write_text, process_alive, sha256_file, temporary_of
from still.train.progress import log

if TYPE_CHECKING:
    from still.compressive.decode import Decoder

SOURCE = Path(__file__).with_name("native_step.cpp")
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread")
TUNE = ("-march=native",)  # tried first; without it where the compiler does not know it
MAX_THREADS = 4  # more threads than this split a small step's products too thin (not measured beyond 2 cores)
# (also the most the bf16 attention kernel takes a call)
SPIN_NS = 200_000  # how long the helper threads spin for the next step before they sleep
BARRIER_SPIN_NS = 50_000  # how long a thread spins at a barrier for the others before it sleeps (another
# process competing for the cores may have descheduled one: spinning on, a step took 35 ms, sleeping 0.8)
RETRY_FAILED_S = 24 * 3600  # a build that failed is tried again this long after (not at every start: a compiler
# that refuses -march=native would cost every process seconds)
KILLED = re.compile(r"\bKilled\b|terminated program|due to signal")  # a compiler killed (g++'s, clang's words)
COMPRESS_GROUPS = 8  # the most compressing steps whose compressions are computed together
_COMPRESSIONS = {None: 0, "conv": 1, "dilated": 1, "max": 2, "mean": 3}
_LIBRARY: list[ctypes.CDLL | None] = []
_LIBRARY_LOCK = threading.Lock()
STEP_LIBRARY = "decoding step and prompt attention"  # what `SOURCE` builds, as messages name it
ATTENTION_SOURCE = Path(__file__).with_name("native_attention.cpp")
# once built: the attention library as loaded, where its bf16 kernels run here, where its fp32 ones do (else None)
_ATTENTION: list[ctypes.CDLL | None] = []
_ATTENTION_LOCK = threading.Lock()  # a sharded step's threads reach their first attention together
_ATTENTION_UNSAID: dict[str, str] = {}  # why the bf16 or fp32 kernels cannot run here, till said
DROPOUT_SOURCE = Path(__file__).parent.parent / "native_dropout.cpp"
_DROPOUT: list[ctypes.CDLL | None] = []
_DROPOUT_LOCK = threading.Lock()


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library(fallback: str = "the compiled one") -> ctypes.CDLL | None:
    """The built and loaded step (built at the first call of the process where not cached); None,
    with the reason printed once (and the first caller's `fallback`, what runs instead), where it
    cannot be built."""
    with _LIBRARY_LOCK:  # (evaluation's shards may reach their first prompt attention together)
        if not _LIBRARY:
            try:
                _LIBRARY.append(_load(_build()))
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                log(f"the hand-written {STEP_LIBRARY} are unavailable ({error}); using {fallback}")
                _LIBRARY.append(None)
        return _LIBRARY[0]


def attention_library() -> ctypes.CDLL | None:
    """The bf16 training attention's kernels (`native_attention.cpp`), built at the first call of the
    process where not cached; None, with the reason said once, where they cannot run here (no
    compiler, or a processor without AVX-512 bf16). Their products run on AMX tiles where the
    processor and system allow, else on AVX-512 bf16's dot products (`attention_products`)."""
    return _attention("bf16")


def _attention(precision: str) -> ctypes.CDLL | None:
    """The attention library where its `precision` ("bf16" or "fp32") kernels run here, else None,
    with the reason said at the first call for that precision (a run says what it loses, not what
    another precision would)."""
    with _ATTENTION_LOCK:
        if not _ATTENTION:
            lib, lost = None, None
            try:
                lib = _load_attention(_build(ATTENTION_SOURCE, "attention kernels"))
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                lost = str(error)  # (both precisions' kernels)
            _ATTENTION.append(lib)
            bf16 = lib is not None and lib.still_attention_available() == 0
            _ATTENTION.append(lib if bf16 else None)
            fp32 = lib is not None and lib.still_attention_fp32_available() == 0
            _ATTENTION.append(lib if fp32 else None)
            _ATTENTION_UNSAID.clear()
            if lib is None:
                _ATTENTION_UNSAID.update(bf16=lost, fp32=lost)
            elif not bf16:  # (an fp32 kernel this build lacks, a processor without AVX2 or NEON: PyTorch's, unsaid)
                _ATTENTION_UNSAID["bf16"] = "no AVX-512 bf16 in the compiler's target for this processor"
        reason, lib = _ATTENTION_UNSAID.pop(precision, None), _ATTENTION[1 if precision == "bf16" else 2]
    if reason is not None:
        then = ("bf16 training rounds the attention scores to bf16" if precision == "bf16"
                else "fp32 training takes PyTorch's products")
        log(f"the {precision} attention kernels are unavailable ({reason}); {then}")
    return lib


def attention_products() -> str | None:
    """What the bf16 attention kernels' products run on here: "AMX tiles", "AVX-512 bf16" (the
    `vdpbf16ps` dot products, where the processor has no AMX, the system refuses the tile data, or
    `allow_tiles(False)`), or None where the kernels cannot run."""
    lib = attention_library()
    if lib is None:
        return None
    return "AMX tiles" if lib.still_attention_tiles() == 1 else "AVX-512 bf16"


def allow_tiles(allow: bool) -> str | None:
    """Let the bf16 attention kernels use AMX tiles where they can (True, the default), or make them
    take AVX-512 bf16's dot products everywhere (False: tests compare the two on AMX machines).
    Process-wide; -> `attention_products()` after the change."""
    lib = attention_library()
    if lib is not None:
        lib.still_attention_allow_tiles(int(allow))
    return attention_products()


def attention_fp32_library() -> ctypes.CDLL | None:
    """The same library where its fp32 training attention (`still_attention_weights_fp32` and
    `still_attention_grads_fp32`: AVX-512, or AVX2 and ARM's NEON with FMA) can run here; else None
    (fp32 training then takes PyTorch's products; said once where the library cannot be built)."""
    return _attention("fp32")


def dropout_library() -> ctypes.CDLL | None:
    """`still.layers.dropout`'s kernels (`native_dropout.cpp`: dropout, after a ReLU or before a
    residual add, in one pass each way), built at the first call of the process where not cached;
    None, with the reason said once, where they cannot be built (then the PyTorch path, the same
    bits). AVX-512 kernels where the compiler's target has AVX-512, else portable ones
    (`still_dropout_avx512` says which)."""
    with _DROPOUT_LOCK:
        if not _DROPOUT:
            lib, reason = None, None
            try:
                lib = ctypes.CDLL(str(_build(DROPOUT_SOURCE, "dropout kernels")))
                p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
                _declare(lib, still_dropout_avx512=[], still_dropout=[p, i, i, i, f, i, i, p, i],
                         still_dropout_backward=[p, i, p, i, i, f, i, p, i],
                         still_dropout_add=[p, p, i, i, i, f, i, p, i],
                         still_dropout_add_backward=[p, i, i, i, f, i, p, i])
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                lib, reason = None, str(error)
            if reason is not None:
                log(f"the dropout kernels are unavailable ({reason}); dropout takes PyTorch's passes")
            _DROPOUT.append(lib)
        return _DROPOUT[0]


def _load_attention(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int64
    _declare(lib, still_attention_available=[], still_attention_tiles=[], still_attention_allow_tiles=[i],
             still_content_by_columns=[i],
             still_attention_weights=[p] * 5 + [i] + [p] * 3 + [i] * 5 + [p, i],
             still_attention_backward=[p] * 4 + [i] * 4, still_attention_grads=[p] * 13 + [i] * 6 + [p, i],
             still_content_attention=[p] * 5 + [i] * 8, still_content_attention_grads=[p] * 8 + [i] * 7,
             still_squared_error=[p, p, i, ctypes.POINTER(ctypes.c_double)],
             still_squared_error_grad=[p, p, i, ctypes.c_float, p], still_attention_fp32_available=[],
             still_attention_weights_fp32=[p] * 5 + [i] + [p] * 3 + [i] * 6,
             still_attention_grads_fp32=[p] * 13 + [i] * 6)
    return lib


def _declare(lib: ctypes.CDLL, **signatures: list) -> None:
    """Each named function's argument types, and its int64 result (a status code)."""
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int64


def cache_root() -> Path:
    from still.data.cache import cache_dir

    return cache_dir() / "native"


def _build(source_file: Path | None = None, what: str = STEP_LIBRARY) -> Path:
    """Build `source_file` (None: `SOURCE`, the decoding step) into a shared library, or find it built."""
    from still.train.aot import _machine

    source_file = SOURCE if source_file is None else source_file
    _sweep(cache_root())
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found: set CXX or install g++")
    real = os.path.realpath(cxx)  # the compiler as installed (not `--version`: a child process per decoder's process)
    installed = (real, os.stat(real).st_size, os.stat(real).st_mtime_ns)
    source, error = source_file.read_bytes(), ""
    for tune in (TUNE, ()):
        flags = (*FLAGS, *tune)
        digest = hashlib.sha256(source + repr((installed, flags, _machine(torch.device("cpu")))).encode())
        path = cache_root() / digest.hexdigest()[:20] / f"lib{source_file.stem}.so"
        failed = path.with_name("failed")  # this compiler could not build with these flags: not tried again soon
        damaged = path.exists()
        if damaged and _intact(path):
            return path
        if not damaged and (remembered := _remembered(failed)) is not None:
            error = remembered
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # (named with this process's pid: `_sweep` tells a killed build's from one at work)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
        except OSError as e:
            if damaged:  # (cut short, it would crash the process that loads it: SIGBUS)
                raise RuntimeError(f"{path} is not the library its build recorded, and its folder cannot be "
                                   f"written ({e.strerror}) to build it again: set STILL_CACHE to a folder that "
                                   "can be") from e
            raise
        if damaged:
            log(f"the cached library of the {what} ({path}) is not the one its build recorded; building it again")
        elif not tune:
            log(f"{Path(cxx).name} could not build the {what} with {' '.join(TUNE)} ({error}); building it without")
        log(f"building the hand-written {what} with {Path(cxx).name} (once for this machine); cached in "
            f"{cache_root()}")
        try:
            built = tmp / path.name
            result = _compile([cxx, *flags, str(source_file), "-o", str(built)])
            if result.returncode == 0:
                # the record first: a library without one is built again
                atomic_write_text(_record(path), f"{built.stat().st_size} {sha256_file(built)}\n")
                os.replace(built, path)  # whole or not at all, also against a concurrent build
                return path
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        error = (f"killed by signal {-result.returncode}" if result.returncode < 0
                 else (result.stderr.strip().splitlines() or ["failed"])[-1])
        if result.returncode < 0 or KILLED.search(result.stderr):  # (for memory on a busy machine, say: not the
            # flags' fault, so not built without them now; both tried again at the next run)
            raise RuntimeError(f"{Path(cxx).name} was killed building {source_file.name} ({error}); tried again at "
                               "the next run")
        atomic_write_bytes(failed, error.encode())  # (a new file: its time is when it failed)
    raise RuntimeError(f"{Path(cxx).name} could not build {source_file.name}: {error}")


# a build's compiler runs under this, in a process group of its own: once the process that started it
# is gone (killed outright, it could not end them) it ends the group, the compiler and the compiler's
# children (cc1plus, as, ld) with it, as `still.train.aot`'s builds do. A compiler killed by a signal
# ends it by the same signal, which `_build` reads as the compiler's
_WATCHED = """\
import os, signal, subprocess, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:  # (a process whose parent dies is given another)
        time.sleep(0.2)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
try:
    code = subprocess.Popen(sys.argv[2:]).wait()
except OSError as e:
    sys.exit(f"cannot run {sys.argv[2]}: {e.strerror or e}")
if code < 0:
    if -code != signal.SIGKILL:  # (one whose handler cannot be set)
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def _compile(command: list[str]) -> subprocess.CompletedProcess:
    """Run the compiler `command` (through `_WATCHED`, in a session of its own), its output captured.
    Interrupted (Ctrl-C, SIGTERM), it ends the compiler and its children before it unwinds."""
    process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHED, str(os.getpid()), *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


LEFTOVERS_AFTER_S = 3600.0  # an older still's unnamed build folder (`tmp*`) untouched this long is a killed
# build's (a build takes seconds)


def _sweep(root: Path) -> None:
    """Remove what builds killed outright left in `root`'s folders: their temporaries
    (`.<library>.<pid>-<random>.tmp`, `_build`'s folders and `atomic_write`'s files) whose process is
    gone, and the unnamed folders of older versions' builds untouched for `LEFTOVERS_AFTER_S`."""
    stale = time.time() - LEFTOVERS_AFTER_S
    for left in [*root.glob("*/.*.tmp"), *root.glob("*/tmp*")]:
        found = temporary_of(left.name)
        try:
            if found is not None:
                if found[1] == os.getpid() or process_alive(found[1]):
                    continue
            elif not left.is_dir() or left.stat().st_mtime > stale:
                continue
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
        except OSError:  # (another user's, or removed meanwhile: left)
            continue


def _remembered(failed: Path) -> str | None:
    """The error of an earlier run's build that `failed` holds, where it failed less than
    `RETRY_FAILED_S` ago; else None (built again)."""
    try:
        if time.time() - failed.stat().st_mtime < RETRY_FAILED_S:
            return (f"{failed.read_text(encoding='utf-8')}; remembered from an earlier run: tried again a day "
                    f"after it, or at once where {failed} is deleted")
    except OSError:  # (none: built)
        pass
    return None


def _record(path: Path) -> Path:
    """Where the size and SHA-256 of the library `path` are written when it is built."""
    return path.with_name(path.name + ".sha256")


def _intact(path: Path) -> bool:
    """Whether the library at `path` is the one its build recorded (its size and SHA-256: the three
    libraries, 0.35 MB, hashed in 0.4 ms here, 5 ms from a cold disk cache; once a process)."""
    try:
        size, digest = _record(path).read_text(encoding="utf-8").split()
        return os.path.getsize(path) == int(size) and sha256_file(path) == digest
    except (OSError, ValueError):  # no record (or none readable): a build cut short, or an older still's
        return False


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    lib.still_decoder_new.argtypes = [pointer, pointer, real, integer, integer]
    lib.still_decoder_new.restype = pointer
    lib.still_decoder_step.argtypes = [pointer, pointer, integer, integer, integer, integer, integer, pointer,
                                       integer, pointer, real, integer, real, pointer, integer, pointer]
    lib.still_decoder_step.restype = integer
    lib.still_decoder_run.argtypes = [pointer, pointer, pointer, integer, pointer, pointer, real, integer, real,
                                      pointer, integer, pointer]
    lib.still_decoder_run.restype = integer
    lib.still_decoder_free.argtypes = [pointer]
    lib.still_decoder_free.restype = None
    lib.still_prompt_attention.argtypes = [pointer] * 8 + [real, pointer]
    lib.still_prompt_attention.restype = integer
    lib.still_down_width.argtypes = [integer]
    lib.still_down_width.restype = integer
    lib.still_down_products.argtypes = [pointer] * 6
    lib.still_down_products.restype = integer
    lib.still_avx512.argtypes = []
    lib.still_avx512.restype = integer
    return lib


def unsupported(decoder: Decoder) -> str | None:
    """Why `NativeStep` cannot run `decoder`'s steps (None: it can)."""
    keys, shape = decoder.keys, decoder.shape
    weights = decoder.weights
    if keys.device.type != "cpu":
        return f"it runs on the CPU only, not on {keys.device.type}"
    if weights["embedding"].dtype != torch.float32 or keys.dtype not in (torch.float32, torch.bfloat16):
        return "it needs fp32 weights, stored in fp32 or bf16"
    if shape.block != 16:
        return "it needs the compiled layout of the keys"
    d_model, d_ff = weights["embedding"].shape[1], weights["0.up.weight"].shape[0]
    if shape.d_head % 16 or d_model % 16 or d_ff % 16:
        return f"it needs d_head, d_model and d_ff in multiples of 16 (got {shape.d_head}, {d_model}, {d_ff})"
    if shape.compression not in _COMPRESSIONS or len(shape.tap_rows) > 64:
        return f"it does not know the compression {shape.compression}"
    return None


def pack(matrix: torch.Tensor, dtype: torch.dtype, block: int = 16, by_input: bool = False) -> torch.Tensor:
    """(out, in) -> blocks of `block` output rows, the rows past `out` zero: in fp32 (out / block,
    in, block), each block's weights of an input contiguous; in bf16 (out / block, in / 2, block, 2),
    in pairs of inputs (a 32-bit word holds one output's weights of inputs 2p and 2p + 1), or with
    `by_input` (the feed-forward's second matrix, read an input at a time) (out / block, in, block /
    2, 2), a word holding an input's weights of outputs 2l and 2l + 1."""
    out, inputs = matrix.shape
    padded = F.pad(matrix, (0, 0, 0, -out % block)).to(dtype)
    if dtype == torch.bfloat16 and by_input:
        return padded.view(-1, block // 2, 2, inputs).permute(0, 3, 1, 2).contiguous()
    if dtype == torch.bfloat16:
        return padded.view(-1, block, inputs // 2, 2).transpose(1, 2).contiguous()
    return padded.view(-1, block, inputs).transpose(1, 2).contiguous()


def down_width(out: int) -> int:
    """The blocks' width of the feed-forward's second matrix, packed for the step that reads only
    its nonzero inputs' weights (`product_listed` in native_step.cpp): the largest of 128, 64, 32 and
    16 output rows that divides `out` (d_model), so that an input's weights for a block are one run
    of memory. Asked of the step's own `down_width` (`still_down_width`), so that the packing and the
    reading cannot disagree; the step must be built (as it is wherever it packs)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the hand-written decoding step is not built here")
    return int(lib.still_down_width(out))


def _packed(w: dict[str, torch.Tensor], layers: int, stored: torch.dtype) -> dict[str, torch.Tensor]:
    """The matrices packed (`pack`; the feed-forward's second in blocks of `down_width`, an input's
    weights a run even in bf16), the position tables in pairs of features in bf16 (`pairs`)."""
    d_model = w["embedding"].shape[1]
    packed = {"head": pack(w["head"], stored)}
    for i in range(layers):
        matrices = {"qkv": w[f"{i}.qkv"], "out": w[f"{i}.out"], "up": w[f"{i}.up.weight"],
                    "down": w[f"{i}.down.weight"]}
        if f"{i}.taps" in w:  # (T, d_out, d_in) -> (d_out, T * d_in): the taps' inputs side by side
            matrices["taps"] = w[f"{i}.taps"].permute(1, 0, 2).reshape(d_model, -1)
        packed |= {f"{i}.{name}": pack(m, stored, down_width(d_model), by_input=True) if name == "down" else
                   pack(m, stored) for name, m in matrices.items()}
        positions = w[f"{i}.positions"]
        packed[f"{i}.positions"] = pairs(positions) if stored == torch.bfloat16 else positions
    return packed


def pairs(blocked: torch.Tensor) -> torch.Tensor:
    """Keys or a position table in blocks of slots, (..., KB, D, 16) -> (..., KB, D / 2, 16, 2): the
    features in pairs, as the bf16 matrices' inputs (`pack`)."""
    *lead, blocks, d_head, block = blocked.shape
    return blocked.reshape(*lead, blocks, d_head // 2, 2, block).transpose(-1, -2).contiguous()


HUGE_PAGE = 2 << 20  # the size of x86-64's (and most ARM kernels') transparent huge pages


def on_huge_pages(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CPU tensors copied into one block of memory mapped for them, which the kernel is asked to
    back with huge pages (`madvise(MADV_HUGEPAGE)`, Linux's transparent huge pages where they are
    enabled as `madvise` or `always`), each at a 64-byte boundary; the same tensors where they come to
    less than one huge page (they fit a core's TLB as they are), or where that cannot be done. The
    block is freed with the last of them.

    Why: a decoding step at batch 1 streams every matrix, key and value once a token (21 MB at the
    reference preset in fp32), and in 4 KiB pages that is more pages than a core's TLB holds: the
    step walks page tables for many of them every token. In 2 MiB pages it does not: the fp32 step
    ran 0.88-0.90x the time, bf16 0.91x (machine C, docs/performance.md, session 41)."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    spans = {name: -(-size // 64) * 64 for name, size in sizes.items()}  # (each from a 64-byte boundary)
    total = sum(spans.values())
    cpu = all(t.device.type == "cpu" for t in tensors.values())
    if not hasattr(mmap, "MADV_HUGEPAGE") or total < HUGE_PAGE or not cpu:
        return tensors
    try:  # whole huge pages from the first boundary in the block; private and anonymous (a shared
        # mapping's pages are shared memory's, whose huge pages are set apart)
        block = mmap.mmap(-1, -(-total // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE,
                          flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return tensors
    memory = torch.frombuffer(block, dtype=torch.uint8)  # (its storage holds the block)
    at = -memory.data_ptr() % HUGE_PAGE  # the first whole huge page
    placed = {}
    for name, tensor in tensors.items():
        view = memory[at : at + sizes[name]].view(tensor.dtype).view(tensor.shape)
        if tensor.is_contiguous() and not (tensor.is_conj() or tensor.is_neg()):  # (one memcpy on this thread:
            # a decoder's set-up wakes no OpenMP threads)
            ctypes.memmove(view.data_ptr(), tensor.data_ptr(), sizes[name])
        else:
            view.copy_(tensor)
        placed[name] = view
        at += spans[name]
    return placed


class NativeStep:
    """`decoder`'s step (and its draw) through `native_step.cpp`, on `threads` threads (the calling
    one and helpers of its own). Holds packed copies of the matrices; the rest is the decoder's.
    `groups`: the compressions of up to this many compressing steps are computed together, at the
    first of them (as many as the full memory ring holds; the same keys and values as one at a time;
    None: `COMPRESS_GROUPS`)."""

    def __init__(self, decoder: Decoder, threads: int, groups: int | None = None) -> None:
        groups = COMPRESS_GROUPS if groups is None else groups
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        reason = unsupported(decoder)
        if reason is not None:
            raise ValueError(f"the hand-written decoding step cannot run this decoder: {reason}")
        if getattr(decoder, "native", None) is not None:  # (its rings are that step's: two would split them)
            raise ValueError("this decoder has its hand-written step already (decoder.native); build the decoder "
                             "with native=False for a step of your own")
        lib = library()
        if lib is None:
            raise RuntimeError("the hand-written decoding step could not be built")
        shape, w = decoder.shape, decoder.weights
        stored = decoder.keys.dtype
        batch, d_model = decoder.keys.shape[1], w["embedding"].shape[1]
        vocab, d_ff = w["embedding"].shape[0], w["0.up.weight"].shape[0]
        threads = max(1, min(threads, shape.heads, MAX_THREADS))
        tap_rows = list(shape.tap_rows)
        # at most as many as the full memory ring holds (the engine keeps to that too)
        self.groups = max(1, min(groups, shape.m_cap // shape.rate)) if shape.compression else 1
        dims = [shape.layers, batch, shape.heads, shape.d_head, d_model, d_ff, vocab, shape.n_cap, shape.m_cap,
                decoder.keys.shape[3], int(shape.pre_norm), _COMPRESSIONS[shape.compression], shape.rate,
                len(tap_rows), threads, int(stored == torch.bfloat16), self.groups, *tap_rows]
        with torch.no_grad():
            if stored == torch.bfloat16:  # the keys in pairs of features, as the position tables
                decoder.keys = pairs(decoder.keys)
            packed = decoder.derived.get("native")
            if packed is None:  # once for every decoder of these weights and layout
                packed = decoder.derived["native"] = on_huge_pages(_packed(w, shape.layers, stored))
            # the buffers the step writes, too (the decoder's own from here on)
            rings = on_huge_pages({"keys": decoder.keys, "values": decoder.values, "inputs": decoder.inputs})
            decoder.keys, decoder.values, decoder.inputs = rings["keys"], rings["values"], rings["inputs"]
        pointers = [w["embedding"].data_ptr(), packed["head"].data_ptr(),
                    w["norm.weight"].data_ptr() if shape.pre_norm else 0,
                    w["norm.bias"].data_ptr() if shape.pre_norm else 0,
                    decoder.keys.data_ptr(), decoder.values.data_ptr(), decoder.inputs.data_ptr()]
        for i in range(shape.layers):
            pointers += [packed[f"{i}.{name}"].data_ptr() if f"{i}.{name}" in packed else 0
                         for name in ("qkv", "out", "up", "down", "taps", "positions")]
            pointers += [w[f"{i}.{name}"].data_ptr() for name in (
                "u", "v", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "up.bias", "down.bias")]
        self._keep = packed  # the packed matrices live as long as the engine (and the model's cache)
        self._refs = (decoder.keys, decoder.values, decoder.inputs, w)  # and the buffers it writes
        self.threads, self.batch, self.vocab = threads, batch, vocab
        self._lib, self._step = lib, lib.still_decoder_step
        self._logits = torch.empty(batch, vocab)  # where a sampling step leaves its logits
        self._logits_pointer = self._logits.data_ptr()
        self._pid = os.getpid()
        self._handle = lib.still_decoder_new(_array(dims), _array(pointers), float(shape.eps), SPIN_NS,
                                             BARRIER_SPIN_NS)
        if not self._handle and threads > 1:  # a helper thread could not be started (the system's limit)
            log("the hand-written decoding step could not start its helper threads (the system's limit on threads); "
                "it runs on one thread")
            self.threads = dims[14] = 1
            self._handle = lib.still_decoder_new(_array(dims), _array(pointers), float(shape.eps), SPIN_NS,
                                                 BARRIER_SPIN_NS)
        if not self._handle:  # (not reached: one thread starts none)
            raise RuntimeError("the hand-written decoding step could not be set up")
        self._finalizer = weakref.finalize(self, lib.still_decoder_free, self._handle)

    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # a forked child has none of the helper threads: it would wait forever
            raise RuntimeError("a decoder's hand-written step cannot be used in a process forked from its own")

    def __call__(self, tokens: torch.Tensor, counters: tuple[int, int, int, int], compress: bool,
                 uniform: torch.Tensor | None = None, sampling: Sampling | None = None) -> torch.Tensor:
        """tokens (B,) -> logits (B, 1, V), or with `sampling` the tokens drawn (B,) with the uniform
        numbers (B, 1). `counters`: (next_c, next_m, n, m) as `Decoder._counters`. (The checks are
        attribute reads: this costs about 3 µs a token here on top of the step itself.)"""
        self._check_process()
        if tokens.dtype is not torch.int64 or not tokens.is_contiguous() or tokens.numel() != self.batch:
            tokens = tokens.reshape(self.batch).to(torch.int64).contiguous()
        if sampling is None:
            logits = torch.empty(self.batch, 1, self.vocab)
            failed = self._step(self._handle, tokens.data_ptr(), *counters, compress, logits.data_ptr(),
                                0, None, 1.0, 0, 1.0, None, 0, None)
            out = logits
        else:
            if uniform.dtype is not torch.float32 or not uniform.is_contiguous() or uniform.numel() != self.batch:
                uniform = uniform.reshape(self.batch).float().contiguous()
            out = torch.empty(self.batch, dtype=torch.int64)
            failed = self._step(self._handle, tokens.data_ptr(), *counters, compress, self._logits_pointer, 1,
                                uniform.data_ptr(), *_draw_settings(sampling), out.data_ptr())
        if failed:
            raise IndexError(f"token {int(tokens[failed - 1])} is outside the vocabulary of {self.vocab}")
        return out


    def run(self, tokens: torch.Tensor, counters: list[int], uniform: torch.Tensor, sampling: Sampling
            ) -> tuple[torch.Tensor, list[int]]:
        """len(uniform) steps with the draw in one call, each fed the token the one before drew (the
        first fed `tokens` (B,)), with the uniform numbers (steps, B, 1): the tokens drawn (steps, B)
        and the counters after them (`counters`: next_c, next_m, n, m). The same tokens and state as
        that many calls."""
        self._check_process()
        steps = uniform.shape[0]
        tokens = tokens.reshape(self.batch).to(torch.int64).contiguous()
        uniform = uniform.reshape(steps, self.batch).float().contiguous()
        drawn = torch.empty(steps, self.batch, dtype=torch.int64)
        state = torch.tensor(counters, dtype=torch.int64)
        failed = self._lib.still_decoder_run(self._handle, tokens.data_ptr(), state.data_ptr(), steps,
                                             self._logits_pointer, uniform.data_ptr(), *_draw_settings(sampling),
                                             drawn.data_ptr())
        if failed:
            raise IndexError(f"token {int(tokens[failed - 1])} is outside the vocabulary of {self.vocab}")
        return drawn, state.tolist()


@functools.lru_cache(maxsize=16)  # (a generation's every token: the excluded ids' array made once)
def _draw_settings(sampling: Sampling) -> tuple[float, int, float, ctypes.Array | None, int]:
    """temperature, top-k (0: none), top-p (1: none), the tokens never drawn and their count, as the
    C step reads them (in float32: values below its smallest normal number as that number, as
    `sampling.next_token` takes them)."""
    return (max(sampling.temperature, TINY), sampling.top_k or 0,
            1.0 if sampling.top_p is None else max(sampling.top_p, TINY),
            _array(list(sampling.exclude)) if sampling.exclude else None, len(sampling.exclude))


PROMPT_ONE_THREAD_BELOW = 2**22
"""A prompt's attention (`prompt_attention`) of fewer content multiply-adds than this runs on the
calling thread alone: each call starts its helper threads, about 75 µs here, more than a last
layer's one query takes (60 µs for 4 heads over 320 keys)."""


def prompt_attention(attention: torch.nn.Module, queries: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor,
                     padding: tuple[int, ...], length: int) -> torch.Tensor | None:
    """A prompt's attention for a group of segments (`still.compressive.prefill.Group`) through
    `still_prompt_attention` in native_step.cpp: what `attention.causal_attention` gives for them
    stacked in the batch with `padding`, the scores in fp32 without (L, K) tensors. queries (B, S L, d):
    W_q x of the group's S segments of `length` tokens; rows (B, N, 2d): the keys and values they
    read; keys (S K,): each segment's rows in `rows`, after its padding -> the heads' outputs (B, S L,
    d), before W_o. bf16 queries and rows (bf16 autocast) are read as fp32, and the outputs given
    back in bf16: the scores in fp32 from the rounded queries and keys, as the decoding step reads
    them (a 512-token prompt at d_model 128 took 0.83x the time it took through PyTorch's flash
    attention for the CPU and a bf16 position product: docs/benchmarks.md, session 39). None where
    it cannot run (not fp32 or bf16 on the CPU, weights not fp32, gradients, d_head not a multiple
    of 16 up to 128, or no library): then the caller's PyTorch path."""
    b, total, d = queries.shape
    heads = attention.n_heads
    d_head = d // heads
    given = queries.dtype
    if (queries.device.type != "cpu" or given not in (torch.float32, torch.bfloat16) or rows.dtype != given
            or torch.is_grad_enabled() or d_head % 16 or d_head > 128
            or any(t.dtype != torch.float32 for t in (attention.position.weight, attention.content_bias,
                                                      attention.position_bias))):  # (weights in fp32 only)
        return None
    lib = library(fallback="PyTorch's attention")
    if lib is None:
        return None
    s = len(padding)
    k = keys.numel() // s
    queries, rows = queries.float(), rows.float()
    # (H, D, K + 1): column c the distance K - c; at inference a view of the attention's cached table
    with torch.autocast("cpu", enabled=False) if given != torch.float32 else contextlib.nullcontext():
        table = attention.position_projection(k + 1, queries.device, torch.float32).transpose(1, 2)  # (fp32)
    if table.stride(2) != 1:
        table = table.contiguous()
    if queries.stride(2) != 1 or queries.stride(1) != d:
        queries = queries.contiguous()
    rows, keys = rows.contiguous(), keys.contiguous()
    u, v = attention.content_bias.detach().contiguous(), attention.position_bias.detach().contiguous()
    if any(t.dtype != torch.float32 for t in (table, u, v)) or keys.dtype != torch.int64:
        return None
    out = torch.empty(b, total, d, dtype=torch.float32)
    work = b * s * length * k * d  # multiply-adds of the content scores
    threads = 1 if work < PROMPT_ONE_THREAD_BELOW else min(torch.get_num_threads(), MAX_THREADS)
    dims = [b, s, length, k, heads, d_head, rows.shape[1], queries.stride(0), table.stride(0), table.stride(1),
            threads]
    code = lib.still_prompt_attention(_array(dims), queries.data_ptr(), rows.data_ptr(), keys.data_ptr(),
                                      _array(list(padding)), u.data_ptr(), v.data_ptr(), table.data_ptr(),
                                      attention.scale, out.data_ptr())
    return None if code else out.to(given)


def _array(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)
