"""Evaluation: negative log-likelihood and perplexity of token sequences."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.config import ModelConfig
from optgqa_jax.model import forward


def token_nll(cfg: ModelConfig, params: dict, token_ids: Sequence[int]) -> np.ndarray:
    """Per-token negative log-likelihood (nats) of ``token_ids[1:]`` given their prefixes.

    Sequences longer than ``cfg.max_seq_len`` raise ValueError (no silent truncation).

    Returns:
      float64 numpy array of length ``len(token_ids) - 1``.
    """
    ids = np.asarray(token_ids, np.int32)
    if ids.ndim != 1 or ids.size < 2:
        raise ValueError(f"token_ids must be a flat sequence of at least 2 ids, got shape {ids.shape}")
    logits = forward(cfg, params, ids[None, :])[0, :-1]  # [T-1, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1)[:, 0]
    return np.asarray(nll, np.float64)


def perplexity(cfg: ModelConfig, params: dict, token_ids: Sequence[int]) -> float:
    """exp(mean next-token NLL) of one token sequence (see :func:`token_nll`)."""
    return float(np.exp(token_nll(cfg, params, token_ids).mean()))
