"""Evaluation: negative log-likelihood and perplexity of token sequences."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

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


def check_windows(cfg: ModelConfig, windows, name: str = "windows") -> np.ndarray:
    """Validate token windows for `cfg`; returns them as int32 [n, T].

    Raises:
      ValueError (naming `name`): not a non-empty integer [n, T] array with T >= 2, ids outside
        the vocabulary, or T > max_seq_len.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"{name} must be token windows [n, T], got shape {windows.shape}")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"{name} must hold at least one window of >= 2 tokens, got shape "
                         f"{windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {windows.dtype}")
    if windows.min() < 0 or windows.max() >= cfg.vocab_size:
        raise ValueError(f"{name} hold token ids outside [0, vocab_size={cfg.vocab_size})")
    if windows.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{name} of {windows.shape[1]} tokens exceed "
                         f"max_seq_len={cfg.max_seq_len}")
    return windows.astype(np.int32)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _window_nll(cfg: ModelConfig, params: dict, tokens, attention_impl: str) -> jax.Array:
    """Next-token NLL (nats) of int32 tokens [B, T]: float32 [B, T-1], reduced on the device so
    the [B, T, V] logits never travel to the host."""
    logits = forward(cfg, params, tokens, attention_impl=attention_impl)[:, :-1]  # [B, T-1, V]
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return logz - target


def windows_perplexity(cfg: ModelConfig, params: dict, windows, *, batch_size: int = 8,
                       progress: bool = False, attention_impl: str = "auto") -> float:
    """Perplexity of token windows: exp of the mean next-token NLL over every predicted token.

    Each window is scored on its own (no context carries over from the previous window), so a
    window of T tokens contributes T-1 predictions; the mean is over all ``n * (T - 1)`` of them,
    accumulated in float64 on the host. Batches are padded to `batch_size` windows (padding is
    ignored) so every batch runs one compiled shape.

    Args:
      cfg: the model's configuration.
      params: float or quantized parameters.
      windows: int [n, T] token ids, ``n >= 1``, ``2 <= T <= cfg.max_seq_len``
        (``optgqa_jax.data.corpus_windows``).
      batch_size: windows per forward pass.
      progress: show a tqdm bar over batches.
      attention_impl: as for :func:`optgqa_jax.forward`.

    Returns:
      The perplexity, a float.

    Raises:
      ValueError: windows that are not a non-empty integer [n, T] array with T >= 2, ids outside
        the vocabulary, T > max_seq_len, batch_size < 1.
    """
    windows = check_windows(cfg, windows)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    n = windows.shape[0]
    batch_size = min(batch_size, n)
    total = 0.0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch",
                      disable=not progress):
        batch = windows[start:start + batch_size].astype(np.int32)
        real = batch.shape[0]
        if real < batch_size:  # repeat the last window; its rows are dropped below
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        nll = np.asarray(_window_nll(cfg, params, jnp.asarray(batch), attention_impl))
        total += float(nll[:real].astype(np.float64).sum())
    return float(np.exp(total / (n * (windows.shape[1] - 1))))
