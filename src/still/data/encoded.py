"""A corpus's ids on disk: encoded once, then memory-mapped by every later run, `lm eval` and every
process of a torchrun job.

Read and encoded at every start, PG-19's training books (about 11.7 G characters) cost each process
minutes and the text and its ids in memory (about 35 GB: a byte a character as a Python string, two
as int16 ids), once per process of a torchrun job. The first run writes an entry instead:

    <root>/<corpus>-<key>/
        manifest.json    what it was made from (the fingerprint below), its splits' sizes, the names,
                         and the digests of its ids, whole and per split (`IdsDigest`: what a
                         training run records, and `lm eval` checks its split against)
        vocab.json       the vocabulary built from all three splits
        train.npy ...    each split's ids, one array in the vocabulary's compact dtype
        train.starts.npy ...  where each document starts in it (documents + 1 offsets)

and later runs map the arrays (`numpy.load(mmap_mode="c")`): nothing is read until a segment needs
it, and every process on the machine shares the pages through the operating system's page cache.
(The opening checks each split's arrays against the manifest; its ids against the split's digest
only where the file is not the one written, by size, times and inode: that check reads every page.)
The entry is made a document at a time: each file of its own (`FileDocument`) is read once for the
vocabulary and its length, then again for its ids, which are written in turn, so the process holds
one document's text and ids at a time.

`<root>` is `$STILL_CORPUS_CACHE`, else `corpora/` in the data cache (`still.data.cache.cache_dir`);
`STILL_CORPUS_CACHE=off` encodes at every start as before and writes nothing. An entry is kept per
corpus location and kind of vocabulary (characters or bytes), with a fingerprint of what it was made
from: every file the corpus's loader would read under its path (`still.data.text.walk_files`), by
relative path, size, modification and change times and inode (the bundled Shakespeare: its pinned
SHA-256). A file changed, added or removed since makes a new encoding, which replaces the old one.

Writers take the entry's lock (a lock of the process's threads, then a POSIX lock on `.<entry>.lock`
beside it, which NFS also honours): one process makes a missing entry while the others (torchrun's,
or another run) wait for it, then map it. Where the holder could not write it (it notes why in the lock
file), they read the corpus into memory rather than each try again; where it wrote none for another
reason (interrupted or killed) or made it from the corpus as it was before a change, the first of them
makes it. The lock file stays after (`still data clear` removes it
with its entry, or where its corpus has none: `remove`, `remove_lock`; a process that waited on a
lock file removed meanwhile locks the new one). The entry is written into a temporary folder,
flushed to disk and renamed into place; a replaced entry is moved aside and removed a day later (a
run elsewhere may still be reading it), as is a temporary folder left by a writer that was killed.
An entry that cannot be written (a full disk, no permission) is said, and the run goes on with its
ids in memory.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from still import allocator
from still.data.cache import cache_dir
from still.data.text import (
    CORPUS_KINDS,
    ENWIK8_SPLIT,
    SHAKESPEARE_FILE,
    SPLITS,
    Corpus,
    Vocab,
    absolute_corpus,
    load_corpus,
    mark_characters,
    no_characters,
    walk_files,
)
from still.errors import StillError
from still.train.io import atomic_write, atomic_write_text, printable, process_umask, temporary_of
from still.train.progress import format_size, log

FORMAT = 5  # (raise it when what an entry holds, or how a corpus is split, changes: older entries are made again;
# 2: the manifest holds the ids' `digest`; 3: and each split's, `split_digests`; 4: and vocab.json's, `vocab_sha256`;
# 5: a character-level file's byte-order mark is left out (`decode_utf8`): an entry made with it, whose
# fingerprint would match, would be served as the text of now)
OFF = ("0", "off", "no", "false")


@dataclass(frozen=True)
class EncodedCorpus:
    """A corpus's splits as ids: per split, its documents' ids (each (n,), in `vocab.compact_dtype`)
    and their names. `entry`: the cache entry they are mapped from (None: held in memory). `digest`:
    the SHA-256 of the vocabulary and of every split's ids and document bounds (`IdsDigest`), which
    a training run records so that it never resumes on other text; None where not every split was
    read (`lm eval`'s, with the run's vocabulary). `split_digests`: each split's own (of the
    vocabulary and that split alone), for every split read, or all three from an entry: what `lm
    eval` compares with the run's record of its split."""

    name: str  # what the results call it: "shakespeare", "pg19", a file's stem ...
    vocab: Vocab
    splits: dict[str, tuple[list[torch.Tensor], list[str]]]
    entry: Path | None = None
    digest: str | None = None
    split_digests: Mapping[str, str] = field(default_factory=dict)

    def split(self, name: str) -> tuple[list[torch.Tensor], list[str]]:
        Corpus.check_split(name)
        return self.splits[name]

    @property
    def train_tokens(self) -> int:
        return sum(len(d) for d in self.splits["train"][0])


