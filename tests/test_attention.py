"""The jnp attention reference against the float64 numpy one (explicit mask/bias matrices)."""

import jax.numpy as jnp
import numpy as np
import pytest

import optgqa_jax as og
from numpy_reference import attention_np
from checks import assert_close_to_scale


@pytest.mark.parametrize("N,K,T,S,alibi", [
    (8, 2, 5, 5, False),   # GQA, full causal
    (12, 4, 3, 7, True),   # non-power-of-two heads with ALiBi, queries at the end
    (4, 4, 1, 9, True),    # MHA, a single decode query
    (6, 1, 4, 4, False),   # MQA
    (5, 5, 1, 1, True),    # length 1
])
def test_attention_matches_float64(rng, N, K, T, S, alibi):
    H, B = 16, 2
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    # Queries are the last T positions; row 1 lags one position behind (a ragged batch).
    qpos = np.stack([np.arange(S - T, S), np.maximum(np.arange(S - T, S) - 1, 0)]).astype(np.int32)
    slopes = np.asarray(og.alibi_slopes(N), np.float64) if alibi else None
    out = og.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(qpos),
                       alibi_slopes=None if slopes is None else jnp.asarray(slopes, jnp.float32))
    kv_map = [h // (N // K) for h in range(N)]
    for b in range(B):
        ref = attention_np(q[b].astype(np.float64), k[b].astype(np.float64),
                           v[b].astype(np.float64), qpos[b], kv_map, slopes)
        assert_close_to_scale(out[b], ref, 1e-5, what=f"row {b}")


def test_arbitrary_kv_head_map(rng):
    N, K, T, H = 6, 3, 4, 8
    kv_map = (2, 0, 2, 1, 0, 2)  # unequal groups: sizes 2, 1, 3
    q = rng.standard_normal((1, T, N, H)).astype(np.float32)
    k = rng.standard_normal((1, T, K, H)).astype(np.float32)
    v = rng.standard_normal((1, T, K, H)).astype(np.float32)
    qpos = np.arange(T, dtype=np.int32)[None]
    out = og.attention(q, k, v, qpos, kv_head_map=kv_map)
    ref = attention_np(q[0].astype(np.float64), k[0].astype(np.float64), v[0].astype(np.float64),
                       qpos[0], kv_map)
    assert_close_to_scale(out[0], ref, 1e-5)


def test_bfloat16_inputs_give_bfloat16_output_and_float32_accuracy(rng):
    N, K, T, H = 8, 2, 6, 64
    q = rng.standard_normal((1, T, N, H))
    k = rng.standard_normal((1, T, K, H))
    v = rng.standard_normal((1, T, K, H))
    qpos = np.arange(T, dtype=np.int32)[None]
    out = og.attention(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                       jnp.asarray(v, jnp.bfloat16), qpos)
    assert out.dtype == jnp.bfloat16
    ref = attention_np(q[0], k[0], v[0], qpos[0], [h // 4 for h in range(N)])
    assert_close_to_scale(out[0], ref, 2e-2)
