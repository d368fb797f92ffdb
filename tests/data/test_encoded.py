"""A corpus encoded once into the cache and mapped from there (`still.data.encoded`)."""

import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from still.data import encoded as encoded_module
from still.data.encoded import corpora_root, entry_path, fingerprint, load_encoded
from still.data.text import SPLITS, Vocab, load_corpus
from still.errors import StillError


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "corpora"
    monkeypatch.setenv("STILL_CORPUS_CACHE", str(root))
    return root


def _books(folder, text_of=lambda split, i: f"{split} book {i}: to be, or not to be\n" * (3 + i)):
    for split, books in (("train", 3), ("validation", 1), ("test", 2)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(books):
            (folder / split / f"{100 + i}.txt").write_text(text_of(split, i), encoding="utf-8")
    return f"pg19:{folder}"


def _expected(name, byte_level=False):
    """Each split's ids and names, encoded in memory as before the cache."""
    corpus = load_corpus(name, byte_level=byte_level)
    vocab = Vocab.build(corpus.train + corpus.valid + corpus.test, byte_level=byte_level)
    return vocab, {s: ([vocab.encode(d.text, dtype=vocab.compact_dtype) for d in corpus.split(s)],
                       [d.name for d in corpus.split(s)]) for s in SPLITS}


def _assert_same(encoded, vocab, splits, names=SPLITS):
    assert encoded.vocab.to_json() == vocab.to_json()
    for split in names:
        docs, doc_names = encoded.split(split)
        want_docs, want_names = splits[split]
        assert doc_names == want_names and len(docs) == len(want_docs)
        for got, want in zip(docs, want_docs):
            assert got.dtype == torch.int16 and torch.equal(got, want)


def _entries(root):
    """The entries in `root` (not their locks, nor what is left aside for `_sweep`)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def _aside(root, suffix):
    return [p.name for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(suffix)]


def _hold(lock, note=None):
    """A process that holds `lock` until its stdin closes (a writer at work); with `note`, one that
    then notes in it why it could not write the entry (as `_Held.note_failure` does)."""
    then = f"f.truncate(0)\nf.write({note!r}.encode())\nf.flush()\n" if note else ""
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import fcntl, sys\nf = open({str(lock)!r}, 'a+b')\nfcntl.lockf(f, fcntl.LOCK_EX)\n"
                               f"print('held', flush=True)\nsys.stdin.read()\n{then}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_corpus_is_encoded_once_and_mapped_after(tmp_path, root, reads, capsys):
    name = _books(tmp_path / "pg")
    vocab, splits = _expected(name)
    reads.clear()
    first = load_encoded(name)
    # every book twice, one at a time: for the vocabulary and the lengths, then for the ids
    assert reads == ["100.txt", "101.txt", "102.txt", "100.txt", "100.txt", "101.txt"] * 2
    assert first.entry == entry_path(root, name, False) and _entries(root) == [first.entry.name]
    assert f"encoded {name} once into {first.entry}" in capsys.readouterr().err
    _assert_same(first, vocab, splits)
    assert first.name == "pg19" and first.train_tokens == sum(len(d) for d in splits["train"][0])

    reads.clear()
    again = load_encoded(name)
    assert reads == [] and again.entry == first.entry and capsys.readouterr().err == ""
    _assert_same(again, vocab, splits)
    docs, _ = again.split("train")  # views of one array mapped from the entry's file
    assert all(d.untyped_storage().data_ptr() == docs[0].untyped_storage().data_ptr() for d in docs)
    assert isinstance(np.load(again.entry / "train.npy", mmap_mode="c"), np.memmap)


def test_a_changed_added_or_removed_file_encodes_again(tmp_path, root, reads):
    name = _books(tmp_path / "pg")
    load_encoded(name)
    book = tmp_path / "pg" / "train" / "101.txt"
    stat = book.stat()
    book.write_text(book.read_text().replace("to be", "TO BE"))  # the same size
    os.utime(book, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    for change in (lambda: None, lambda: (tmp_path / "pg" / "train" / "103.txt").write_text("new book\n"),
                   lambda: (tmp_path / "pg" / "test" / "100.txt").unlink()):
        change()
        vocab, splits = _expected(name)
        reads.clear()
        encoded = load_encoded(name)
        assert reads  # read again ...
        _assert_same(encoded, vocab, splits)
        assert _entries(root) == [encoded.entry.name] and not _aside(root, ".tmp")  # ... over the old entry,
    assert len(_aside(root, ".old")) == 3  # (each old one moved aside, for `_sweep` to remove a day later)
    assert "TO BE" in encoded.vocab.decode(encoded.split("train")[0][1])
    assert encoded.split("train")[1] == ["100", "101", "102", "103"] and encoded.split("test")[1] == ["101"]


def _digest(name, only=None):
    """The digest's definition, computed here from the text: SHA-256 of the vocabulary's JSON, then
    each split's name, its documents' bounds (int64) and its ids; `only`: that split's own digest,
    the same with it alone."""
    import hashlib

    vocab, splits = _expected(name)
    whole = hashlib.sha256(vocab.to_json().encode())
    for split in (SPLITS if only is None else (only,)):
        digest = hashlib.sha256(vocab.to_json().encode()) if only is not None else whole
        docs = splits[split][0]
        digest.update(f"\0{split}\0".encode())
        digest.update(np.cumsum([0, *map(len, docs)], dtype="<i8").tobytes())
        for ids in docs:
            digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def test_the_digest_is_the_texts_however_it_was_read(tmp_path, root, monkeypatch, reads):
    """A training run records it, so that it never resumes on other text (`still lm train`): the
    same for the same text, whether encoded into an entry, mapped from it or held in memory, and
    after the files are touched and encoded again; another for other text of the same characters."""
    name = _books(tmp_path / "pg")
    want = _digest(name)
    made = load_encoded(name)
    assert made.digest == want and load_encoded(name).digest == want  # written, then mapped
    book = tmp_path / "pg" / "train" / "101.txt"
    os.utime(book, ns=(book.stat().st_atime_ns, book.stat().st_mtime_ns + 1_000_000))
    reads.clear()
    assert load_encoded(name).digest == want and reads  # encoded again, the same text
    vocab = made.vocab
    assert load_encoded(name, splits=("test",), vocab=vocab).digest == want  # the entry's, for `lm eval`
    monkeypatch.setenv("STILL_CORPUS_CACHE", "off")
    assert load_encoded(name).digest == want  # in memory
    assert load_encoded(name, splits=("test",), vocab=vocab).digest is None  # not every split read
    each = {split: _digest(name, split) for split in SPLITS}
    assert len(set(each.values())) == 3 and want not in each.values()
    assert load_encoded(name).split_digests == each  # in memory
    assert load_encoded(name, splits=("test",), vocab=vocab).split_digests == {"test": each["test"]}
    book.write_text(" ".join(reversed(book.read_text().split(" "))))  # the same characters, other text
    assert _digest(name) != want and load_encoded(name).digest == _digest(name)
    assert load_encoded(name).split_digests == each | {"train": _digest(name, "train")} != each
    monkeypatch.setenv("STILL_CORPUS_CACHE", str(root))
    assert load_encoded(name).digest == _digest(name)
    assert load_encoded(name).split_digests == each | {"train": _digest(name, "train")}  # written, then mapped
    assert load_encoded(name, splits=("test",), vocab=vocab).split_digests["test"] == each["test"]  # the entry's


def test_characters_and_bytes_and_each_corpus_kind_have_their_own_entries(tmp_path, root, reads):
    one = tmp_path / "one.txt"
    one.write_text("Ophelia — nymph, in thy orisons\n" * 40, encoding="utf-8")
    books = _books(tmp_path / "pg")
    for name, byte_level in ((str(one), False), (str(one), True), (books, False), (books, True)):
        vocab, splits = _expected(name, byte_level)
        first, again = load_encoded(name, byte_level=byte_level), load_encoded(name, byte_level=byte_level)
        _assert_same(first, vocab, splits)
        _assert_same(again, vocab, splits)
    assert len(_entries(root)) == 4
    assert fingerprint(f"enwik8:{one}", True)["split"] == [90_000_000, 5_000_000, 5_000_000]


def test_a_runs_vocabulary_reads_the_entry_or_encodes_without_writing(tmp_path, root, reads):
    """`lm eval` gives the run's vocabulary: the entry serves it where it was built with the same
    one; otherwise only the split asked for is read and encoded with it, and nothing is written."""
    name = _books(tmp_path / "pg")
    vocab, splits = _expected(name)
    built = load_encoded(name)
    reads.clear()
    _assert_same(load_encoded(name, splits=("test",), vocab=vocab), vocab, splits, ("test",))
    assert reads == []
    wider = Vocab([*vocab.symbols, "€"])
    reads.clear()
    encoded = load_encoded(name, splits=("test",), vocab=wider)
    assert reads == ["100.txt", "101.txt"] and encoded.entry is None
    book = (tmp_path / "pg" / "test" / "100.txt").read_text()
    assert encoded.split("test")[0][0].tolist() == wider.encode(book).tolist()
    assert _entries(root) == [built.entry.name]
    with pytest.raises(StillError, match="pg19/100: character 'b' at offset 5 is not in the vocabulary"):
        load_encoded(name, splits=("test",), vocab=Vocab(["t", "e", "s", " "]))


def test_an_entry_for_a_run_on_an_unwritten_corpus_is_not_made(tmp_path, root, reads):
    name = _books(tmp_path / "pg")
    vocab, splits = _expected(name)
    reads.clear()
    encoded = load_encoded(name, splits=("valid",), vocab=vocab)
    assert reads == ["100.txt"] and encoded.entry is None and not root.exists()
    _assert_same(encoded, vocab, splits, ("valid",))


@pytest.mark.parametrize("damage", ["truncated ids", "starts", "manifest", "vocabulary", "vocabulary replaced", "dtype",
                                    "id past the end", "negative id", "ids replaced within the vocabulary"])
def test_a_damaged_entry_is_said_and_made_again(tmp_path, root, reads, capsys, damage):
    name = _books(tmp_path / "pg")
    vocab, splits = _expected(name)
    entry = load_encoded(name).entry
    capsys.readouterr()
    if damage == "truncated ids":
        with open(entry / "train.npy", "r+b") as f:
            f.truncate(entry.joinpath("train.npy").stat().st_size - 3)
    elif damage == "starts":
        np.save(entry / "valid.starts.npy", np.array([0, 5], dtype=np.int64))
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{not json")
    elif damage == "vocabulary":
        (entry / "vocab.json").write_text("[]")
    elif damage == "vocabulary replaced":  # another of its size: every id within it, each read as another character
        data = json.loads((entry / "vocab.json").read_text())
        (entry / "vocab.json").write_text(json.dumps({**data, "symbols": data["symbols"][::-1]}))
    elif damage in ("id past the end", "negative id", "ids replaced within the vocabulary"):  # its size unchanged
        ids = np.load(entry / "valid.npy", mmap_mode="r+")
        if damage == "negative id" and ids.dtype.kind == "u":
            pytest.skip("this vocabulary's ids are unsigned")
        if damage == "ids replaced within the vocabulary":  # (a probe: served as other text, `lm eval`'s numbers)
            ids[:50] = ids[0]
        else:  # one id in the middle of a split
            ids[len(ids) // 2] = len(vocab) if damage == "id past the end" else -1
        ids.flush()
        del ids
        # (a file written since changes its times; on a coarse clock perhaps not within milliseconds of
        # the write, so the test moves its modification time on a second, as any later write would)
        written = (entry / "valid.npy").stat()
        os.utime(entry / "valid.npy", ns=(written.st_atime_ns, written.st_mtime_ns + 10**9))
    else:
        np.save(entry / "test.npy", np.load(entry / "test.npy").astype(np.int32))
    assert [e.state for e in encoded_module.entries(root)[0]] == ["damaged"]  # (`still data list`)
    reads.clear()
    encoded = load_encoded(name)
    assert reads and encoded.entry == entry
    _assert_same(encoded, vocab, splits)
    said = capsys.readouterr().err
    if damage != "manifest":  # (an unreadable manifest is no entry at all)
        assert f"the encoded corpus {entry} is damaged" in said
    assert f"encoded {name} once into {entry}" in said
    reads.clear()
    load_encoded(name)
    assert reads == []


def test_only_ids_written_since_the_entry_was_made_are_read_for_their_digest(tmp_path, root, monkeypatch):
    """The ids are the split's digest when `_write` wrote them: an open reads a split's every page for
    the check only where its file is not the one written (its size, times or inode changed, or an
    entry made before they were recorded)."""
    name = _books(tmp_path / "pg")
    checked = []
    real = encoded_module._split_digest
    monkeypatch.setattr(encoded_module, "_split_digest",
                        lambda vocab, split, starts, ids: checked.append(len(ids)) or real(vocab, split, starts, ids))
    entry = load_encoded(name).entry
    load_encoded(name)
    assert checked == []  # (made and opened, then opened again)
    valid = entry / "valid.npy"
    written = valid.stat()
    os.utime(valid, ns=(written.st_atime_ns, written.st_mtime_ns + 10**9))
    encoded = load_encoded(name)
    tokens = sum(len(d) for d in encoded.split("valid")[0])
    assert checked == [tokens] and encoded.entry == entry
    load_encoded(name)  # (the file as it is now, read once: a review probe saw a copied entry hashed at every open)
    assert checked == [tokens]
    checked.clear()
    manifest = json.loads((entry / "manifest.json").read_text())
    for split in manifest["splits"].values():
        del split["written"]
    (entry / "manifest.json").write_text(json.dumps(manifest))
    load_encoded(name)
    assert len(checked) == len(SPLITS)
    load_encoded(name)
    assert len(checked) == len(SPLITS)
    with open(valid, "r+b") as f:  # (and a file damaged since is still found)
        f.seek(-2, os.SEEK_END)
        last = f.read(2)
        f.seek(-2, os.SEEK_END)
        f.write(b"\x01\x00" if last == b"\x00\x00" else b"\x00\x00")
    size = valid.stat().st_size
    damaged = []
    monkeypatch.setattr(encoded_module, "log", damaged.append)
    load_encoded(name)
    assert checked[len(SPLITS)] == tokens and valid.stat().st_size == size
    assert any("valid's ids are not the ones written" in line for line in damaged), damaged


def test_an_unwritable_cache_keeps_the_ids_in_memory(tmp_path, monkeypatch, capsys):
    name = _books(tmp_path / "pg")
    vocab, splits = _expected(name)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for root in (blocked / "corpora", blocked):  # (a probe: a lock that "File exists" and a failed write, said apart)
        monkeypatch.setenv("STILL_CORPUS_CACHE", str(root))
        encoded = load_encoded(name)
        assert encoded.entry is None
        _assert_same(encoded, vocab, splits)
        err = capsys.readouterr().err
        assert err.strip() == (f"{root} cannot hold encoded corpora ({blocked} is a file): this run keeps its ids "
                               "in memory (STILL_CORPUS_CACHE chooses another folder)"), err


def test_a_write_cut_short_leaves_nothing(tmp_path, root, monkeypatch):
    name = _books(tmp_path / "pg")
    load_encoded(name)
    before = {p.name: p.stat().st_mtime_ns for p in (root / _entries(root)[0]).iterdir()}
    (tmp_path / "pg" / "test" / "102.txt").write_text("a third test book\n")
    calls = []

    def interrupted(self, text, source="text", dtype=torch.long):
        calls.append(source)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, text, source, dtype)

    real = Vocab.encode
    monkeypatch.setattr(Vocab, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_encoded(name)
    entry = root / _entries(root)[0]
    assert _entries(root) == [entry.name] and not _aside(root, ".tmp")  # nothing left, the old entry untouched
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before


@pytest.mark.parametrize("change", ["longer", "another character"])
def test_a_book_changed_while_it_is_encoded_is_named(tmp_path, root, monkeypatch, change):
    import still.data.encoded as encoded

    name = _books(tmp_path / "pg")
    real = encoded._survey

    def then_changed(corpus):
        surveyed = real(corpus)
        book = tmp_path / "pg" / "validation" / "100.txt"
        book.write_text(book.read_text() * 2 if change == "longer" else "Ophelia\n")
        return surveyed

    monkeypatch.setattr(encoded, "_survey", then_changed)
    with pytest.raises(StillError, match="pg19/100 changed while it was being encoded.*: run again"):
        load_encoded(name)
    assert _entries(root) == []


def test_an_entry_made_with_a_files_byte_order_mark_is_not_served(tmp_path, root, monkeypatch):
    """A character-level file's BOM is no longer a character (`decode_utf8`): an entry made before,
    with U+FEFF in its vocabulary and ids, has the fingerprint of the same files, so the format it
    records says it is another (`FORMAT` 5), and it is made again."""
    import still.data.encoded as encoded
    import still.data.text as text

    path = tmp_path / "marked.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"to be, or not to be\n" * 50)
    real = text.decode_utf8
    with monkeypatch.context() as before:  # (as the version before: the mark kept, format 4)
        before.setattr(text, "decode_utf8", lambda data, source, file=False: real(data, source))
        before.setattr(encoded, "FORMAT", 4)
        old = load_encoded(str(path))
        assert "\ufeff" in old.vocab.symbols
    assert [e.state for e in encoded.entries(root)[0]] == ["another format"]
    now = load_encoded(str(path))
    assert now.entry == old.entry and "\ufeff" not in now.vocab.symbols and now.digest != old.digest


def test_a_relative_path_and_its_absolute_path_share_an_entry(tmp_path, root, reads, monkeypatch):
    name = _books(tmp_path / "pg")
    first = load_encoded(name)
    monkeypatch.chdir(tmp_path)
    reads.clear()
    assert load_encoded("pg19:pg").entry == first.entry and reads == []


def test_what_a_killed_writer_left_and_replaced_entries_are_removed_a_day_later(tmp_path, root):
    """A replaced entry is moved aside and kept a day from then (a run elsewhere may read it); a
    temporary folder is a killed writer's where the lock is held, else after a day. Every load sweeps."""
    name = _books(tmp_path / "pg")
    entry = load_encoded(name).entry
    book = tmp_path / "pg" / "test" / "100.txt"
    for i in range(2):  # two replacements in a row, the first entry 48 hours old: both kept aside
        os.utime(entry, (time.time() - 48 * 3600,) * 2)
        book.write_text(f"test book, edition {i}\n" * 5)
        load_encoded(name)
    assert len(_aside(root, ".old")) == 2
    killed, old, fresh = (root / f".{entry.name}.x1.tmp", root / f".{entry.name}.x2.old",
                          root / f".{entry.name}.x3.tmp")
    for folder in (killed, old, fresh):
        folder.mkdir()
        (folder / "train.npy").write_bytes(b"half")
    day_ago = time.time() - 25 * 3600
    for folder in (killed, old, *(root / n for n in _aside(root, ".old"))):
        os.utime(folder, (day_ago, day_ago))
    load_encoded(name)  # (mapped: stale ones only)
    assert _aside(root, ".tmp") == [fresh.name] and not _aside(root, ".old")
    book.write_text("test book, edition 3\n" * 5)
    load_encoded(name)  # (writing, under the lock: any temporary folder is a killed writer's)
    assert not _aside(root, ".tmp") and len(_aside(root, ".old")) == 1 and _entries(root) == [entry.name]


def test_an_entry_is_as_readable_as_the_files_beside_it(tmp_path, root):
    entry = load_encoded(_books(tmp_path / "pg")).entry
    umask = os.umask(0)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o777 & ~umask  # (not mkdtemp's 0o700: a shared cache's users read it)


def test_the_fingerprint_reads_only_what_a_loader_would_read(tmp_path, root, reads):
    name = _books(tmp_path / "pg")
    entry = load_encoded(name).entry
    (tmp_path / "pg" / "runs").mkdir()
    (tmp_path / "pg" / "runs" / "log.json").write_text("{}")
    (tmp_path / "pg" / "README.md").write_text("the books")
    reads.clear()
    assert load_encoded(name).entry == entry and reads == []
    book = tmp_path / "pg" / "test" / "101.txt"
    stat = book.stat()
    book.write_text(book.read_text().replace("to be", "TO BE"))  # (the same size, and its times put back)
    os.utime(book, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_encoded(name).split("test")[0][1].tolist() == load_encoded(name).vocab.encode(book.read_text()).tolist()
    assert reads  # (its change time and inode changed)


def test_two_processes_at_once_encode_the_corpus_once(tmp_path, root):
    """The second waits on the entry's lock while the first encodes (which goes on only once the
    second says it waits), then maps what it wrote."""
    name = _books(tmp_path / "pg")
    said = tmp_path / "waiting"
    script = (f"import pathlib, time, still.data.encoded as e\n"
              f"real_survey, real_log = e._survey, e.log\n"
              f"def survey(corpus):\n"
              f"    for _ in range(600):\n"
              f"        if pathlib.Path({str(said)!r}).exists(): break\n"
              f"        time.sleep(0.1)\n"
              f"    return real_survey(corpus)\n"
              f"def log(message):\n"
              f"    real_log(message)\n"
              f"    if 'waiting' in message: pathlib.Path({str(said)!r}).touch()\n"
              f"e._survey, e.log = survey, log\n"
              f"corpus = e.load_encoded({name!r})\n"
              f"print(corpus.entry, sum(int(d.sum()) for d in corpus.split('train')[0]))\n")
    env = {**os.environ, "STILL_CORPUS_CACHE": str(root), "STILL_PROGRESS": "0"}
    started = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in started]
    assert [code for _, _, code in results] == [0, 0], results
    said = "".join(err for _, err, _ in results)
    assert said.count(f"encoded {name} once") == 1 and said.count("waiting for another process to encode") == 1
    assert len({out for out, _, _ in results}) == 1  # (the same entry, the same ids)
    assert _entries(root) == [entry_path(root, name, False).name] and not _aside(root, ".tmp")


def test_two_threads_at_once_encode_the_corpus_once(tmp_path, root, monkeypatch, capsys):
    """A POSIX lock is the process's: its threads wait on a lock of their own first."""
    import threading

    import still.data.encoded as encoded

    name = _books(tmp_path / "pg")
    real = encoded._survey
    monkeypatch.setattr(encoded, "_survey", lambda corpus: (time.sleep(0.3), real(corpus))[1])  # (they overlap)
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_encoded(name))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    said = capsys.readouterr().err
    assert said.count(f"encoded {name} once") == 1 and len({r.entry for r in results}) == 1
    assert len(results) == 4 and not _aside(root, ".tmp")


