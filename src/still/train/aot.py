"""Ahead-of-time compilation: a function of tensors compiled once into a cached package.

    step = ahead_of_time(fn, constants, examples, what="the decoding step", threads=1)
    outputs = step(*tensors)   # a list of tensors; None came back if compiling failed (fn runs eagerly)

`fn(*tensors, *constants)` is exported (`torch.export`) and compiled by AOTInductor into a package
(a shared library and its metadata, `.pt2`) under `<cache>/aot/`, keyed on everything the compiled
code depends on: the function's package source, the constants, the tensors' shapes, strides,
dtypes and device, the caller's autocast (compiled in: a package runs as it was built, whatever the
autocast around the call), the thread count, PyTorch's version and the processor. In-place writes
to the inputs are kept (the compiled code writes into the tensors it is given).

Why not `torch.compile`: its compiler lives in the process that calls it. Importing it costs about
70 MiB, compiling a step costs another 100 MiB or more, and a fresh process pays seconds to trace
again even when the compiled code is cached. Here the compiling runs once per shape in a child
process, and every later process only loads a shared library (2 MB on disk for the decoding step
here, about 1 MiB of memory, a few milliseconds) through PyTorch's C++ package loader, without
importing the Python compiler at all.

Where compiling cannot work (no C++ compiler, an export the function does not allow), the reason
is printed once and the caller runs the function eagerly: `ahead_of_time` returns None. Several
functions asked for together (`ahead_of_time_all`) are built side by side, a child process each.
Interrupted (Ctrl-C, SIGTERM), the call ends its builds, their compilers and their files before it
unwinds; a build whose caller is killed outright (SIGKILL) does the same itself.
A cached package that is not a whole archive (cut short or overwritten: a full disk, a copy),
checked before it is loaded, is removed and compiled again. The cache keeps the 64 most recently
used packages (a new version of still or PyTorch makes the older ones unreachable).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import os
import pickle
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from still.train.progress import log

_LOADED: dict[str, AheadOfTime | None] = {}  # by key: loaded packages, and None for failed builds
_SOURCE_HASH: list[str] = []


class AheadOfTime:
    """A loaded package: call it with the tensors (in the order of the examples) to get the outputs."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path = path
        index = device.index if device.type != "cpu" and device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else -1)
        loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
        if loader is not None:  # the C++ loader alone: no import of the Python compiler
            self._run = loader(str(path), "model", False, 1, index).run
        else:  # pragma: no cover - older or newer PyTorch without it
            from torch._inductor import aoti_load_package

            self._run = aoti_load_package(str(path), device_index=index).loader.run

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        # copied: a package whose temporaries live on the stack returns its outputs in buffers of
        # its own, which its next call overwrites (a few bytes here; the decoding step's logits)
        return [t.clone() for t in self._run(list(tensors))]


def cache_root() -> Path:
    from still.data.cache import cache_dir

    return cache_dir() / "aot"


class Request(NamedTuple):
    """One function to compile: `fn(*examples, *constants)`; `what` names it in messages."""

    fn: Callable[..., Any]
    constants: tuple
    examples: Sequence[torch.Tensor]
    what: str


def ahead_of_time(fn: Callable[..., Any], constants: tuple, examples: Sequence[torch.Tensor], what: str,
                  threads: int | None = None) -> AheadOfTime | None:
    """`fn` compiled for tensors of the shapes, strides, dtypes and device of `examples` (their
    values are not used) and these `constants`, loaded from the cache or built there first; None
    where that fails (said once). The compiled code assumes those strides: call it with tensors
    laid out as the examples were."""
    return ahead_of_time_all([Request(fn, constants, examples, what)], threads)[0]


