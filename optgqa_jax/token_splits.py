"""Saved token ids: every split of a corpus tokenised once into a folder, read back on a machine
that has neither the tokenizer's files nor the corpus (a GPU host without the model package, or
the project's own checkpoints, trained with SmolLM2's tokenizer but carrying none).

A folder holds ``<corpus>-<split>.npy`` (int32 ids, as :func:`optgqa_jax.data.encode_split`
returns them) and ``tokens.json`` (tokenizer name, vocabulary size, corpus, its content hash and
the split fractions). :func:`save_token_splits` writes one, :func:`load_token_split` reads a split
and checks it against the corpus and vocabulary asked for; cut it with
:func:`optgqa_jax.data.ids_windows`::

    from optgqa_jax import data, token_splits
    token_splits.save_token_splits(tok, "shakespeare", "ids/", tokenizer_name="smollm2-135m")
    ids, meta = token_splits.load_token_split("ids/", "shakespeare", "test", vocab_size=49152)
    windows = data.ids_windows(ids, 512)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from optgqa_jax.data import (DEFAULT_FRACTIONS, SPLITS, _check_split, encode_split,
                             open_corpus)
from optgqa_jax.tokenizer import Tokenizer

__all__ = ["TOKENS_META", "save_token_splits", "load_token_split"]

TOKENS_META = "tokens.json"


def _token_split_file(directory: Path, name: str, split: str) -> Path:
    """``<name>-<split>.npy``, the corpus name made a plain file name (``text:`` paths)."""
    return directory / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{split}.npy"


def save_token_splits(tokenizer: Tokenizer, name: str, directory: Union[str, os.PathLike], *,
                      tokenizer_name: str, path: Optional[Union[str, os.PathLike]] = None,
                      fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict:
    """Tokenise every split of corpus `name` once into `directory`, for a machine that has
    neither the tokenizer's files nor the corpus: ``<name>-<split>.npy`` (int32 ids, as
    :func:`encode_split` returns them) and ``tokens.json`` (the record returned).

    Args:
      tokenizer: anything with ``encode`` and ``vocab_size``.
      name: the corpus, as for :func:`open_corpus`.
      directory: created if missing; existing files of the same names are replaced.
      tokenizer_name: what the record calls the tokenizer (e.g. ``"smollm2-135m"``).
      path, fractions: as for :func:`encode_split`.

    Returns:
      ``{"tokenizer", "vocab_size", "corpus", "corpus_hash", "fractions"}``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        np.save(_token_split_file(directory, name, split),
                encode_split(tokenizer, name, split, path=path, fractions=fractions))
    record = dict(tokenizer=tokenizer_name, vocab_size=int(tokenizer.vocab_size), corpus=name,
                  corpus_hash=open_corpus(name, path=path).content_hash,
                  fractions=[float(f) for f in fractions])
    (directory / TOKENS_META).write_text(json.dumps(record, indent=1))
    return record


def load_token_split(directory: Union[str, os.PathLike], name: str, split: str, *,
                     vocab_size: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """(int32 ids, the ``tokens.json`` record) of one split written by
    :func:`save_token_splits`; cut them with :func:`ids_windows`.

    Raises:
      FileNotFoundError: no such directory, record or split (the message says how to write
        them).
      ValueError: the ids are of another corpus, or of a tokenizer whose vocabulary is not
        `vocab_size` (when given), or hold ids outside it.
    """
    _check_split(split)
    directory = Path(directory)
    meta_file, ids_file = directory / TOKENS_META, _token_split_file(directory, name, split)

    def need(f: Path) -> None:
        if not f.is_file():
            raise FileNotFoundError(
                f"{str(f)!r} not found: write saved token ids with "
                "optgqa_jax.data.save_token_splits (or experiments/train_reference.py "
                "--save-tokens DIR) on a machine that has the tokenizer and the corpus")

    need(meta_file)
    meta = json.loads(meta_file.read_text())
    if meta.get("corpus") != name:
        raise ValueError(f"{str(directory)!r} holds corpus {meta.get('corpus')!r}, not {name!r}")
    if vocab_size is not None and meta.get("vocab_size") != vocab_size:
        raise ValueError(f"{str(directory)!r} was tokenized by {meta.get('tokenizer')!r} "
                         f"(vocabulary {meta.get('vocab_size')}); the model's vocabulary is "
                         f"{vocab_size}")
    need(ids_file)
    ids = np.load(ids_file)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{str(ids_file)!r} is not a 1-D integer array")
    if ids.size and (ids.min() < 0 or ids.max() >= meta.get("vocab_size", np.inf)):
        raise ValueError(f"{str(ids_file)!r} holds ids outside [0, {meta.get('vocab_size')})")
    return ids.astype(np.int32), meta