def test_a_process_that_waited_for_a_writer_that_failed_reads_the_corpus_itself(tmp_path, root, monkeypatch,
                                                                                 capsys):
    """Where the lock's holder could not write the entry (a full disk), the others do not each try
    again in turn, holding the lock: they read the corpus into memory."""
    import threading

    import still.data.encoded as encoded

    name = _books(tmp_path / "pg")
    vocab, splits = _expected(name)
    writes, holding = [], threading.Event()

    def full_disk(*args):
        writes.append(1)
        holding.set()
        time.sleep(0.5)  # (the other thread comes to the lock meanwhile)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(encoded, "_write", full_disk)
    results = []
    first = threading.Thread(target=lambda: results.append(load_encoded(name)))
    first.start()
    holding.wait(30)
    results.append(load_encoded(name))
    first.join()
    assert len(writes) == 1 and all(r.entry is None for r in results)
    for result in results:
        _assert_same(result, vocab, splits)
    said = capsys.readouterr().err
    assert "could not write the encoded corpus" in said
    assert "the process that held the lock could not write" in said and "(No space left on device)" in said


def _wait_behind(holder, name, monkeypatch):
    """`load_encoded(name)` in a thread that comes to the lock `holder` holds, waits, and goes on
    once `holder` lets go of it (without writing an entry): its result, and what it said."""
    import threading

    import still.data.encoded as encoded

    said, waiting, results = [], threading.Event(), []

    def log(message):
        said.append(message)
        if "waiting for another process" in message:
            waiting.set()

    monkeypatch.setattr(encoded, "log", log)
    waiter = threading.Thread(target=lambda: results.append(load_encoded(name)))
    waiter.start()
    try:
        assert waiting.wait(60)
    finally:
        holder.communicate("", timeout=60)
        waiter.join(60)
    return results[0], "\n".join(said)


