import re
import zipfile

import pytest
import torch

from conftest import requires_shakespeare
from still.data.text import (
    SHAKESPEARE_TEST,
    SHAKESPEARE_VALID,
    Document,
    TokenStreams,
    Vocab,
    load_corpus,
    load_enwik8,
    load_pg19,
    load_shakespeare,
    load_text,
    load_wikitext103,
)
from still.errors import StillError


def test_vocab_round_trip_and_specials():
    vocab = Vocab.build([Document("a", "hello world")])
    ids = vocab.encode("hello")
    assert ids.min() >= 2 and vocab.decode(ids) == "hello"
    assert Vocab.from_json(vocab.to_json()).decode(ids) == "hello"
    assert len(vocab) == 2 + len(set("hello world"))
    # the vocabulary is every split's (`still.data.encoded._survey`): not "of the training corpus" (a probe)
    with pytest.raises(StillError, match=r"prompt: character 'z' at offset 3 is not in the vocabulary \(the 8 "
                                         r"characters of its corpus's three splits\)$"):
        vocab.encode("helz", "prompt")
    with pytest.raises(StillError, match="token id 99 is outside the vocabulary"):
        vocab.decode([99])


def test_encoding_in_chunks_is_the_lookup_a_character(monkeypatch):
    monkeypatch.setattr("still.data.text.ENCODE_CHUNK", 7)
    text = "Hamlet — ô\nTo be, or not to be 😀." * 3
    vocab = Vocab.build([Document("a", text)])
    assert vocab.encode(text).tolist() == [vocab._index[ch] for ch in text]
    with pytest.raises(StillError, match="character '€' at offset 23 is not in the vocabulary"):
        vocab.encode(text[:23] + "€" + text)  # (in the fourth chunk)
    with pytest.raises(StillError, match="byte 0xff, not UTF-8, at offset 2 is not in the vocabulary"):
        vocab.encode("Ha\udcffmlet", "the prompt")  # (a non-UTF-8 byte of a command line)


def test_the_vocabulary_is_every_character_of_the_corpus_by_code_point(monkeypatch):
    monkeypatch.setattr("still.data.text.ENCODE_CHUNK", 5)  # (characters met in several chunks)
    texts = ["Hamlet — ô\nTo be 😀", "", "z\ud800a", "Ophelia"]  # (a lone surrogate: a command line's byte)
    vocab = Vocab.build([Document(str(i), t) for i, t in enumerate(texts)])
    assert vocab.symbols == sorted(set("".join(texts)))
    assert Vocab.build([]).symbols == [] and Vocab.build([Document("a", "x")], byte_level=True).symbols == []


@pytest.mark.parametrize("fill_rows", [False, True])
def test_a_corpus_kept_compact_gives_the_same_segments(fill_rows):
    """Documents kept as int16 (`Vocab.compact_dtype`, a quarter of int64's memory) give the int64
    segments of documents kept as int64."""
    vocab = Vocab.build([Document("a", "to be, or not to be: that is the question")])
    texts = ["to be, or not to be", "that is the question", "be"]
    compact = [vocab.encode(t, dtype=vocab.compact_dtype) for t in texts]
    assert vocab.compact_dtype == torch.int16 and Vocab(byte_level=True).compact_dtype == torch.int16
    wide = [vocab.encode(t) for t in texts]
    a, b = (TokenStreams(docs, 4, 4, fill_rows=fill_rows) for docs in (compact, wide))
    for i in range(len(b)):
        for x, y in zip(vars(a.segment(i)).values(), vars(b.segment(i)).values()):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_a_streaming_decoder_holds_a_characters_bytes_until_it_is_whole():
    vocab = Vocab(byte_level=True)
    ids = vocab.encode("é — ok".encode()).tolist()  # é and — are 2 and 3 bytes
    decode = vocab.decoder()
    pieces = [decode([i]) for i in ids] + [decode(None)]
    assert "".join(pieces) == "é — ok" and "\ufffd" not in "".join(pieces) and pieces[0] == ""
    decode = vocab.decoder()
    assert decode(ids[:1]) + decode(None) == "\ufffd"  # a character cut short at the end
    chars = Vocab.build([Document("a", "é — ok")])
    decode = chars.decoder()
    assert "".join(decode([i]) for i in chars.encode("é — ok").tolist()) + decode(None) == "é — ok"
    assert vocab.unit == "byte" and chars.unit == "character"


