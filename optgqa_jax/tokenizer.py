"""Tokenizers. Every tokenizer has ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``eos_id`` and ``vocab_size``.

* :class:`ByteTokenizer` — UTF-8 bytes as ids 0..255 plus BOS and EOS, for
  models this project trains from scratch.
* :class:`BPETokenizer` — a wrapper around a Hugging Face ``tokenizers``
  tokenizer; built from a GGUF vocabulary by :func:`bpe_from_gguf_vocab`, or
  read from a ``tokenizer.json`` with :meth:`BPETokenizer.from_file`.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers


class Tokenizer(Protocol):
    """What the models' loaders return and the engine and CLI use: ``encode`` text to ids,
    ``decode`` ids to text, ``eos_id`` (None where the vocabulary has none) and
    ``vocab_size``. :class:`ByteTokenizer` and :class:`BPETokenizer` implement it."""

    eos_id: Optional[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ``ids``."""


class ByteTokenizer:
    """UTF-8 bytes -> ids 0..255; id 256 is BOS, 257 is EOS (vocab_size 258)."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids, after ``bos_id`` where ``add_bos``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special ids are dropped, invalid UTF-8 is replaced."""
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"id {i} is outside the byte vocabulary [0, {self.vocab_size})")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE tokenizer backed by the `tokenizers` library."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, add_bos: bool = False,
                 chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        """Token ids in the vocabulary, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str, *, eos_token: Optional[str] = None) -> "BPETokenizer":
        """Load a Hugging Face ``tokenizer.json``; `eos_token` names the EOS token if any."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        tok = tokenizers.Tokenizer.from_file(path)
        eos_id = tok.token_to_id(eos_token) if eos_token else None
        return cls(tok, eos_id=eos_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens; BOS first where ``add_bos``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; special tokens dropped unless ``skip_special_tokens=False``."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, user_message: str) -> str:
        """Wrap one user message in ChatML (``<|im_start|>`` models such as SmolLM2).

        Only ChatML is supported; other templates raise ValueError.
        """
        if self.tokenizer.token_to_id("<|im_start|>") is None:
            raise ValueError("this tokenizer has no <|im_start|> token; only ChatML chat "
                             "formatting is supported")
        return f"<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n"


# GGUF token types (llama.cpp's llama_token_type).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# llama.cpp pre-tokenizer names that map to a GPT-2 byte-level split, with digits split
# one by one first where the original model does so.
_DIGIT_SPLITTING_PRE = {"smollm", "llama3", "llama-bpe", "qwen2", "dbrx", "smaug-bpe"}
_PLAIN_GPT2_PRE = {"gpt2", "default", "gpt-2"}


def bpe_from_gguf_vocab(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                        *, pre: str, bos_id: Optional[int], eos_id: Optional[int],
                        add_bos: bool, chat_template: Optional[str] = None) -> BPETokenizer:
    """Rebuild a GPT-2-style byte-level BPE tokenizer from GGUF tokenizer metadata.

    Args:
      tokens: ``tokenizer.ggml.tokens`` (byte-level unicode strings, index = id).
      merges: ``tokenizer.ggml.merges`` ("a b" strings, in priority order).
      token_types: ``tokenizer.ggml.token_type`` (3 = control, 4 = user-defined).
      pre: ``tokenizer.ggml.pre``, the llama.cpp pre-tokenizer name.
      bos_id, eos_id: special token ids.
      add_bos: whether to prepend BOS when encoding.

    Raises:
      ValueError: for a pre-tokenizer this function does not know.
    """
    if pre in _DIGIT_SPLITTING_PRE:
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in _PLAIN_GPT2_PRE:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: "
                         f"{sorted(_DIGIT_SPLITTING_PRE | _PLAIN_GPT2_PRE)}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False,
                                          byte_fallback=False))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(token_types) if t == _GGUF_CONTROL]
    user = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types) if t == _GGUF_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return BPETokenizer(tok, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                        chat_template=chat_template)