@pytest.mark.parametrize("note", [None, "No space left on device"])
def test_a_process_that_waited_writes_the_entry_unless_the_holder_could_not(tmp_path, root, monkeypatch, note):
    """A holder interrupted or killed leaves no note in the lock file: the process that waited for it
    encodes the corpus into the entry itself (a probe: cancelling the one job of an array that encoded
    made every other read PG-19 into memory). One that could not write it notes why: the others read
    the corpus into memory, and the next run that writes the entry clears the note."""
    name = _books(tmp_path / "pg")
    vocab, splits = _expected(name)
    entry = entry_path(root, name, False)
    root.mkdir()
    lock = root / f".{entry.name}.lock"
    result, said = _wait_behind(_hold(lock, note), name, monkeypatch)
    _assert_same(result, vocab, splits)
    if note is None:
        assert result.entry == entry and _entries(root) == [entry.name]
        assert f"the process that held the lock stopped without writing {entry} (interrupted or killed, say)" in said
        assert f"encoded {name} once" in said
    else:
        assert result.entry is None and _entries(root) == []
        assert f"the process that held the lock could not write {entry} ({note})" in said
        assert load_encoded(name).entry == entry  # (no other process held the lock: it writes)
    assert lock.read_bytes() == b""


def test_a_process_that_waited_for_an_entry_of_a_corpus_changed_since_encodes_it_again(tmp_path, root,
                                                                                      monkeypatch):
    """A book edited while the holder encoded it: the entry it wrote is of the text before (a probe:
    the waiter said the holder had not written it, read the corpus into memory, and the next run
    encoded it again). The waiter encodes the corpus as it is now into the entry."""
    name = _books(tmp_path / "pg")
    entry = load_encoded(name).entry  # (what the holder wrote, of the text before)
    book = tmp_path / "pg" / "train" / "100.txt"
    book.write_text("edited while it was encoded\n" * 5, encoding="utf-8")
    vocab, splits = _expected(name)
    result, said = _wait_behind(_hold(root / f".{entry.name}.lock"), name, monkeypatch)
    _assert_same(result, vocab, splits)
    assert result.entry == entry and f"{entry} holds {name} as it was before a change" in said
    assert json.loads((entry / "manifest.json").read_text())["fingerprint"] == fingerprint(name, False)