def test_byte_vocab():
    vocab = Vocab(byte_level=True)
    ids = vocab.encode("héllo".encode())
    assert len(vocab) == 258 and len(ids) == 6 and vocab.decode(ids) == "héllo"
    for empty in ("", b""):  # (found by a fuzzer: torch.frombuffer refuses an empty buffer)
        ids = vocab.encode(empty)
        assert ids.dtype == torch.long and ids.shape == (0,)
    # a prompt's byte that is not UTF-8 arrives as a lone surrogate: that byte (a fuzzer: UnicodeEncodeError)
    assert vocab.encode("a\udcff").tolist() == vocab.encode(b"a\xff").tolist()
    with pytest.raises(StillError, match=r"character '\\ud800' at offset 0 is not a byte's"):
        vocab.encode("\ud800")
    with pytest.raises(StillError, match=r"the prompt: byte 0xff, not UTF-8, at offset 1 is not in the vocabulary"):
        Vocab.build([Document("a", "ab")]).encode("a\udcff", "the prompt")


def test_non_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text\xff more" + b" padding" * 20)
    with pytest.raises(StillError, match=r"bad.txt is not UTF-8: byte 0xff at offset 9 \(for arbitrary bytes use "
                                         r"the byte-level vocabulary: `still lm train --byte-level`\)$"):
        load_text(path)
    assert load_text(path, byte_level=True).byte_level  # bytes are fine at byte level


def test_a_byte_order_mark_at_the_start_of_a_file_is_no_character(tmp_path):
    """A UTF-8 BOM that an editor put at the start of a file was kept as a character, U+FEFF, in the
    vocabulary and the targets (a probe): a file read by characters gives the ids it gives without
    one. A BOM elsewhere is a character like any other; at byte level every byte is kept."""
    from still.data.encoded import load_encoded

    bom = b"\xef\xbb\xbf"
    text = "To be, or not to be: that is the question.\n" * 20
    for folder, marked in (("plain", b""), ("marked", bom)):
        (tmp_path / folder).mkdir()
        (tmp_path / f"{folder}.txt").write_bytes(marked + text.encode())
        for i in range(3):
            (tmp_path / folder / f"{i}.txt").write_bytes(marked + f"book {i}: {text}".encode())
    for kind in ("{}.txt", "{}"):  # (a file, split by position; a folder, by file)
        plain, marked = (load_encoded(str(tmp_path / kind.format(f))) for f in ("plain", "marked"))
        assert "\ufeff" not in marked.vocab.symbols and marked.vocab.to_json() == plain.vocab.to_json()
        assert marked.digest == plain.digest  # (the same ids, bounds and vocabulary)
    assert load_text(tmp_path / "marked.txt", byte_level=True).train[0].text.startswith(bom)
    (tmp_path / "inner.txt").write_bytes(b"ab" + bom + b"cd" * 100)
    assert load_text(tmp_path / "inner.txt").train[0].text.startswith("ab\ufeffcd")
    (tmp_path / "marked" / "2.txt").write_bytes(bom)  # (a BOM alone: no characters, an empty split)
    with pytest.raises(StillError, match="the test split of .* is empty"):
        load_corpus(str(tmp_path / "marked"))
    (tmp_path / "bad.txt").write_bytes(bom + b"good text\xff more" + b" padding" * 20)
    with pytest.raises(StillError, match=r"bad.txt is not UTF-8: byte 0xff at offset 12 "):  # (the file's offset)
        load_text(tmp_path / "bad.txt")


def test_text_file_and_folder(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("x" * 1000)
    corpus = load_text(path)
    assert [len(corpus.train[0].text), len(corpus.valid[0].text), len(corpus.test[0].text)] == [900, 50, 50]
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"book {i} " * 10)
    corpus = load_text(folder)
    assert [d.name for d in corpus.train] == ["0.txt", "1.txt", "2.txt"] and corpus.test[0].name == "4.txt"


