"""A corpus's ids on disk: encoded once, then memory-mapped by every later run, `lm eval` and every
process of a torchrun job.

Read and encoded at every start, PG-19's training books (about 11.7 G characters) cost each process
minutes and the text and its ids in memory (about 35 GB: a byte a character as a Python string, two
as int16 ids), once per process of a torchrun job. The first run writes an entry instead:

    <root>/<corpus>-<key>/
        manifest.json    what it was made from (the fingerprint below), its splits' sizes, the names
        vocab.json       the vocabulary built from all three splits
        train.npy ...    each split's ids, one array in the vocabulary's compact dtype
        train.starts.npy ...  where each document starts in it (documents + 1 offsets)

and later runs map the arrays (`numpy.load(mmap_mode="c")`): nothing is read until a segment needs
it, and every process on the machine shares the pages through the operating system's page cache.
The entry is made a document at a time: each file of its own (`FileDocument`) is read once for the
vocabulary and its length, then again for its ids, which are written in turn, so the process holds
one document's text and ids at a time.

`<root>` is `$STILL_CORPUS_CACHE`, else `corpora/` in the data cache (`still.data.cache.cache_dir`);
`STILL_CORPUS_CACHE=off` encodes at every start as before and writes nothing. An entry is kept per
corpus location and kind of vocabulary (characters or bytes), with a fingerprint of what it was made
from: every file under the corpus's path by relative path, size and modification time (the bundled
Shakespeare: its pinned SHA-256). A file changed, added or removed since makes a new encoding, written
over the old one. An entry is written into a temporary folder and renamed into place, so a run
stopped while writing leaves none; one that cannot be written (a full disk, no permission) is said,
and the run goes on with its ids in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
)
from still.errors import StillError
from still.train.io import atomic_write_text
from still.train.progress import log

FORMAT = 1  # (raise it when what an entry holds, or how a corpus is split, changes: older entries are made again)
OFF = ("0", "off", "no", "false")


@dataclass(frozen=True)
class EncodedCorpus:
    """A corpus's splits as ids: per split, its documents' ids (each (n,), in `vocab.compact_dtype`)
    and their names. `entry`: the cache entry they are mapped from (None: held in memory)."""

    name: str  # what the results call it: "shakespeare", "pg19", a file's stem ...
    vocab: Vocab
    splits: dict[str, tuple[list[torch.Tensor], list[str]]]
    entry: Path | None = None

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


def entry_path(root: Path, name: str, byte_level: bool) -> Path:
    """The entry of corpus `name` (as `load_corpus` takes it, made absolute) read by characters or bytes."""
    key = hashlib.sha256(json.dumps([name, byte_level]).encode()).hexdigest()[:20]
    kind = next((k.rstrip(":") for k in CORPUS_KINDS if name.startswith(k)), None)
    label = kind or (name if name == "shakespeare" else Path(name).stem or "corpus")
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:40]
    return root / f"{label}-{key}"


def fingerprint(name: str, byte_level: bool) -> dict | None:
    """What an entry of corpus `name` is made from: every file under its path, by path relative to
    it, size and modification time (symbolic links followed), with the rules that split it. None
    where the path does not exist (`load_corpus` says why)."""
    rules = {"format": FORMAT, "corpus": name, "byte_level": byte_level}
    if name == "shakespeare":
        return {**rules, "sha256": SHAKESPEARE_FILE.sha256}
    path = Path(next((name[len(k):] for k in CORPUS_KINDS if name.startswith(k)), name))
    if name.startswith("enwik8:"):
        rules["split"] = list(ENWIK8_SPLIT)
    try:
        if path.is_file():
            stat = path.stat()
            return {**rules, "files": [[path.name, stat.st_size, stat.st_mtime_ns]]}
        if not path.is_dir():
            return None
        files: list[list] = []
        _list_files(str(path), "", set(), files)
    except OSError:
        return None
    return {**rules, "files": files}


def _list_files(folder: str, prefix: str, seen: set[str], files: list[list]) -> None:
    """Append [path under the corpus, size, modification time] of every file under `folder`, in
    order of name, links followed, each folder once (os.scandir: 0.2 s for 28,000 books, where
    os.walk and pathlib took 0.44 s)."""
    real = os.path.realpath(folder)
    if real in seen:  # (a link back up the tree)
        return
    seen.add(real)
    with os.scandir(folder) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir():
            _list_files(entry.path, f"{prefix}{entry.name}/", seen, files)
        elif entry.is_file():
            stat = entry.stat()
            files.append([prefix + entry.name, stat.st_size, stat.st_mtime_ns])


def load_encoded(name: str, *, cache: str | Path | None = None, byte_level: bool = False,
                 splits: tuple[str, ...] = SPLITS, vocab: Vocab | None = None) -> EncodedCorpus:
    """Corpus `name` (as `load_corpus` takes it) as ids, from its cache entry where it has a current
    one; otherwise read, encoded and (where `vocab` is None: all three splits are read and the
    vocabulary built from them) written to a new entry, then mapped from it.

    With `vocab` (a trained run's), only `splits` are needed: they come from the entry where it
    was built with the same vocabulary, else they are read and encoded with `vocab` (a character
    outside it is an error, as `Vocab.encode` says) and nothing is written."""
    for split in splits:
        Corpus.check_split(split)
    name = absolute_corpus(name)  # (one entry whatever the working directory)
    root = corpora_root(cache)
    stamp = fingerprint(name, byte_level) if root is not None else None
    entry = entry_path(root, name, byte_level) if root is not None else None
    if stamp is not None:
        found = _open(entry, stamp, vocab, splits)
        if found is not None:
            return found
    if vocab is not None:
        corpus = load_corpus(name, cache=cache, byte_level=byte_level, splits=splits)
        return _in_memory(corpus, vocab, splits)
    corpus = load_corpus(name, cache=cache, byte_level=byte_level)  # (a file a document: read as needed)
    vocab, lengths = _survey(corpus)
    if stamp is not None:
        try:
            size = _write(entry, corpus, vocab, lengths, stamp)
        except OSError as e:
            log(f"could not write the encoded corpus to {entry.parent} ({e.strerror or e}): "
                "this run keeps its ids in memory (STILL_CORPUS_CACHE chooses another folder)")
        else:
            allocator.give_back()  # (the texts' memory: nothing reads them again)
            found = _open(entry, stamp, vocab, splits)
            if found is not None:
                shown = f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 2**10:,.1f} KiB"
                log(f"encoded {name} once into {entry} ({shown}): later runs, `lm eval` and every process "
                    "read its ids from there")
                return found
    return _in_memory(corpus, vocab, SPLITS)


def _in_memory(corpus: Corpus, vocab: Vocab, splits: tuple[str, ...]) -> EncodedCorpus:
    encoded = {}
    for split in splits:
        docs = corpus.split(split)
        encoded[split] = ([vocab.encode(d.text, f"{corpus.name}/{d.name}", vocab.compact_dtype) for d in docs],
                          [d.name for d in docs])
    return EncodedCorpus(corpus.name, vocab, encoded)


def _numpy_dtype(vocab: Vocab) -> np.dtype:
    return np.dtype(str(vocab.compact_dtype).removeprefix("torch."))


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


def _write(entry: Path, corpus: Corpus, vocab: Vocab, lengths: dict[str, list[int]], stamp: dict) -> int:
    """Write the entry (into a temporary folder beside it, then renamed over it), a document at a time
    (`lengths`: each one's number of ids, `_survey`); its size in bytes."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        dtype = _numpy_dtype(vocab)
        sizes = {}
        for split in SPLITS:
            docs = corpus.split(split)
            starts = np.cumsum([0, *lengths[split]], dtype=np.int64)
            with open(tmp / f"{split}.npy", "wb") as f:  # (written in turn, not through a mapping: its pages
                # would count as this process's)
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": (int(starts[-1]),)})
                for d, n in zip(docs, lengths[split]):
                    source = f"{corpus.name}/{d.name}"
                    try:  # (read again: a file of its own is not kept, `FileDocument`)
                        ids = vocab.encode(d.text, source, vocab.compact_dtype).numpy()
                    except StillError as e:  # (it was read whole, and made the vocabulary, in `_survey`)
                        raise StillError(f"{source} changed while it was being encoded ({e}): run again") from None
                    if len(ids) != n:
                        raise StillError(f"{source} changed while it was being encoded: run again")
                    f.write(ids.tobytes())
            np.save(tmp / f"{split}.starts.npy", starts)
            sizes[split] = {"documents": len(docs), "tokens": int(starts[-1]), "names": [d.name for d in docs]}
        (tmp / "vocab.json").write_text(vocab.to_json(), encoding="utf-8")
        atomic_write_text(tmp / "manifest.json", json.dumps({"fingerprint": stamp, "name": corpus.name,
                                                             "dtype": dtype.name, "splits": sizes}) + "\n")
        size = sum(f.stat().st_size for f in tmp.iterdir())
        old = entry.with_name(f".{entry.name}.{os.getpid()}.old")
        if entry.exists():
            os.replace(entry, old)  # (a reader mapping its files keeps them until it closes them)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process put one there meanwhile: theirs stands
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        return size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open(entry: Path, stamp: dict, vocab: Vocab | None, splits: tuple[str, ...]) -> EncodedCorpus | None:
    """The entry's splits mapped from disk, or None where there is none made from `stamp` (and, with
    `vocab`, with that vocabulary). A damaged entry is said, and None."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != stamp:
        return None
    try:
        own = Vocab.from_json((entry / "vocab.json").read_text(encoding="utf-8"))
        if vocab is not None and own.to_json() != vocab.to_json():
            return None
        encoded = {}
        for split in splits:
            sizes = manifest["splits"][split]
            ids = np.load(entry / f"{split}.npy", mmap_mode="c")  # (copy on write: never written)
            starts = np.load(entry / f"{split}.starts.npy")
            names = sizes["names"]
            if (ids.dtype != _numpy_dtype(own) or ids.dtype.name != manifest["dtype"]
                    or ids.shape != (sizes["tokens"],) or starts.shape != (len(names) + 1,)
                    or starts[0] != 0 or starts[-1] != len(ids) or (np.diff(starts) < 0).any()):
                raise ValueError(f"{split}'s arrays disagree with the manifest")
            flat = torch.from_numpy(ids)
            encoded[split] = ([flat[a:b] for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())], list(names))
    except (OSError, ValueError, KeyError, TypeError, StillError) as e:
        log(f"the encoded corpus {entry} is damaged ({e}): encoding the corpus again")
        return None
    return EncodedCorpus(manifest.get("name", stamp["corpus"]), own, encoded, entry)