def corpora_root(cache: str | Path | None = None) -> Path | None:
    """Where entries live (None: `STILL_CORPUS_CACHE=off`)."""
    env = os.environ.get("STILL_CORPUS_CACHE")
    if env is not None and env.strip().lower() in OFF:
        return None
    return Path(env).expanduser() if env else cache_dir(cache) / "corpora"


def _file_in_the_way(root: Path) -> Path | None:
    """`root` itself, or the nearest of its folders that exists, where that is not a folder."""
    for path in (root, *root.parents):
        try:
            if path.exists():
                return None if path.is_dir() else path
        except OSError:  # (unreadable: writing there says why)
            return None
    return None


def entry_path(root: Path, name: str, byte_level: bool) -> Path:
    """The entry of corpus `name` (as `load_corpus` takes it, made absolute) read by characters or bytes."""
    key = hashlib.sha256(json.dumps([name, byte_level]).encode()).hexdigest()[:20]
    kind = next((k.rstrip(":") for k in CORPUS_KINDS if name.startswith(k)), None)
    label = kind or (name if name == "shakespeare" else Path(name).stem or "corpus")
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:40]
    return root / f"{label}-{key}"


STALE_HOURS = 24  # a replaced entry, or a killed writer's temporary folder, untouched this long is removed


def fingerprint(name: str, byte_level: bool) -> dict | None:
    """What an entry of corpus `name` is made from: the file, or every file under its folder that its
    loader would read (`walk_files`: a PG-19 split folder's books, WikiText's split files, a plain
    folder's `*.txt` in every sub-folder), by path relative to it, size, modification and change
    times and inode (symbolic links followed), with the rules that split it. None where the path
    does not exist (`load_corpus` says why)."""
    rules = {"format": FORMAT, "corpus": name, "byte_level": byte_level}
    if name == "shakespeare":
        return {**rules, "sha256": SHAKESPEARE_FILE.sha256}
    path = Path(next((name[len(k):] for k in CORPUS_KINDS if name.startswith(k)), name))
    if name.startswith("enwik8:"):
        rules["split"] = list(ENWIK8_SPLIT)
    try:
        if path.is_file():
            return {**rules, "files": [[path.name, *_identity(path.stat())]]}
        if not path.is_dir():
            return None
        if name.startswith("wikitext103:"):  # (the split files the loader looks for, in the folders it looks in)
            candidates = [Path(folder) / f"wiki.{split}.{ext}" for folder in ("", "wikitext-103", "wikitext-103-raw")
                          for ext in ("tokens", "raw") for split in ("train", "valid", "test")]
            files = [[str(c), *_identity((path / c).stat())] for c in candidates if (path / c).is_file()]
        else:
            folders = ([(f"{folder}/", path / folder, False) for folder in ("train", "validation", "test")]
                       if name.startswith("pg19:") else [("", path, True)])
            files = [[prefix + name, *_identity(entry.stat())] for prefix, folder, recursive in folders
                     if folder.is_dir() for name, entry in walk_files(folder, (".txt",), recursive)]
    except (OSError, StillError):  # (a folder that cannot be listed: the loader says so)
        return None
    return {**rules, "files": files}


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def load_encoded(name: str, *, cache: str | Path | None = None, byte_level: bool = False,
                 splits: tuple[str, ...] = SPLITS, vocab: Vocab | None = None) -> EncodedCorpus:
    """Corpus `name` (as `load_corpus` takes it) as ids, from its cache entry where it has a current
    one; otherwise read, encoded and (where `vocab` is None: all three splits are read and the
    vocabulary built from them) written to a new entry, then mapped from it. A process that finds
    another making the entry waits for it (`_locked`) and maps it.

    With `vocab` (a trained run's), only `splits` are needed: they come from the entry where it
    was built with the same vocabulary, else they are read and encoded with `vocab` (a character
    outside it is an error, as `Vocab.encode` says) and nothing is written."""
    for split in splits:
        Corpus.check_split(split)
    name = absolute_corpus(name)  # (one entry whatever the working directory)
    root = corpora_root(cache)
    blocked = _file_in_the_way(root) if root is not None else None
    if blocked is not None:  # (a probe: "cannot open the lock ... (File exists)", then a failed write)
        log(f"{printable(str(root))} cannot hold encoded corpora ({printable(str(blocked))} is a file): this run "
            "keeps its ids in memory (STILL_CORPUS_CACHE chooses another folder)")
        root = None
    stamp = fingerprint(name, byte_level) if root is not None else None
    if stamp is not None:
        entry = entry_path(root, name, byte_level)
        _sweep(entry)
        found = _open(entry, stamp, vocab, splits)
        if found is not None:
            return found
    if vocab is not None:
        return _in_memory(load_corpus(name, cache=cache, byte_level=byte_level, splits=splits), vocab, splits)
    if stamp is None:
        return _read_into_memory(name, cache, byte_level)
    with _locked(entry, name) as lock:
        found = _open(entry, stamp, None, splits, say=False)  # (made by the process that held the lock)
        if found is not None:
            return found
        if lock.waited:
            failure = lock.failure()
            if failure is not None:  # (this one would fail too, and keep the others waiting in turn)
                log(f"the process that held the lock could not write {entry} ({failure}): this one reads {name} "
                    "into memory")
                return _read_into_memory(name, cache, byte_level)
            made_from = _made_from(entry)  # (the holder interrupted or killed, or it read a corpus changed since)
            log(f"the process that held the lock stopped without writing {entry} (interrupted or killed, say): "
                f"this one encodes {name}" if made_from is None else
                f"{entry} holds {name} as it was before a change: this one encodes it again" if made_from != stamp
                else f"{entry} is damaged: this one encodes {name} again")
        lock.note_failure(None)  # (an earlier holder's: this one's outcome is what the next waiter reads)
        _sweep(entry, writing=True)
        corpus = load_corpus(name, cache=cache, byte_level=byte_level)  # (a file a document: read as needed)
        vocab, lengths = _survey(corpus)
        try:
            size, placed = _write(entry, corpus, vocab, lengths, stamp)
        except OSError as e:
            lock.note_failure(str(e.strerror or e))
            log(f"could not write the encoded corpus to {entry.parent} ({e.strerror or e}): "
                "this run keeps its ids in memory (STILL_CORPUS_CACHE chooses another folder)")
            return _in_memory(corpus, vocab, lengths=lengths)
        allocator.give_back()  # (the texts' memory: nothing reads them again)
        found = _open(entry, stamp, vocab, splits)
        if found is not None:
            if placed:
                log(f"encoded {name} once into {entry} ({format_size(size)}): later runs, `lm eval` and every "
                    "process read its ids from there")
            return found
        return _in_memory(corpus, vocab, lengths=lengths)  # (replaced meanwhile, by a writer without the lock)