def _cannot_list(monkeypatch, name):
    """os.scandir refusing the folders named `name`, as it does a folder the user may not read."""
    real = os.scandir

    def refused(path):
        if str(path).endswith(name):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", refused)


def test_a_folder_it_cannot_list_beside_what_pg19_reads_is_passed_over(tmp_path, root, monkeypatch):
    name = _books(tmp_path / "pg")
    (tmp_path / "pg" / "lost+found").mkdir()
    _cannot_list(monkeypatch, "lost+found")
    stamp = fingerprint(name, False)
    assert stamp is not None and len(stamp["files"]) == 6
    assert load_encoded(name).entry is not None


def test_without_a_cache_a_book_changed_between_its_reads_is_named_too(tmp_path, monkeypatch):
    import still.data.encoded as encoded

    monkeypatch.setenv("STILL_CORPUS_CACHE", "off")
    name = _books(tmp_path / "pg")
    real = encoded._survey

    def then_changed(corpus):
        surveyed = real(corpus)
        (tmp_path / "pg" / "train" / "102.txt").write_text("Ophelia\n")
        return surveyed

    monkeypatch.setattr(encoded, "_survey", then_changed)
    with pytest.raises(StillError, match="pg19/102 changed while it was being encoded.*: run again"):
        load_encoded(name)