def ahead_of_time_all(requests: Sequence[Request], threads: int | None = None) -> list[AheadOfTime | None]:
    """`ahead_of_time` for several functions; those not yet cached are built side by side, a
    child process each."""
    jobs = []
    for request in requests:
        spec = _spec(request.fn, request.constants, request.examples, threads)
        jobs.append((request, spec, _path(spec, request.fn, request.examples[0].device)))
    errors: dict[Path, str] = {}
    for request, _, path in jobs:  # the cached ones first: one cut short or overwritten is built again
        if path.stem in _LOADED or not path.exists():
            continue
        damage = _damage(path)  # (before loading: a review probe's damaged library inside one ended the process)
        if damage is None:
            try:
                _LOADED[path.stem] = _loaded(path, request.examples[0].device)
            except Exception as e:  # noqa: BLE001 - whole, it would fail the same built again: said below
                errors[path] = _last_line(e)
            continue
        try:
            path.unlink()
        except OSError as gone:
            errors[path] = f"the cached package {path} is damaged ({damage}) and cannot be removed ({gone.strerror})"
            continue
        log(f"--compile: the cached package of {request.what} ({path}) is damaged ({damage}); compiling it again")
    missing = {path: (request, spec) for request, spec, path in jobs
               if path.stem not in _LOADED and path not in errors and not path.exists()}
    if missing:
        log(f"--compile: compiling {' and '.join(r.what for r, _ in missing.values())} ahead of time, once for "
            f"these shapes (a minute or less); cached in {cache_root()}")
        builds = {}
        try:
            for path, (_, spec) in missing.items():
                try:
                    builds[path] = _Build({**spec, "path": sys.path}, path)  # the child imports fn as we do
                except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
                    errors[path] = _last_line(e)
            for path, build in builds.items():
                try:
                    build.finish()
                except Exception as e:  # noqa: BLE001
                    errors[path] = _last_line(e)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): no build outlives this call
            for build in builds.values():
                build.abort()
            raise
        _prune(cache_root(), keep=PACKAGES_KEPT)
    loaded = []
    for request, _, path in jobs:
        if path.stem not in _LOADED:
            package = None
            try:
                if path in errors:
                    raise RuntimeError(errors[path])
                package = _loaded(path, request.examples[0].device)
            except Exception as e:  # noqa: BLE001
                log(f"--compile: cannot compile {request.what} ({_last_line(e)[:300]}); running without compiling")
            _LOADED[path.stem] = package
        loaded.append(_LOADED[path.stem])
    return loaded


def _damage(path: Path) -> str | None:
    """What is wrong with the package at `path` where it is not a whole zip archive (cut short or
    overwritten: a full disk, a copy), by its members' CRCs (about 2 MB read, a few ms, once a
    process); None where it is whole (or cannot be read: not known to be damaged)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return f"its member {bad} is not as written" if bad is not None else None
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        return str(e) or type(e).__name__
    except OSError:
        return None


def _loaded(path: Path, device: torch.device) -> AheadOfTime:
    package = AheadOfTime(path, device)
    with contextlib.suppress(OSError):  # used: kept longest by `_prune` (a read-only cache is fine)
        os.utime(path)
    return package


def torch_compile_problem(device: torch.device | str) -> str | None:
    """Why `torch.compile` cannot run on `device` here, or None where it can: a tiny function is
    compiled and run, forward and backward (Inductor needs a C++ compiler on the CPU, Triton on a
    GPU). Also inside `compile_failures_run_eagerly`, whose setting would otherwise run the function
    eagerly and hide the failure (a probe: `lm train --compile` without a compiler ended in a traceback)."""
    import torch._dynamo

    try:
        with torch._dynamo.config.patch(suppress_errors=False):
            x = torch.ones(4, device=device, requires_grad=True)  # (the backward too, compiled in `backward()`)
            torch.compile(lambda x: x * 2 + 1, dynamic=False)(x).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
        return _last_line(e)
    return None


@contextlib.contextmanager
def compile_failures_run_eagerly() -> Iterator[None]:
    """Inside: a function given to `torch.compile` that fails to compile runs eagerly instead of
    ending the program (`torch._dynamo.config.suppress_errors`, which says so once). The setting is
    the process's (the compiled functions of sharded training run in several threads, so it cannot
    be set around each call): it is put back as it was on leaving."""
    import torch._dynamo

    before = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = True
    try:
        yield
    finally:
        torch._dynamo.config.suppress_errors = before


# the advice PyTorch's compiler errors end with, which says nothing of what failed
_ADVICE = ("Set TORCHDYNAMO_VERBOSE=", "For even more developer context", "You can suppress this exception")


def _last_line(error: BaseException) -> str:
    """The error's last line that says what failed (not PyTorch's advice on how to see more)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(_ADVICE)]
    return (said or lines or [type(error).__name__])[-1]