def _made_from(entry: Path) -> dict | None:
    """The fingerprint `entry`'s manifest records (None: no entry, or none readable)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest.get("fingerprint") if isinstance(manifest, dict) else None


def _read_into_memory(name: str, cache: str | Path | None, byte_level: bool) -> EncodedCorpus:
    """Every split read, its vocabulary built and its ids held in memory (no entry)."""
    corpus = load_corpus(name, cache=cache, byte_level=byte_level)
    vocab, lengths = _survey(corpus)
    return _in_memory(corpus, vocab, lengths=lengths)


_THREAD_LOCKS: dict[Path, threading.Lock] = {}  # a POSIX lock is the process's: its threads take these first
_THREAD_LOCKS_LOCK = threading.Lock()


def _thread_lock(entry: Path) -> threading.Lock:
    """This process's lock of `entry`, taken before the POSIX one (`_locked`, `_lock_if_free`)."""
    with _THREAD_LOCKS_LOCK:
        return _THREAD_LOCKS.setdefault(entry, threading.Lock())


@dataclass
class _Held:
    """`entry`'s lock as `_locked` holds it: whether another process or thread held it first
    (`waited`), and the lock file's handle (None: held without a POSIX lock), which notes why its
    holder could not write the entry, for the processes waiting after it."""

    waited: bool
    handle: Any = None

    def failure(self) -> str | None:
        """Why the holder before this one could not write the entry (None: it did not say so)."""
        if self.handle is None:
            return None
        try:
            self.handle.seek(0)
            note = self.handle.read(_NOTE_BYTES).decode("utf-8", "replace").strip()
        except OSError:
            return None
        return note or None

    def note_failure(self, reason: str | None) -> None:
        """Write `reason` into the lock file (None: clear it). Through the held handle: closing any
        other of this process's handles of the file would let go of its POSIX lock."""
        if self.handle is None:
            return
        with contextlib.suppress(OSError):  # (a lock file it may not write: the waiters encode in turn)
            self.handle.truncate(0)
            if reason:
                self.handle.write(printable(reason)[:_NOTE_BYTES].encode("utf-8", "replace"))
            self.handle.flush()


_NOTE_BYTES = 300  # the most of a failure's note read from the lock file


@contextlib.contextmanager
def _locked(entry: Path, name: str) -> Iterator[_Held]:
    """Hold `entry`'s lock, and yield it (`_Held`: whether another process or thread held it first): a
    `threading.Lock` of this process, then a POSIX lock (`fcntl.lockf`, which NFS also honours) on
    `.<entry>.lock` beside it, released when the process ends however it ends. Says so where another
    holds it, and waits. Where no POSIX lock can be had (no fcntl, a lock file it cannot open, a file
    system without locks), says so and goes on without one: the entry is still renamed into place whole."""
    thread_lock = _thread_lock(entry)
    waited = not thread_lock.acquire(blocking=False)
    if waited:
        log(f"waiting for another thread to encode {name} into {entry}")
        thread_lock.acquire()
    try:
        with _process_lock(entry, name) as held:
            yield _Held(waited or held.waited, held.handle)
    finally:
        thread_lock.release()