def test_off_encodes_at_every_start_and_writes_nothing(tmp_path, monkeypatch, reads):
    name = _books(tmp_path / "pg")
    vocab, splits = _expected(name)
    monkeypatch.setenv("STILL_CORPUS_CACHE", "off")
    assert corpora_root() is None
    for _ in range(2):
        reads.clear()
        encoded = load_encoded(name)
        assert len(reads) == 12 and encoded.entry is None  # (each book for the vocabulary, then for its ids)
        _assert_same(encoded, vocab, splits)


def test_the_default_root_is_in_the_data_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("STILL_CORPUS_CACHE")
    assert corpora_root(tmp_path / "data") == tmp_path / "data" / "corpora"
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "elsewhere"))
    assert corpora_root() == tmp_path / "elsewhere" / "corpora"


def test_a_fingerprint_lists_what_the_loader_reads_and_follows_links(tmp_path):
    """A probe: a folder corpus's loader (pathlib's rglob) left out the books of a linked sub-folder,
    which the fingerprint listed; it read hidden folders' copies (`.ipynb_checkpoints`: the test
    book's copy trained); a pipe named `*.txt` in PG-19 hung its loader for good."""
    name = _books(tmp_path / "pg")  # PG-19: its three split folders' books, not their sub-folders
    stamp = fingerprint(name, False)
    assert [f[0] for f in stamp["files"]] == ["train/100.txt", "train/101.txt", "train/102.txt",
                                              "validation/100.txt", "test/100.txt", "test/101.txt"]
    assert fingerprint(name, True) != stamp and fingerprint(f"pg19:{tmp_path / 'nowhere'}", False) is None
    os.mkfifo(tmp_path / "pg" / "train" / "103.txt")
    (tmp_path / "pg" / "train" / ".104.txt").write_text("hidden\n")
    assert fingerprint(name, False)["files"] == stamp["files"]
    assert [d.name for d in load_corpus(name).train] == ["100", "101", "102"]

    plain = tmp_path / "plain"
    plain.mkdir()
    for book in ("a", "b", "c"):
        (plain / f"{book}.txt").write_text(f"book {book}\n")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "200.txt").write_text("linked\n")
    (plain / "linked").symlink_to(tmp_path / "more")
    (plain / "linked" / "up").symlink_to(plain)  # a loop
    (plain / "again").symlink_to(tmp_path / "more")  # the same folder twice: read once
    (plain / "root").symlink_to("/")  # a link to a folder that holds the corpus: not walked
    (plain / ".ipynb_checkpoints").mkdir()
    (plain / ".ipynb_checkpoints" / "c-checkpoint.txt").write_text("book c\n")
    os.mkfifo(plain / "pipe.txt")
    files = [f[0] for f in fingerprint(str(plain), False)["files"]]
    assert files == ["a.txt", "again/200.txt", "b.txt", "c.txt"]
    corpus = load_corpus(str(plain))
    assert [d.name for split in SPLITS for d in corpus.split(split)] == files