PACKAGES_KEPT = 64  # the most recently used packages kept in the cache (a few MiB each)


# a build's own temporary files (its spec, its package being written) older than this were left by
# a process killed while it compiled (a build takes a minute at most)
LEFTOVERS_AFTER_S = 3600.0


def _prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used packages (a new version of still or PyTorch
    makes every older package unreachable), and the files of builds whose process was killed."""
    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # deleted meanwhile by another process
            return 0.0

    stale = time.time() - LEFTOVERS_AFTER_S
    leftovers = [path for path in root.glob(".*") if 0.0 < used(path) < stale]  # `_Build`'s temporary files
    packages = sorted((path for path in root.glob("*.pt2") if not path.name.startswith(".")), key=used, reverse=True)
    for old in leftovers + packages[keep:]:
        with contextlib.suppress(OSError):  # another process's, or a read-only cache: leave it
            old.unlink(missing_ok=True)


def package_path(fn: Callable[..., Any], constants: tuple, examples: Sequence[torch.Tensor],
                 threads: int | None = None) -> Path:
    """Where `ahead_of_time` keeps (or will keep) the package for these arguments."""
    return _path(_spec(fn, constants, examples, threads), fn, examples[0].device)


def _path(spec: dict, fn: Callable[..., Any], device: torch.device) -> Path:
    return cache_root() / f"{_key(spec, device, fn)}.pt2"


def _spec(fn: Callable[..., Any], constants: tuple, examples: Sequence[torch.Tensor], threads: int | None) -> dict:
    device_type = examples[0].device.type
    autocast = (str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
                if torch.is_autocast_enabled(device_type) else None)
    return {"fn": f"{fn.__module__}:{fn.__qualname__}", "constants": constants,
            "inputs": [(tuple(t.shape), t.stride(), str(t.dtype).removeprefix("torch."), str(t.device))
                       for t in examples],
            "threads": threads if threads is not None else torch.get_num_threads(),
            "autocast": autocast}  # the caller's autocast dtype, compiled in (the package ignores the caller's)


def _key(spec: dict, device: torch.device, fn: Callable[..., Any]) -> str:
    digest = hashlib.sha256()
    for part in (pickle.dumps(spec, protocol=4), torch.__version__.encode(), _source_hash().encode(),
                 _machine(device).encode()):
        digest.update(hashlib.sha256(part).digest())
    digest.update(_file_hash(fn))
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=64)
def _file_hash(fn: Callable[..., Any]) -> bytes:
    """Of the function's own file, where it is not part of still (read once per process)."""
    try:
        own = Path(inspect.getsourcefile(fn) or "").read_bytes()
    except (OSError, TypeError):
        own = b""
    return hashlib.sha256(own).digest()


def _source_hash() -> str:
    """Of every Python file of the `still` package: a change anywhere rebuilds (it is rare, and the
    compiled function may call into any of them)."""
    if not _SOURCE_HASH:
        digest = hashlib.sha256()
        root = Path(__file__).resolve().parents[1]
        for file in sorted(root.rglob("*.py")):
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
        _SOURCE_HASH.append(digest.hexdigest())
    return _SOURCE_HASH[0]