@contextlib.contextmanager
def _process_lock(entry: Path, name: str) -> Iterator[_Held]:
    try:
        import fcntl
    except ImportError:  # (not a POSIX system)
        yield _Held(False)
        return
    lock_file, waited = _lock_file(entry), False
    while True:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_file, "a+b")  # noqa: SIM115 - held across the yield
        except OSError as e:
            log(f"cannot open the lock of {entry} ({e.strerror or e}): encoding without it")
            yield _Held(False)
            return
        with handle:
            try:
                try:
                    fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):  # (held: EAGAIN, or EACCES on some systems)
                        raise
                    log(f"waiting for another process to encode {name} into {entry}")
                    waited = True
                    fcntl.lockf(handle, fcntl.LOCK_EX)
            except OSError as e:  # (a file system without locks)
                log(f"cannot lock {entry} ({e.strerror or e}): encoding without the lock")
                yield _Held(waited)
                return
            if not _is_current(handle, lock_file):  # (`remove_lock` removed it while this process waited)
                fcntl.lockf(handle, fcntl.LOCK_UN)
                continue
            try:
                yield _Held(waited, handle)
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)
            return


def _lock_file(entry: Path) -> Path:
    """The file whose POSIX lock is `entry`'s lock (`_process_lock`, `_lock_if_free`)."""
    return entry.parent / f".{entry.name}.lock"


def _is_current(handle, lock_file: Path) -> bool:
    """Whether `handle` is the file at `lock_file` now. `still data clear` removes a lock file under
    its lock (`remove`, `remove_lock`): a process that opened it before and waited for the lock then
    holds the lock of a file no one else opens, and must lock the one there now (a new one)."""
    try:
        held, there = os.fstat(handle.fileno()), os.stat(lock_file)
    except FileNotFoundError:
        return False
    except OSError:  # (cannot tell: as before lock files were removed)
        return True
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def _in_memory(corpus: Corpus, vocab: Vocab, splits: tuple[str, ...] = SPLITS,
               lengths: dict[str, list[int]] | None = None) -> EncodedCorpus:
    """The `splits`' ids held in memory. `lengths`: `_survey`'s, which read every document once
    already (one changed between the reads is named as such)."""
    encoded = {}
    digest = IdsDigest(vocab)
    for split in splits:
        docs = corpus.split(split)
        counted = lengths[split] if lengths is not None else [None] * len(docs)
        ids = [_encode(d, corpus, vocab, n) for d, n in zip(docs, counted)]
        encoded[split] = (ids, [d.name for d in docs])
        digest.split(split, np.cumsum([0, *map(len, ids)], dtype=np.int64))
        for one in ids:
            digest.ids(one.numpy())
    return EncodedCorpus(corpus.name, vocab, encoded, digest=digest.hexdigest() if splits == SPLITS else None,
                         split_digests=digest.split_hexdigests())


def _encode(document, corpus: Corpus, vocab: Vocab, length: int | None) -> torch.Tensor:
    """`document`'s ids (n,), in `vocab.compact_dtype`. `length`: what `_survey` counted, when it read
    the document whole and made `vocab` with it: a mismatch, or a character outside `vocab`, is a
    change since."""
    source = f"{corpus.name}/{document.name}"
    try:
        ids = vocab.encode(document.text, source, vocab.compact_dtype)
    except StillError as e:
        if length is None:
            raise
        raise StillError(f"{source} changed while it was being encoded ({e}): run again") from None
    if length is not None and len(ids) != length:
        raise StillError(f"{source} changed while it was being encoded: run again")
    return ids


def _numpy_dtype(vocab: Vocab) -> np.dtype:
    return np.dtype(str(vocab.compact_dtype).removeprefix("torch."))


class IdsDigest:
    """The SHA-256 of a corpus as a run trains on it: the vocabulary, then for each split in turn
    its name, its documents' bounds (`starts`, int64) and its ids (the vocabulary's compact dtype,
    as written). The same text gives the same digest however it was read: encoded into an entry
    (`_write`, a document at a time) or held in memory. Each split's own digest is the same with
    that split alone after the vocabulary (`split_hexdigests`)."""

    def __init__(self, vocab: Vocab) -> None:
        self._vocab = vocab.to_json().encode()
        self._hash = hashlib.sha256(self._vocab)
        self._splits: dict[str, Any] = {}  # name -> its own hash

    def split(self, name: str, starts: np.ndarray) -> None:
        self._splits[name] = hashlib.sha256(self._vocab)
        for h in (self._hash, self._splits[name]):
            h.update(f"\0{name}\0".encode())
            h.update(np.ascontiguousarray(starts, dtype="<i8").tobytes())

    def ids(self, ids: np.ndarray) -> None:  # (of the split begun last)
        data = np.ascontiguousarray(ids)  # (its bytes, as `tobytes` gives them, without the copy)
        self._hash.update(data)
        next(reversed(self._splits.values())).update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def split_hexdigests(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self._splits.items()}