def test_a_folder_the_corpus_cannot_list_is_named(tmp_path, monkeypatch):
    """A sub-folder that could not be listed was passed over: its books left out unsaid (a probe).
    The loader names it; the fingerprint is then None (no entry), so that `data list` and `data
    clear` still run (a probe: they refused every entry while one corpus had such a folder). A
    `lost+found` is passed over, and a WikiText folder the loader does not read is not listed."""
    plain = tmp_path / "plain"
    for folder in ("private", "lost+found"):
        (plain / folder).mkdir(parents=True)
    for book in ("a", "b", "c"):
        (plain / f"{book}.txt").write_text(f"book {book}\n")
    wiki = tmp_path / "wiki"
    (wiki / "wikitext-103").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (wiki / f"wiki.{split}.tokens").write_text(f" = {split} = \n")
    _cannot_list(monkeypatch, "lost+found")
    assert [f[0] for f in fingerprint(str(plain), False)["files"]] == ["a.txt", "b.txt", "c.txt"]
    _cannot_list(monkeypatch, "private")
    assert fingerprint(str(plain), False) is None
    with pytest.raises(StillError, match=r"cannot list the folder .*private \(Permission denied\): its files"):
        load_corpus(str(plain))
    _cannot_list(monkeypatch, "wikitext-103")
    assert [f[0] for f in fingerprint(f"wikitext103:{wiki}", False)["files"]] == [
        "wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"]


def test_a_tree_of_any_depth_is_walked_and_a_dangling_link_is_named(tmp_path):
    """A recursive walk met Python's recursion limit (a traceback) at about a thousand nested
    folders; a link named as a book that points to nothing was left out unsaid (probes)."""
    plain = deep = tmp_path / "plain"
    for _ in range(1101):  # (a folder at a time: pathlib's mkdir(parents=True) recurses too)
        deep.mkdir()
        deep = deep / "d"
    deep = deep.parent
    try:
        _walk_a_deep_tree(tmp_path, plain, deep)
    finally:  # (a folder at a time, the deepest first: shutil.rmtree, pytest's too, recurses)
        for file in [*deep.iterdir(), *(path for path in plain.iterdir() if path.is_symlink() or path.is_file())]:
            file.unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


def _walk_a_deep_tree(tmp_path, plain, deep):
    for book in ("a", "b", "c"):
        (plain / f"{book}.txt").write_text(f"book {book}\n")
    (deep / "z.txt").write_text("deep down\n")
    files = [f[0] for f in fingerprint(str(plain), False)["files"]]
    assert files == ["a.txt", "b.txt", "c.txt", "d/" * 1100 + "z.txt"]
    assert [d.name for split in SPLITS for d in load_corpus(str(plain)).split(split)][-1] == "d/" * 1100 + "z.txt"
    (plain / "b2.txt").symlink_to(tmp_path / "nowhere.txt")
    assert fingerprint(str(plain), False) is None
    with pytest.raises(StillError, match=r"b2.txt is a link to .*nowhere.txt, which leads to no file: its text"):
        load_corpus(str(plain))
    # a loop of links: a raw OSError from the walk (a probe); named as a book it is refused as the above,
    # otherwise passed over as any file not named as a book
    (plain / "b2.txt").unlink()
    (plain / "loop").symlink_to(plain / "loop")
    assert [f[0] for f in fingerprint(str(plain), False)["files"]] == files
    (plain / "loop.txt").symlink_to(plain / "loop.txt")
    with pytest.raises(StillError, match=r"loop.txt is a link to .*loop.txt, which leads to no file"):
        load_corpus(str(plain))