@functools.lru_cache(maxsize=8)  # read once per process and device
def _machine(device: torch.device) -> str:
    """What compiled code for `device` depends on beyond PyTorch: the processor's instruction set
    (the CPU code is built for the machine that compiles it), or the GPU."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)} {torch.version.cuda}"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return f"{device.type} {platform.machine()} {platform.processor()} {flags}"


class _Build:
    """A package being compiled in a child process (the compiler's memory and imports stay out of
    this one), into a temporary file that `finish` moves into place when complete."""

    def __init__(self, spec: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
        os.close(fd)
        spec_fd, self.spec_file = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".spec", dir=path.parent)
        try:
            with os.fdopen(spec_fd, "wb") as f:
                pickle.dump(spec, f, protocol=4)
            # a session of its own: the child and the compilers it starts are one process group, which
            # `abort` ends whole (and Ctrl-C at a terminal reaches this process alone, which aborts it)
            self.process = subprocess.Popen([sys.executable, "-m", "still.train.aot", self.spec_file, self.tmp,
                                             str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            text=True, start_new_session=True)
        except BaseException:
            self._clean()
            raise

    def finish(self) -> None:
        try:
            _, stderr = self.process.communicate()
            if self.process.returncode != 0:
                raise RuntimeError(stderr.strip() or f"the compiling process exited with {self.process.returncode}")
            os.replace(self.tmp, self.path)
        finally:
            self._clean()

    def abort(self) -> None:
        """End the build now (Ctrl-C, SIGTERM, or another build's failure ending the caller): its
        process and the compilers it started, and its files."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._clean()

    def _clean(self) -> None:
        Path(self.tmp).unlink(missing_ok=True)
        Path(self.spec_file).unlink(missing_ok=True)


class _Function(torch.nn.Module):
    """What is exported: the tensors in, the constants bound."""

    def __init__(self, fn: Callable[..., Any], constants: tuple) -> None:
        super().__init__()
        self.fn, self.constants = fn, constants

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.fn(*tensors, *self.constants)


def _compile(spec: dict, out: str) -> None:
    """The child's work: export `spec`'s function on zero tensors of its shapes, then compile it."""
    sys.path[:] = spec["path"]
    # small temporaries on the stack rather than a tensor allocated and freed each for every call
    # (about 25 us of a 145 us decoding step); the compiler keeps them on the heap anyway where the
    # graph calls a library kernel or needs more than 100 KB. Read when the backends are
    # registered, so set before anything is compiled.
    torch._inductor.config.aot_inductor.allow_stack_allocation = True
    module, name = spec["fn"].split(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    torch.set_num_threads(spec["threads"])
    examples = tuple(torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=device).zero_()
                     for shape, stride, dtype, device in spec["inputs"])
    device_type = torch.device(spec["inputs"][0][3]).type
    autocast = (torch.autocast(device_type, dtype=getattr(torch, spec["autocast"])) if spec["autocast"]
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        exported = torch.export.export(_Function(fn, spec["constants"]), examples, strict=False)
        torch._inductor.aoti_compile_and_package(exported, package_path=out)


def _end_with_parent(parent: int, files: Sequence[str], every_s: float = 0.2) -> None:
    """In a build's process: a thread that, once the process that started this one is gone (killed
    outright, so that it could not `abort` this build), removes this build's `files` and ends its
    process group (this process and the compilers it started)."""
    def watch() -> None:
        while os.getppid() == parent:  # (a process whose parent dies is given another)
            time.sleep(every_s)
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(name)
        if os.getpgid(0) == os.getpid():  # (started by `_Build`: its own group)
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="end-with-parent").start()


if __name__ == "__main__":
    _end_with_parent(int(sys.argv[3]), sys.argv[1:3])
    with open(sys.argv[1], "rb") as f:
        _compile(pickle.load(f), sys.argv[2])