def _survey(corpus: Corpus) -> tuple[Vocab, dict[str, list[int]]]:
    """The vocabulary of all three splits (as `Vocab.build`) and each document's number of ids (a
    character each, or a byte each), reading one document at a time."""
    present, lengths = no_characters(), {}
    for split in SPLITS:
        lengths[split] = []
        for document in corpus.split(split):
            text = document.text
            if corpus.byte_level:
                lengths[split].append(len(text.encode("utf-8")) if isinstance(text, str) else len(text))
            else:
                mark_characters(text, present)
                lengths[split].append(len(text))
    return Vocab(byte_level=True) if corpus.byte_level else Vocab.of_characters(present), lengths


def _sweep(entry: Path, writing: bool = False) -> None:
    """Remove the replaced entries of `entry` (moved aside, then touched: `_write`) and killed writers'
    temporary folders untouched for `STALE_HOURS` (a first encoding of PG-19 takes minutes: a
    folder that old is no process's work). `writing`: this process holds the entry's lock, so every
    temporary folder is a killed writer's, whatever its age."""
    try:
        left_behind = list(entry.parent.glob(f".{glob.escape(entry.name)}.*"))
    except OSError:
        return
    for left in left_behind:
        try:
            stale = time.time() - left.stat().st_mtime > STALE_HOURS * 3600
        except OSError:
            continue
        if ((stale and left.name.endswith((".tmp", ".old"))) or (writing and left.name.endswith(".tmp"))) \
                and left.is_dir():
            shutil.rmtree(left, ignore_errors=True)