def test_entries_say_which_are_current_and_what_is_left_beside_them(tmp_path, root, monkeypatch):
    import json

    import still.data.encoded as encoded

    names = {kind: _books(tmp_path / kind) for kind in ("same", "changed", "gone", "damaged", "older", "cut")}
    made = {kind: load_encoded(name).entry for kind, name in names.items()}
    bytes_entry = load_encoded(names["same"], byte_level=True).entry
    (tmp_path / "changed" / "test" / "101.txt").write_text("another book\n")
    (tmp_path / "gone").rename(tmp_path / "moved")
    (made["damaged"] / "manifest.json").write_text("{")
    with open(made["cut"] / "train.npy", "r+b") as f:  # (its manifest whole: listed as current, by a probe)
        f.truncate(10)
    manifest = json.loads((made["older"] / "manifest.json").read_text())
    manifest["fingerprint"]["format"] = encoded.FORMAT - 1
    (made["older"] / "manifest.json").write_text(json.dumps(manifest))
    leftover = root / f".{made['same'].name}.x1.old"
    leftover.mkdir()
    (leftover / "train.npy").write_bytes(b"12345678")
    (root / "important_dataset").mkdir()  # (a folder the user keeps other things in, and a link: not entries)
    (root / ".hidden.x1.old").mkdir()
    (root / "linked-0123456789abcdef0123").symlink_to(made["same"])
    missing = load_encoded(_books(tmp_path / "missing")).entry
    (missing / "test.npy").unlink()

    found, left = encoded.entries(root)
    by_path = {e.path: e for e in found}
    assert left == [leftover] and set(by_path) == {*made.values(), bytes_entry, missing}
    assert by_path[missing].state == "damaged"
    assert {kind: by_path[path].state for kind, path in made.items()} == {
        "same": "current", "changed": "corpus changed", "gone": "corpus missing", "damaged": "damaged",
        "older": "another format", "cut": "damaged"}
    same, as_bytes = by_path[made["same"]], by_path[bytes_entry]
    _, splits = _expected(names["same"])
    assert same.corpus == names["same"] and same.byte_level is False and as_bytes.byte_level is True
    assert same.tokens == sum(len(d) for s in SPLITS for d in splits[s][0]) == as_bytes.tokens  # (ASCII)
    assert same.size == sum(f.stat().st_size for f in made["same"].iterdir()) and same.size > same.tokens * 2
    assert abs(same.made - time.time()) < 600
    assert by_path[made["damaged"]].corpus is None and by_path[made["damaged"]].tokens is None
    assert encoded.entries(root / "nowhere") == ([], [])


def test_a_removed_entry_is_made_again_and_mapped_ids_stay_readable(tmp_path, root, reads):
    import still.data.encoded as encoded

    name = _books(tmp_path / "pg")
    first = load_encoded(name)
    before = [d.clone() for d in first.split("train")[0]]
    reads.clear()
    assert encoded.remove(first.entry) is None
    assert _entries(root) == [] and not _aside(root, ".old")  # (renamed aside, then removed)
    assert all(torch.equal(a, b) for a, b in zip(first.split("train")[0], before))  # (still mapped)
    assert encoded.remove(first.entry) is None  # (gone already, by another `clear`: as removed)
    assert not _aside(root, ".old")
    again = load_encoded(name)
    assert again.entry == first.entry and reads  # (read and encoded again)
    leftover = root / f".{first.entry.name}.x1.tmp"
    leftover.mkdir()
    assert encoded.remove(leftover) is None and not leftover.exists() and _entries(root) == [first.entry.name]
    other = root / "my-notes"
    other.mkdir()
    assert encoded.remove(other) == "not an entry of the corpus cache" and other.is_dir()
    linked = root / "linked-0123456789abcdef0123"  # (named as an entry, but a link: to what it points at)
    linked.symlink_to(other)
    assert encoded.remove(linked) == "not an entry of the corpus cache" and linked.is_symlink() and other.is_dir()


def test_a_run_that_starts_while_an_entry_is_removed_makes_it_again(tmp_path, root, monkeypatch):
    """The entry is renamed aside under its lock and removed without it: a run starting meanwhile
    finds none, takes the lock and writes a new one (it does not wait for the removal, then read
    the corpus into memory as after a writer that failed)."""
    import threading

    import still.data.encoded as encoded

    name = _books(tmp_path / "pg")
    entry = load_encoded(name).entry
    runs, real = [], encoded.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if path != entry and not runs:  # (the aside: the run starts before its files go)
            thread = threading.Thread(target=lambda: runs.append(load_encoded(name)))
            thread.start()
            thread.join(timeout=60)
            assert runs, "the run waited for the removal"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(encoded.shutil, "rmtree", rmtree)
    assert encoded.remove(entry) is None
    assert runs[0].entry == entry and _entries(root) == [entry.name] and not _aside(root, ".old")


def test_a_stale_entry_made_again_since_it_was_listed_stays(tmp_path, root):
    import still.data.encoded as encoded

    name = _books(tmp_path / "pg")
    entry = load_encoded(name).entry
    (tmp_path / "pg" / "test" / "100.txt").write_text("another book\n")
    assert [e.state for e in encoded.entries(root)[0]] == ["corpus changed"]
    load_encoded(name)  # (made again by a run, after `clear --stale` listed it)
    assert encoded.remove(entry, stale_only=True) == "current now: made again since it was listed"
    assert entry.is_dir() and [e.state for e in encoded.entries(root)[0]] == ["current"]


