"""Reference generation over a simple contiguous K/V cache.

:func:`generate_simple` is deliberately plain: prefill every prompt of the
batch at once (right-padded), then decode one token per step for all rows
against a :class:`~optgqa_jax.model.KVCache`. The paged engine is checked
against it token for token, so it favours obviousness over speed.

Padding is harmless: a row's padded slots sit at positions past its prompt;
they are masked (keys beyond a query's position are never attended) and the
row's first generated token overwrites the first of them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from optgqa_jax.config import ModelConfig
from optgqa_jax.engine.config import SamplingParams
from optgqa_jax.model import KVCache, forward_with_cache
from optgqa_jax.sampling import row_keys, sample
from optgqa_jax.validation import check_prompt_ids

TokenIds = Sequence[int]


def validate_sampling(*, max_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Raise ValueError naming the first bad sampling argument (the engine's SamplingParams rules)."""
    SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens)


def validate_prompt(cfg: ModelConfig, prompt: TokenIds, max_tokens: int, name: str = "prompt") -> None:
    """Raise ValueError if a prompt is empty, has out-of-vocabulary ids or is too long."""
    check_prompt_ids(prompt, cfg.vocab_size, name)
    if len(prompt) + max_tokens > cfg.max_seq_len:
        raise ValueError(f"{name} of {len(prompt)} tokens plus max_tokens={max_tokens} exceeds "
                         f"max_seq_len={cfg.max_seq_len}")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate_simple(cfg: ModelConfig, params: dict,
                    prompt_ids: Union[TokenIds, Sequence[TokenIds]], max_tokens: int, *,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int = 0, eos_id: Optional[int] = None, progress: bool = False,
                    attention_impl: str = "auto"
                    ) -> Union[list[int], list[list[int]]]:
    """Generate continuations of one prompt or a batch of prompts.

    Args:
      cfg: model configuration.
      params: model parameters.
      prompt_ids: one prompt (a list of token ids) or a list of prompts of any lengths.
      max_tokens: number of tokens to generate per prompt (>= 1).
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_p: nucleus sampling mass in (0, 1].
      top_k: keep the k most likely tokens (0: all).
      seed: sampling seed; a prompt's tokens depend only on (seed, prompt), not
        on the rest of the batch.
      eos_id: stop a row after it emits this id (the id is included in its output).
      progress: show a tqdm progress bar over decode steps.
      attention_impl: ``"auto"``, ``"pallas"``, ``"reference"`` or ``"xla"`` (see
        ``optgqa_jax.forward``).

    Returns:
      The generated ids (without the prompt): a list for one prompt, a list of
      lists for a batch.
    """
    single = len(prompt_ids) > 0 and np.isscalar(prompt_ids[0])
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if not prompts:
        raise ValueError("prompt_ids is empty; pass one prompt or a non-empty list of prompts")
    validate_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    for i, p in enumerate(prompts):
        validate_prompt(cfg, p, max_tokens, name="prompt_ids" if single else f"prompt_ids[{i}]")

    B = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = int(lengths.max())
    # Round shapes up so that similar calls reuse compiled steps.
    padded = np.zeros((B, min(_round_up(T, 16), cfg.max_seq_len)), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    cache_len = _round_up(padded.shape[1] + max_tokens, 64)
    cache = KVCache.zeros(cfg, B, cache_len)

    temps = jnp.full((B,), temperature, jnp.float32)
    top_ks = jnp.full((B,), top_k, jnp.int32)
    top_ps = jnp.full((B,), top_p, jnp.float32)
    seeds = jnp.full((B,), seed, jnp.uint32)

    logits, cache = forward_with_cache(cfg, params, padded, cache, np.zeros(B, np.int32),
                                       attention_impl=attention_impl)
    last = jnp.asarray(logits)[np.arange(B), lengths - 1]  # [B, V]
    positions = lengths.copy()  # position of the token about to be sampled
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    bar = tqdm(total=max_tokens, desc="generate", unit="tok", disable=not progress,
               leave=False)
    for step in range(max_tokens):
        bar.update(1)
        keys = row_keys(seeds, jnp.asarray(positions))
        next_ids = np.asarray(sample(last, keys, temps, top_ks, top_ps))
        for i in range(B):
            if not done[i]:
                outputs[i].append(int(next_ids[i]))
                done[i] = eos_id is not None and int(next_ids[i]) == eos_id
        if done.all() or step == max_tokens - 1:
            break
        logits, cache = forward_with_cache(cfg, params, next_ids[:, None], cache, positions,
                                           attention_impl=attention_impl)
        last = logits[:, 0]
        positions = positions + 1
    bar.close()
    return outputs[0] if single else outputs