def _write(entry: Path, corpus: Corpus, vocab: Vocab, lengths: dict[str, list[int]],
           stamp: dict) -> tuple[int, bool]:
    """Write the entry (into a temporary folder beside it, flushed, then renamed over it), a document
    at a time (`lengths`: each one's number of ids, `_survey`): its size in bytes, and whether it was
    placed (not where another process without the lock placed one first)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        dtype = _numpy_dtype(vocab)
        sizes = {}
        digest = IdsDigest(vocab)
        for split in SPLITS:
            docs = corpus.split(split)
            starts = np.cumsum([0, *lengths[split]], dtype=np.int64)
            digest.split(split, starts)
            with open(tmp / f"{split}.npy", "wb") as f:  # (written in turn, not through a mapping: its pages
                # would count as this process's)
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": (int(starts[-1]),)})
                for d, n in zip(docs, lengths[split]):  # (read again: a file of its own is not kept)
                    ids = _encode(d, corpus, vocab, n).numpy()
                    digest.ids(ids)
                    ids.tofile(f)
                f.flush()
                os.fsync(f.fileno())
            atomic_write(tmp / f"{split}.starts.npy", lambda path, starts=starts: _save(path, starts))
            sizes[split] = {"documents": len(docs), "tokens": int(starts[-1]), "names": [d.name for d in docs],
                            "written": _identity((tmp / f"{split}.npy").stat())}  # (`_open`: not read again)
        vocab_json = vocab.to_json()
        atomic_write_text(tmp / "vocab.json", vocab_json)
        atomic_write_text(tmp / "manifest.json", json.dumps({"fingerprint": stamp, "name": corpus.name,
                                                             "dtype": dtype.name, "splits": sizes,
                                                             "vocab_sha256": _sha256_text(vocab_json),
                                                             "digest": digest.hexdigest(),
                                                             "split_digests": digest.split_hexdigests()}) + "\n")
        size = sum(f.stat().st_size for f in tmp.iterdir())
        os.chmod(tmp, 0o777 & ~process_umask())  # (mkdtemp makes it private: others sharing the cache read it too)
        if entry.exists():  # aside, for `_sweep` to remove a day later: a run elsewhere may still be reading it
            _move_aside(entry)
        try:
            os.replace(tmp, entry)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # (another process, without the lock, placed one: it stands)
            return size, False
        return size, True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_aside(entry: Path) -> Path:
    """Rename `entry` to `.<entry>.<random>.old` beside it (what `_sweep` removes a day later, and
    `remove` at once), touched: a renamed folder keeps its time, and its day starts now. Raises
    where it cannot (the empty folder made for it removed again)."""
    aside = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".old", dir=entry.parent))
    try:
        os.replace(entry, aside)
    except OSError:
        with contextlib.suppress(OSError):
            aside.rmdir()
        raise
    os.utime(aside)
    return aside


def _split_digest(vocab: Vocab, split: str, starts: np.ndarray, ids: np.ndarray) -> str:
    """Split `split`'s own digest (`IdsDigest.split_hexdigests`: what the manifest records) of its
    document bounds and ids (reads every page of a mapped `ids`)."""
    digest = IdsDigest(vocab)
    digest.split(split, starts)
    digest.ids(ids)
    return digest.split_hexdigests()[split]


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # (np.save given a path adds ".npy" to it)
        np.save(f, array)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _open(entry: Path, stamp: dict, vocab: Vocab | None, splits: tuple[str, ...],
          say: bool = True) -> EncodedCorpus | None:
    """The entry's splits mapped from disk, or None where there is none made from `stamp` (and, with
    `vocab`, with that vocabulary). A damaged entry is said (where `say`), and None."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != stamp:
        return None
    try:
        text = (entry / "vocab.json").read_text(encoding="utf-8")
        if _sha256_text(text) != manifest.get("vocab_sha256"):  # (the ids' check below reads only ids written since)
            raise ValueError("its vocab.json is not the one its ids were written with")
        own = Vocab.from_json(text)
        if vocab is not None and own.to_json() != vocab.to_json():
            return None
        encoded, verified = {}, {}
        for split in splits:
            sizes = manifest["splits"][split]
            ids = np.load(entry / f"{split}.npy", mmap_mode="c")  # (copy on write: never written)
            starts = np.load(entry / f"{split}.starts.npy")
            names = sizes["names"]
            if (ids.dtype != _numpy_dtype(own) or ids.dtype.name != manifest["dtype"]
                    or ids.shape != (sizes["tokens"],) or starts.shape != (len(names) + 1,)
                    or starts[0] != 0 or starts[-1] != len(ids) or (np.diff(starts) < 0).any()):
                raise ValueError(f"{split}'s arrays disagree with the manifest")
            # the ids as written, so that a damaged file is said here, not served as other text (a probe:
            # ids overwritten within the vocabulary gave `lm eval` another bits-per-character, unsaid) nor
            # met as an embedding's index error in the middle of a run. Only a file written since (or
            # copied: its size, times or inode not those `_write` recorded) is read for it, against the
            # split's digest: a pass over the ids (PG-19's training split is 23 GB, read from the disk at
            # every start where it is not in the page cache)
            identity = _identity(os.stat(entry / f"{split}.npy"))
            if sizes.get("written") != identity:
                if _split_digest(own, split, starts, ids) != manifest["split_digests"][split]:
                    raise ValueError(f"{split}'s ids are not the ones written: their SHA-256 is not the manifest's")
                verified[split] = identity
            flat = torch.from_numpy(ids)
            encoded[split] = ([flat[a:b] for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())], list(names))
    except (OSError, ValueError, KeyError, TypeError, StillError) as e:
        if say:
            log(f"the encoded corpus {entry} is damaged ({e}): reading the corpus instead")
        return None
    if verified:  # the files as they are now, read once (a review probe: a copied or chmod-ed entry's
        # splits were hashed whole at every open, PG-19's 23 GB about 13 s a start); where the entry is
        # read-only to this user, they are read again next time
        for split, identity in verified.items():
            manifest["splits"][split]["written"] = identity
        with contextlib.suppress(OSError):
            atomic_write_text(entry / "manifest.json", json.dumps(manifest))
    digest = manifest["digest"] if isinstance(manifest.get("digest"), str) else None
    split_digests = manifest.get("split_digests")
    split_digests = ({k: v for k, v in split_digests.items() if isinstance(v, str)}
                     if isinstance(split_digests, dict) else {})
    return EncodedCorpus(manifest.get("name", stamp["corpus"]), own, encoded, entry, digest, split_digests)


# ----------------------------------------------------------------------------- what the cache holds


@dataclass(frozen=True)
class Entry:
    """An entry under the corpora's root, as `still data list` shows it."""

    path: Path
    corpus: str | None  # the corpus it was made from, as `load_corpus` takes it (None: its manifest is unreadable)
    byte_level: bool | None
    tokens: int | None  # ids in its three splits
    size: int  # bytes on disk
    made: float  # when it was placed (its manifest's modification time, else its folder's)
    state: str  # one of STATES


STATES = ("current", "corpus changed", "corpus missing", "another format", "damaged")
"""An entry's state: made from the corpus as it is now; from files since changed, added or removed;
from a corpus not there now (a folder moved away, a drive not mounted: current again once it is
back); by a version of `still` that writes another `FORMAT`; or missing some of its files."""

_ENTRY_NAME = re.compile(r"[A-Za-z0-9_.-]+-[0-9a-f]{20}")  # `entry_path`'s: <label>-<key>
_LEFT_NAME = re.compile(r"\.(?P<entry>[A-Za-z0-9_.-]+-[0-9a-f]{20})\.[^.]+\.(tmp|old)")  # `_write`'s, `remove`'s