def test_a_folder_is_split_in_the_walks_order_not_that_of_sorted_paths(tmp_path):
    """Each folder's entries sorted by name, a sub-folder's files read where its name sorts (a probe:
    the docs promised the order of sorted paths, which puts a/x.txt after a.txt)."""
    from still.data.text import walk_files

    folder = tmp_path / "books"
    (folder / "a").mkdir(parents=True)
    for name in ("a/x.txt", "a-b.txt", "a.txt"):
        (folder / name).write_text(f"the book {name}\n" * 10)
    names = [name for name, _ in walk_files(folder, (".txt",))]
    assert names == ["a/x.txt", "a-b.txt", "a.txt"] != sorted(names)
    corpus = load_text(folder)
    assert [[d.name for d in corpus.split(s)] for s in ("train", "valid", "test")] == [["a/x.txt"], ["a-b.txt"],
                                                                                       ["a.txt"]]


def test_empty_or_short_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(StillError, match="too short to split"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("é" * 15)  # (split by bytes at byte level, and said so: a probe)
    with pytest.raises(StillError, match=r"short.txt is too short to split \(15 characters\)"):
        load_text(tmp_path / "short.txt")
    (tmp_path / "short.txt").write_text("é" * 5)
    with pytest.raises(StillError, match=r"short.txt is too short to split \(10 bytes\)"):
        load_text(tmp_path / "short.txt", byte_level=True)
    with pytest.raises(StillError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(StillError, match="the corpus split is empty"):
        TokenStreams([torch.zeros(0, dtype=torch.long)], 2, 4)


def test_enwik8_split_raw_and_zipped(tmp_path):
    data = bytes(range(256)) * 4  # 1024 bytes
    raw = tmp_path / "enwik8"
    raw.write_bytes(data)
    corpus = load_enwik8(raw, split=(900, 50, 50))
    assert corpus.byte_level and corpus.train[0].text == data[:900] and corpus.test[0].text == data[950:1000]
    zipped = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("enwik8", data)
    assert load_enwik8(zipped, split=(900, 50, 50)).valid[0].text == data[900:950]
    with pytest.raises(StillError, match="holds 1024 bytes; the split needs 100000000"):
        load_enwik8(raw)
    for bad in ((900, -50, 50), (0, 50, 50), (900, 50), (900, 50.0, 50)):
        with pytest.raises(StillError, match=re.escape(f"the enwik8 split must be three whole numbers of bytes >= 0 "
                                                       f"(train > 0), got {bad!r}")):
            load_enwik8(raw, split=bad)


def test_pg19_layout(tmp_path):
    for folder, books in (("train", 3), ("validation", 1), ("test", 2)):
        (tmp_path / folder).mkdir()
        for i in range(books):
            (tmp_path / folder / f"{1000 + i}.txt").write_text(f"{folder} book {i}\n" * 20)
    corpus = load_pg19(tmp_path)
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (3, 1, 2)
    (tmp_path / "test" / "1000.txt").unlink()
    (tmp_path / "test" / "1001.txt").unlink()
    with pytest.raises(StillError, match="no books in test/"):
        load_pg19(tmp_path)
    with pytest.raises(StillError, match="PG-19 folder .*elsewhere does not exist"):
        load_pg19(tmp_path / "elsewhere")
    with pytest.raises(StillError, match="PG-19 folder .*1001.txt is a file"):
        load_pg19(tmp_path / "train" / "1001.txt")



def test_damaged_enwik8_archives_are_named(tmp_path):
    folder = tmp_path / "enwik8"
    folder.mkdir()
    with pytest.raises(StillError, match="is a directory"):
        load_enwik8(folder)
    data = b"<mediawiki>" * 100
    zipped = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)
    archive = zipped.read_bytes()
    offset = archive.index(b"enwik8", 30) + 6 + 20  # inside the member's compressed bytes
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(archive[:offset] + bytes([archive[offset] ^ 0xFF]) + archive[offset + 1:])
    with pytest.raises(StillError, match="damaged.zip is a damaged zip archive"):
        load_enwik8(damaged, split=(900, 50, 50))
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(StillError, match="truncated.zip is not a whole zip archive"):
        load_enwik8(truncated, split=(900, 50, 50))


def test_an_enwik8_archive_without_the_member_says_what_it_holds(tmp_path):
    for names, said in (((), "it is empty"), (("a", "b"), "it has a, b")):
        with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as zf:
            for name in names:
                zf.writestr(name, b"x")
        with pytest.raises(StillError, match=f"does not contain a file named enwik8 \\({said}\\)"):
            load_enwik8(tmp_path / "enwik8.zip", split=(1, 0, 0))


def test_enwik8_archives_zipfile_cannot_unpack_and_a_bad_crc_are_named(tmp_path):
    """An encrypted member and a Deflate64 one raised zipfile's RuntimeError and NotImplementedError
    (exit 1 from the CLI); a split shorter than the member read it only in part, so its CRC, checked
    at its end, was not: a damaged stored archive was taken."""
    import struct

    data = bytes(range(256)) * 40
    stored = tmp_path / "stored.zip"
    with zipfile.ZipFile(stored, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("enwik8", data)
    archive = stored.read_bytes()
    central = archive.index(b"PK\x01\x02")
    encrypted, deflate64, flipped = bytearray(archive), bytearray(archive), bytearray(archive)
    encrypted[6] |= 1  # the "encrypted" flag, local and central headers (as `zip -e` writes it)
    encrypted[central + 8] |= 1
    deflate64[8:10] = deflate64[central + 10 : central + 12] = struct.pack("<H", 9)  # method 9: Deflate64
    flipped[archive.index(data[:64]) + 9000] ^= 1  # past the split's 1000 bytes
    for name, archive_bytes, message in (
            ("encrypted.zip", encrypted, "cannot unpack enwik8 from .*encrypted.zip .*encrypted"),
            ("deflate64.zip", deflate64, "cannot unpack enwik8 from .*deflate64.zip .*not supported"),
            ("flipped.zip", flipped, "flipped.zip is a damaged zip archive .*CRC")):
        (tmp_path / name).write_bytes(bytes(archive_bytes))
        with pytest.raises(StillError, match=message):
            load_enwik8(tmp_path / name, split=(900, 50, 50))
    assert load_enwik8(stored, split=(900, 50, 50)).test[0].text == data[950:1000]  # (not past the split)


def _wikitext(folder, ext="tokens"):
    folder.mkdir(parents=True)
    titles = (("train", "Valkyria Chronicles III"), ("valid", "Homarus gammarus"), ("test", "Robert Boulter"))
    for name, title in titles:
        (folder / f"wiki.{name}.{ext}").write_text(f" \n = {title} = \n \n The game @-@ play <unk> . \n" * 3)


def test_wikitext103_as_its_archive_unpacks(tmp_path):
    _wikitext(tmp_path / "wikitext-103")
    corpus = load_corpus(f"wikitext103:{tmp_path}")
    assert corpus.name == "wikitext103" and [len(s) for s in (corpus.train, corpus.valid, corpus.test)] == [1, 1, 1]
    assert corpus.test[0].name == "wiki.test.tokens" and "Robert Boulter" in corpus.test[0].text
    assert load_wikitext103(tmp_path / "wikitext-103").train[0].text == corpus.train[0].text
    _wikitext(tmp_path / "raw" / "wikitext-103-raw", ext="raw")
    corpus = load_wikitext103(tmp_path / "raw", byte_level=True)
    assert corpus.byte_level and corpus.valid[0].name == "wiki.valid.raw" and isinstance(corpus.valid[0].text, bytes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StillError, match="lacks wiki.train.tokens"):
        load_wikitext103(tmp_path / "empty")
    with pytest.raises(StillError, match="is a file: unpack the archive"):
        load_wikitext103(tmp_path / "wikitext-103" / "wiki.train.tokens")


def test_plain_folders_laid_out_as_pg19_or_wikitext_are_refused(tmp_path):
    """Split by sorted name, PG-19's test/ books would train: the folder is named as the kind it is."""
    for folder in ("train", "validation", "test"):
        (tmp_path / "pg" / folder).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "pg" / folder / f"{i}.txt").write_text(f"{folder} {i} " * 20)
    with pytest.raises(StillError, match="laid out as PG-19 .*give it as pg19:"):
        load_corpus(str(tmp_path / "pg"))
    _wikitext(tmp_path / "wt")
    with pytest.raises(StillError, match="give it as wikitext103:"):
        load_corpus(str(tmp_path / "wt"))


def test_an_empty_split_is_named_before_anything_trains(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"book {i} " * 10 if i != 4 else "")
    with pytest.raises(StillError, match="the test split of .* is empty \\(1 document\\(s\\): 4.txt\\)"):
        load_corpus(str(folder))


def test_evaluation_reads_only_its_split(tmp_path, reads):
    """PG-19's training books are 11 GB: scoring the test books reads none of them (nor another
    corpus kind's other splits, where they are files of their own)."""
    for folder, books in (("train", 3), ("validation", 1), ("test", 2)):
        (tmp_path / "pg" / folder).mkdir(parents=True)
        for i in range(books):
            (tmp_path / "pg" / folder / f"{i}.txt").write_text(f"{folder} book {i}\n" * 20)
    _wikitext(tmp_path / "wt")
    books = tmp_path / "books"
    books.mkdir()
    for i in range(5):
        (books / f"{i}.txt").write_text(f"book {i} " * 10)
    read = reads
    for name, wanted in ((f"pg19:{tmp_path / 'pg'}", ["0.txt", "1.txt"]),
                         (f"wikitext103:{tmp_path / 'wt'}", ["wiki.test.tokens"]), (str(books), ["4.txt"])):
        read.clear()
        corpus = load_corpus(name, splits=("test",))
        assert [d.text for d in corpus.test] and read == wanted and corpus.train == corpus.valid == []
    with pytest.raises(StillError, match="split must be train, valid or test, got 'dev'"):
        load_corpus(str(books), splits=("dev",))


def test_a_file_of_its_own_is_read_when_its_text_is_asked_for(tmp_path, reads):
    """A book of PG-19 or a file of a folder is a document of its own, read whenever its text is asked
    for and not kept: a corpus of many files is never held whole (`still.data.encoded`)."""
    _pg19(tmp_path / "pg")
    read = reads
    corpus = load_corpus(f"pg19:{tmp_path / 'pg'}")
    assert read == [] and [d.name for d in corpus.train] == ["0", "1", "2"]
    assert corpus.train[1].text == "train book 1\n" * 20 and read == ["1.txt"]
    assert corpus.train[1].text == "train book 1\n" * 20 and read == ["1.txt", "1.txt"]  # (not kept)
    assert load_corpus(f"pg19:{tmp_path / 'pg'}", byte_level=True).test[0].text == b"test book 0\n" * 20
    (tmp_path / "pg" / "test" / "0.txt").write_text("")
    (tmp_path / "pg" / "test" / "1.txt").write_text("")
    read.clear()
    with pytest.raises(StillError, match="the test split of .* is empty"):  # (by the files' sizes, none read)
        load_corpus(f"pg19:{tmp_path / 'pg'}")
    assert read == []


def _pg19(folder):
    for split, books in (("train", 3), ("validation", 1), ("test", 2)):
        (folder / split).mkdir(parents=True)
        for i in range(books):
            (folder / split / f"{i}.txt").write_text(f"{split} book {i}\n" * 20)


def test_an_unreadable_file_is_a_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "one.txt"
    path.write_text("x" * 1000)

    def unreadable(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.read_bytes", unreadable)
    with pytest.raises(StillError, match="cannot read .*one.txt: Permission denied"):
        load_corpus(str(path))


def _rows(streams):
    """Per row, its targets in order, with "|" where the row's memories reset."""
    seen = {row: [] for row in range(streams.batch_size)}
    for segment in streams:
        for row in range(streams.batch_size):
            if segment.reset[row]:
                seen[row].append("|")
            valid = segment.targets[row] != -100
            seen[row].extend(segment.targets[row][valid].tolist())
    return seen


@pytest.mark.parametrize("seed", range(12))
def test_every_row_reads_its_pieces_in_turn_whole_and_then_pads(seed):
    """Random documents, batches, segment lengths, shuffled or not, cut or not: each row's targets
    are its pieces' tokens in turn (a reset where each starts), its positions count from the piece's
    start, and after its last piece it pads (reset, nothing to predict) to the longest row's end."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 50, (int(n),), generator=g) for n in torch.randint(1, 40, (int(torch.randint(1, 9, (1,),
                                                                                        generator=g)),), generator=g)]
    batch, length = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
    streams = TokenStreams(docs, batch, length, shuffle_seed=seed if seed % 2 else None, fill_rows=seed % 3 == 0)
    seen = _rows(streams)
    for row, pieces in enumerate(streams.rows):
        want, steps = [], 0
        for p in pieces:
            d, first, end = streams.pieces[p]
            want += ["|", *docs[d][first:end].tolist()]
            steps += -(-(end - first) // length)
        assert seen[row][: len(want)] == want and set(seen[row][len(want):]) <= {"|"}
        assert seen[row][len(want):].count("|") == len(streams) - steps  # (a padding step: a reset)
    positions = {row: [] for row in range(streams.batch_size)}
    for segment in streams:
        valid = segment.targets != -100
        assert ((segment.positions >= 0) == valid).all()
        for row in positions:
            positions[row] += segment.positions[row][valid[row]].tolist()
    for row, pieces in enumerate(streams.rows):
        assert positions[row] == [i for p in pieces for i in range(streams.pieces[p][2] - streams.pieces[p][1])]
    assert sorted(p for row in streams.rows for p in row) == list(range(len(streams.pieces)))


@pytest.mark.parametrize("seed", range(4))
def test_each_piece_goes_to_the_first_row_of_fewest_segments(seed):
    # (the rows as a scan of every row a piece dealt them, which took minutes at tens of thousands of rows)
    g = torch.Generator().manual_seed(seed)
    docs = [torch.ones(int(n), dtype=torch.long) for n in torch.randint(1, 60, (200,), generator=g)]
    shuffle = seed if seed % 2 else None
    for batch in (1, 7, 64, 500):
        streams = TokenStreams(docs, batch, 4, shuffle_seed=shuffle, fill_rows=True)
        sizes = [streams._segments(end - first) for _, first, end in streams.pieces]
        order = (torch.randperm(len(sizes), generator=torch.Generator().manual_seed(shuffle)).tolist()
                 if shuffle is not None else  # (else the longest pieces first)
                 sorted(range(len(sizes)), key=lambda p: streams.pieces[p][1] - streams.pieces[p][2]))
        rows, segments = [[] for _ in range(streams.batch_size)], [0] * streams.batch_size
        for p in order:
            row = min(range(streams.batch_size), key=lambda r: segments[r])
            rows[row].append(p)
            segments[row] += sizes[p]
        assert streams.rows == rows and streams.num_segments == max(segments)


def test_streams_keep_documents_whole_and_reset_at_their_start():
    docs = [torch.arange(2, 12), torch.arange(20, 23), torch.arange(30, 37)]  # lengths 10, 3, 7
    streams = TokenStreams(docs, batch_size=2, segment_len=4)
    for segment in streams:
        for row in range(streams.batch_size):
            # each input predicts the next token of the same document
            valid = segment.targets[row] != -100
            inputs = segment.inputs[row][valid]
            assert (inputs[1:] == segment.targets[row][valid][:-1]).all()
    seen = _rows(streams)
    # longest first: row 0 gets the 10-token document, row 1 the 7 then the 3
    assert seen[0][:11] == ["|", *range(2, 12)]
    assert seen[1] == ["|", *range(30, 37), "|", *range(20, 23)]
    assert sum(len([t for t in v if t != "|"]) for v in seen.values()) == streams.num_targets == 20


def test_streams_first_input_is_the_document_token():
    streams = TokenStreams([torch.arange(5, 9)], batch_size=4, segment_len=8)
    segment = streams.segment(0)
    assert streams.batch_size == 1  # never more rows than documents
    assert segment.inputs[0, 0] == Vocab.DOC and segment.targets[0, :4].tolist() == [5, 6, 7, 8]
    assert segment.positions[0, :5].tolist() == [0, 1, 2, 3, -1]


@requires_shakespeare
def test_shakespeare_split_by_play():
    corpus = load_shakespeare()
    names = {d.name for d in corpus.train}
    assert [d.name for d in corpus.valid] == list(SHAKESPEARE_VALID)
    assert [d.name for d in corpus.test] == list(SHAKESPEARE_TEST)
    assert len(corpus.train) == 38 and not names & set(SHAKESPEARE_VALID + SHAKESPEARE_TEST)
    assert corpus.test[0].text.startswith("HAMLET, PRINCE OF DENMARK")
    assert 4_500_000 < sum(len(d.text) for d in corpus.train) < 4_600_000


def test_fill_rows_cuts_one_document_into_a_piece_a_row():
    doc = torch.arange(100, 150)  # 50 tokens: 13 segments of 4
    streams = TokenStreams([doc], batch_size=4, segment_len=4, fill_rows=True)
    assert streams.batch_size == 4 and len(streams.pieces) == 4
    # contiguous pieces in whole segments (13 = 3 + 3 + 3 + 4), covering the document once
    assert streams.pieces == [(0, 0, 12), (0, 12, 24), (0, 24, 36), (0, 36, 50)]
    assert len(streams) == 4  # segments of the longest row
    rows = _rows(streams)
    pieces = sorted((row[1], row) for row in rows.values())  # by first target
    assert [t for _, row in pieces for t in row if t != "|"] == doc.tolist()
    for row in rows.values():  # each row: its memories reset, one contiguous piece, then padding (resets)
        body = [t for t in row[1:] if t != "|"]
        assert row[0] == "|" and row[1 : 1 + len(body)] == body == list(range(body[0], body[0] + len(body)))
    # a later piece goes on from the token before it, not from <doc>; the first starts at <doc>
    first = streams.segment(0)
    starts = {int(first.targets[r, 0]): int(first.inputs[r, 0]) for r in range(4)}
    assert starts == {100: Vocab.DOC, 112: 111, 124: 123, 136: 135}
    # positions count from the piece's start: what the row has read since its memories reset
    assert (first.positions[:, 0] == 0).all() and (streams.segment(1).positions[:, :2] == torch.tensor([4, 5])).all()
    assert first.reset.all()


def test_fill_rows_cuts_in_proportion_and_never_more_than_segments():
    docs = [torch.arange(0, 40), torch.arange(50, 58)]  # 10 and 2 segments of 4
    streams = TokenStreams(docs, batch_size=6, segment_len=4, fill_rows=True)
    assert [d for d, _, _ in streams.pieces] == [0] * 5 + [1]  # shares 5 and 1
    targets = sorted(t for row in _rows(streams).values() for t in row if t != "|")
    assert targets == list(range(40)) + list(range(50, 58))
    # more rows than segments: a piece a segment
    short = TokenStreams([torch.arange(10)], batch_size=8, segment_len=4, fill_rows=True)
    assert short.batch_size == 3 and short.pieces == [(0, 0, 4), (0, 4, 8), (0, 8, 10)]
    # the last segment of a piece feeds nothing past the piece
    last = short.segment(0)
    row = int((last.targets[:, 0] == 8).nonzero())
    assert last.inputs[row, :3].tolist() == [7, 8, 9] and last.inputs[row, 3] == 0 and last.targets[row, 2] == -100


def test_fill_rows_changes_nothing_with_as_many_documents_as_rows():
    docs = [torch.arange(2, 12), torch.arange(20, 23), torch.arange(30, 37)]
    for seed in (None, 3):
        plain = TokenStreams(docs, batch_size=2, segment_len=4, shuffle_seed=seed)
        filled = TokenStreams(docs, batch_size=2, segment_len=4, shuffle_seed=seed, fill_rows=True)
        assert len(plain) == len(filled)
        for a, b in zip(plain, filled):
            for name in ("inputs", "targets", "reset", "positions"):
                assert torch.equal(getattr(a, name), getattr(b, name))