def test_an_entry_being_written_is_not_removed(tmp_path, root, monkeypatch):
    """Another process holds the entry's lock (is encoding it): neither the entry nor its writer's
    temporary folder is removed, and both are once the lock is free; also where this process may
    only read the lock file (shared with another user): its shared lock waits for the writer's."""
    import still.data.encoded as encoded

    entry = load_encoded(_books(tmp_path / "pg")).entry
    writing = root / f".{entry.name}.x1.tmp"
    writing.mkdir()
    holder = _hold(root / f".{entry.name}.lock")
    busy = "another process is encoding that corpus now"
    try:
        assert encoded.remove(entry) == busy and encoded.remove(writing) == busy
        real_open = open

        def read_only(file, mode="r", *args, **kwargs):  # (the tests run as root, whom no mode stops)
            if str(file).endswith(".lock") and "r" not in mode:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(file, mode, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(encoded, "open", read_only, raising=False)
            assert encoded.remove(entry) == busy and encoded.remove(writing) == busy
        assert entry.is_dir() and writing.is_dir()
    finally:
        holder.communicate("", timeout=60)
    assert encoded.remove(writing) is None and encoded.remove(entry) is None
    assert not writing.exists() and not entry.exists()


def test_the_locks_of_corpora_without_an_entry_are_removed_unless_held(tmp_path, root):
    """Every corpus tried leaves its empty lock file, one that failed to encode too, and one whose
    entry was removed (24 lock files beside 9 entries, a probe): `remove` takes an entry's lock
    with it, and `remove_lock` the others, but one a process holds."""
    import still.data.encoded as encoded

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"to be, \xff or not to be\n" * 20)
    with pytest.raises(StillError, match="is not UTF-8"):
        load_encoded(str(bad))
    failed = root / f".{entry_path(root, str(bad), False).name}.lock"
    kept = load_encoded(_books(tmp_path / "kept")).entry
    removed = load_encoded(_books(tmp_path / "removed")).entry
    assert failed.is_file() and encoded._lock_file(kept).is_file() and encoded._lock_file(removed).is_file()
    assert encoded.remove(removed) is None and not encoded._lock_file(removed).exists()
    held = root / ".busy-0123456789abcdef0123.lock"
    (root / ".notes.lock").write_text("mine")  # (not named as a lock of an entry: left alone)
    holder = _hold(held)
    try:
        assert encoded.orphan_locks(root) == [failed, held]  # (not the kept entry's)
        assert encoded.remove_lock(held) == "another process is encoding that corpus now" and held.is_file()
    finally:
        holder.communicate("", timeout=60)
    assert encoded.remove_lock(failed) is None and encoded.remove_lock(failed) is None  # (gone already: removed)
    assert encoded.remove_lock(encoded._lock_file(kept)) == "its corpus has an entry now: made since it was listed"
    assert encoded.remove_lock(root / ".notes.lock") == "not a lock of the corpus cache"
    assert encoded.remove_lock(held) is None
    assert sorted(p.name for p in root.iterdir()) == [".notes.lock", encoded._lock_file(kept).name, kept.name]
    assert encoded.orphan_locks(root / "nowhere") == []


def test_a_process_waiting_for_a_lock_that_is_removed_locks_the_new_one(tmp_path, root):
    """A writer that opened the lock file and waits for it while `clear` takes it and removes it
    would hold the lock of a file no one opens again: another writer, opening the path, makes a new
    one and locks it too. It locks the file there now instead."""
    import threading

    import still.data.encoded as encoded

    entry = entry_path(root, "corpus", False)
    root.mkdir()
    lock = root / f".{entry.name}.lock"
    clearing = subprocess.Popen([sys.executable, "-c",
                                 f"import fcntl, os, sys\nf = open({str(lock)!r}, 'a+b')\n"
                                 "fcntl.lockf(f, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.readline()\n"
                                 f"os.unlink({str(lock)!r})\n"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert clearing.stdout.readline().strip() == "held"
    holding, release = threading.Event(), threading.Event()

    def write():
        with encoded._process_lock(entry, "corpus"):
            holding.set()
            release.wait(60)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.5)  # (the writer waits on the lock file it opened)
        assert not holding.is_set()
        clearing.communicate("go\n", timeout=60)  # (removes it, then lets go of it)
        assert holding.wait(60)
        other = subprocess.run([sys.executable, "-c",
                                f"import fcntl\nf = open({str(lock)!r}, 'a+b')\n"
                                "try:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('free')\n"
                                "except OSError:\n    print('held')\n"],
                               capture_output=True, text=True, timeout=60)
        assert other.stdout.strip() == "held", other
    finally:
        release.set()
        writer.join(60)


def test_an_entry_that_cannot_be_removed_is_said(tmp_path, root, monkeypatch):
    import still.data.encoded as encoded

    entry = load_encoded(_books(tmp_path / "pg")).entry
    real = encoded.shutil.rmtree

    def refused(path, *args, onexc=None, onerror=None, **kwargs):
        error = PermissionError(errno.EACCES, "Permission denied")
        onexc(os.unlink, str(path), error) if onexc else onerror(os.unlink, str(path), (type(error), error, None))

    monkeypatch.setattr(encoded.shutil, "rmtree", refused)
    why = encoded.remove(entry)
    assert why.startswith("cannot remove it (Permission denied): what is left of it is in ")
    aside = _aside(root, ".old")
    assert len(aside) == 1 and why.endswith(aside[0]) and not entry.exists()
    monkeypatch.setattr(encoded.shutil, "rmtree", real)
    assert encoded.entries(root) == ([], [root / aside[0]])  # (listed, for --stale)


def test_a_corpora_folder_that_cannot_be_listed_is_named(tmp_path, root, monkeypatch, capsys):
    import pathlib

    import still.data.encoded as encoded
    from helpers import assert_user_error

    root.mkdir()
    real = pathlib.Path.iterdir

    def refused(self):
        if self == root:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", refused)
    with pytest.raises(StillError, match=f"cannot list {root}: Permission denied"):
        encoded.entries(root)
    assert_user_error(capsys, "data", "clear", "--all", contains=f"cannot list {root}: Permission denied")


def test_a_folder_of_the_users_named_as_an_entry_is_left_alone(tmp_path, root, capsys):
    from helpers import run_cli

    entry = load_encoded(_books(tmp_path / "pg")).entry
    photos = root / "photos-0123456789abcdef0123"  # (named as an entry by chance: a probe's was removed as damaged)
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"jpeg")
    cut = root / "cut-0123456789abcdef0124"  # (an entry's files alone, its manifest lost: a damaged entry)
    cut.mkdir()
    (cut / "train.npy").write_bytes(b"12345678")
    (cut / ".vocab.json.1-x.tmp").write_bytes(b"{")
    assert [(e.path, e.state) for e in encoded_module.entries(root)[0]] == [(cut, "damaged"), (entry, "current")]
    assert encoded_module.not_entries(root) == [photos]
    assert encoded_module.remove(photos) == "not an entry of the corpus cache: it holds a.jpg" and photos.is_dir()
    code, out, err = run_cli(capsys, "data", "clear", "--all")
    assert code == 0 and "removed 2 folders" in out
    assert f"left {photos.name}: named as an entry but holds a.jpg: not one" in err
    assert (photos / "a.jpg").read_bytes() == b"jpeg" and not cut.exists() and not entry.exists()