_ENTRY_FILES = {"manifest.json", "vocab.json", *(f"{split}{part}.npy" for split in SPLITS for part in ("", ".starts"))}
"""What `_write` puts into an entry."""


def others_in(folder: Path) -> list[str]:
    """The names in a folder named as an entry that make it none: where it holds no manifest.json,
    anything but an entry's files and their writers' temporaries (`atomic_write`'s `.<file>.*.tmp`).
    A folder the user keeps other things in, named `<label>-<20 hex digits>` by chance (a probe:
    photos-0123456789abcdef0123/a.jpg, called damaged and removed), is left alone. An empty list: an
    entry, damaged or not."""
    if (folder / "manifest.json").is_file():
        return []
    try:
        names = sorted(path.name for path in folder.iterdir())
    except OSError as e:
        return [f"(unreadable: {e.strerror or e})"]
    return [name for name in names if name not in _ENTRY_FILES
            and not ((found := temporary_of(name)) and found[0] in _ENTRY_FILES)]


def entries(root: Path) -> tuple[list[Entry], list[Path]]:
    """The entries under `root` (by name), and what is left beside them: replaced entries and
    writers' temporary folders (`_sweep` removes them once a day old; a temporary folder may be a
    running writer's). Only folders named as `entry_path` and `_write` name them count: anything
    else in the folder (it may be one the user keeps other things in) is none of these, and left
    alone, as are symbolic links and folders named as entries that hold other files (`others_in`;
    `not_entries` lists them)."""
    found, left = [], []
    try:
        listing = sorted(root.iterdir())
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise StillError(f"cannot list {root}: {e.strerror or e}") from None
    for path in listing:
        if path.is_symlink() or not path.is_dir():  # (the lock files; links: not made here)
            continue
        if _ENTRY_NAME.fullmatch(path.name):
            if not others_in(path):
                found.append(_describe(path))
        elif _LEFT_NAME.fullmatch(path.name):
            left.append(path)
    return found, left


def not_entries(root: Path) -> list[Path]:
    """The folders under `root` named as entries that are none (`others_in`): left, and said, by
    `still data list` and `clear`."""
    try:
        listing = sorted(root.iterdir())
    except OSError:
        return []
    return [path for path in listing if _ENTRY_NAME.fullmatch(path.name) and not path.is_symlink() and path.is_dir()
            and others_in(path)]


def folder_size(path: Path) -> int:
    """Bytes of the files under `path` (0 where it cannot be read; links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for file in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, file)).st_size
    return total


def _describe(path: Path) -> Entry:
    size, made = folder_size(path), 0.0
    with contextlib.suppress(OSError):
        made = path.stat().st_mtime
    try:
        manifest_path = path / "manifest.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        made = manifest_path.stat().st_mtime
        stamp = manifest["fingerprint"]
        corpus, byte_level = stamp["corpus"], stamp["byte_level"]
        tokens = sum(int(manifest["splits"][split]["tokens"]) for split in SPLITS)
        if not isinstance(corpus, str) or not isinstance(byte_level, bool):
            raise TypeError("the fingerprint names no corpus")
        files = ["vocab.json", *(f"{split}{part}.npy" for split in SPLITS for part in ("", ".starts"))]
        if not all((path / file).is_file() for file in files):
            raise FileNotFoundError("a file of the entry is missing")
    except (OSError, ValueError, KeyError, TypeError):
        return Entry(path, None, None, None, size, made, "damaged")
    if stamp.get("format") != FORMAT:
        state = "another format"
    else:
        now = fingerprint(corpus, byte_level)
        state = "current" if now == stamp else "corpus missing" if now is None else "corpus changed"
        if state == "current" and _open(path, stamp, None, SPLITS, say=False) is None:
            state = "damaged"  # (its arrays cut short, or disagreeing with the manifest: a run would not read it)
    return Entry(path, corpus, byte_level, tokens, size, made, state)


def remove(path: Path, stale_only: bool = False) -> str | None:
    """Remove `path` (an entry, or a folder `entries` lists beside them): None where it is gone
    (or was already), else why it is left. An entry is left while another process holds its lock
    (is writing it) or, with `stale_only`, where it is current when the lock is had (made again
    since it was listed). An entry is renamed aside under the lock, then removed without it: a run
    that starts meanwhile finds none and makes it again; runs that mapped it on this machine read on
    (the disk space is given back when they end)."""
    is_entry = _ENTRY_NAME.fullmatch(path.name) is not None
    match = None if is_entry else _LEFT_NAME.fullmatch(path.name)
    if (not is_entry and match is None) or path.is_symlink():
        return "not an entry of the corpus cache"
    if is_entry and path.is_dir() and (others := others_in(path)):
        return f"not an entry of the corpus cache: it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
    owner = path if is_entry else path.with_name(match["entry"])
    with _lock_if_free(owner) as busy:
        if busy:
            return busy
        if not path.is_dir():
            return None
        if is_entry and stale_only and _describe(path).state == "current":
            return "current now: made again since it was listed"
        target = path
        if is_entry:
            try:
                target = _move_aside(path)
            except FileNotFoundError:  # (removed meanwhile, by another `clear`)
                return None
            except OSError as e:
                return f"cannot remove it: {e.strerror or e}"
            with contextlib.suppress(OSError):  # (its lock too, under it; one that stays, `remove_lock` says)
                _lock_file(path).unlink()
    failed: list[BaseException] = []

    def note(function, name, error: BaseException) -> None:  # (gone already is fine)
        if not isinstance(error, FileNotFoundError):
            failed.append(error)

    if sys.version_info >= (3, 12):
        shutil.rmtree(target, onexc=note)
    else:
        shutil.rmtree(target, onerror=lambda function, name, info: note(function, name, info[1]))
    if failed:
        error = failed[0]
        reason = getattr(error, "strerror", None) or error
        return f"cannot remove it ({reason}): what is left of it is in {target}"
    return None


@contextlib.contextmanager
def _lock_if_free(entry: Path) -> Iterator[str | None]:
    """Hold `entry`'s lock where no other thread or process holds it (yield None), else yield at
    once why not. A lock file this process may not write is locked shared through a read-only
    handle, which a writer's lock excludes as well; where there is no lock file and none can be
    made, no writer can have taken one; a file system without locks leaves the thread lock alone,
    as it leaves writers."""
    thread_lock = _thread_lock(entry)
    if not thread_lock.acquire(blocking=False):
        yield "another thread of this process is writing or removing it"
        return
    try:
        handle, busy = _take_if_free(_lock_file(entry))
        try:
            yield busy
        finally:
            if handle is not None:
                import fcntl

                fcntl.lockf(handle, fcntl.LOCK_UN)
                handle.close()
    finally:
        thread_lock.release()


def _take_if_free(lock_file: Path):
    """(`lock_file`'s handle, locked, or None; why it is not free, or None) (`_lock_if_free`)."""
    try:
        import fcntl
    except ImportError:  # (not a POSIX system)
        return None, None
    while True:
        mode = fcntl.LOCK_EX
        try:
            handle = open(lock_file, "a+b")  # noqa: SIM115 - held by the caller
        except FileNotFoundError:  # (its folder is gone: nothing to remove)
            return None, None
        except OSError:
            try:
                handle, mode = open(lock_file, "rb"), fcntl.LOCK_SH  # noqa: SIM115
            except FileNotFoundError:
                return None, None
            except OSError as e:
                return None, f"cannot open its lock {lock_file} ({e.strerror or e})"
        try:
            fcntl.lockf(handle, mode | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None, "another process is encoding that corpus now"
            return None, None  # (a file system without locks)
        if _is_current(handle, lock_file):
            return handle, None
        handle.close()  # (removed by another `clear` meanwhile: lock the one there now)


_LOCK_NAME = re.compile(r"\.(?P<entry>[A-Za-z0-9_.-]+-[0-9a-f]{20})\.lock")  # `_lock_file`'s


def orphan_locks(root: Path) -> list[Path]:
    """The lock files under `root` of corpora that have no entry (by name). Every corpus a run has
    tried to encode has one (`_process_lock`), whether or not its entry was made (empty, or why its
    last writer could not write the entry: `_Held.note_failure`), and
    `remove` removes only the lock of an entry it removes: these are what `remove_lock` clears."""
    try:
        listing = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StillError(f"cannot list {root}: {e.strerror or e}") from None
    return [path for path in listing if (match := _LOCK_NAME.fullmatch(path.name)) and not path.is_symlink()
            and path.is_file() and not os.path.lexists(path.with_name(match["entry"]))]


def remove_lock(lock_file: Path) -> str | None:
    """Remove the lock file of a corpus that has no entry (`orphan_locks`): None where it is gone
    (or was already), else why it is left. It is taken first, without waiting: one a process holds
    (it is encoding that corpus now) is left, as is one whose entry was made since it was listed. A
    process that opened it before and waits for it locks the new file then (`_is_current`)."""
    match = _LOCK_NAME.fullmatch(lock_file.name)
    if match is None or lock_file.is_symlink():
        return "not a lock of the corpus cache"
    entry = lock_file.with_name(match["entry"])
    with _lock_if_free(entry) as busy:
        if busy:
            return busy
        if os.path.lexists(entry):
            return "its corpus has an entry now: made since it was listed"
        try:
            lock_file.unlink()
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"cannot remove it: {e.strerror or e}"
    return None
