"""flash_attention (dense prefill) against a float64 numpy reference; interpret mode on CPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checks import assert_close_to_scale
from kernel_cases import INTERPRET, TOLERANCE, attention_np, contiguous_map, rand
from pallas_kernels import alibi_slopes, compiler_options
from pallas_kernels.flash_attention import (FlashAttentionConfig, flash_attention,
                                            flash_attention_reference)

SMALL = FlashAttentionConfig(block_q=16, block_k=16, num_warps=4, num_stages=1)

CASES = [
    # dtype, B, T, S, N, K, D, causal, alibi
    (jnp.float32, 2, 37, 37, 12, 4, 64, True, True),    # odd length, 12/4 heads, ALiBi
    (jnp.bfloat16, 1, 48, 48, 8, 2, 128, True, False),
    (jnp.float16, 1, 5, 41, 4, 4, 64, True, True),       # MHA, queries are the last 5 of 41
    (jnp.bfloat16, 1, 33, 50, 8, 1, 64, False, True),    # MQA, not causal
    (jnp.float32, 2, 1, 1, 6, 3, 128, True, True),       # length 1
    (jnp.float32, 1, 1, 23, 5, 1, 64, True, False),      # single query against a prefix
    (jnp.float32, 1, 32, 64, 4, 2, 64, False, False),    # not causal, whole key tiles
]


def _check(rng, dtype, B, T, S, N, K, D, causal, alibi, config=SMALL, jit_options=None):
    """jit_options: compile the call in a jax.jit with these compiler options."""
    q, q64 = rand(rng, (B, T, N, D), dtype)
    k, k64 = rand(rng, (B, S, K, D), dtype)
    v, v64 = rand(rng, (B, S, K, D), dtype)
    slopes = np.asarray(alibi_slopes(N), np.float64) if alibi else None
    call = functools.partial(flash_attention, causal=causal, interpret=INTERPRET, config=config)
    if jit_options is not None:
        call = jax.jit(call, compiler_options=jit_options)
    out = call(q, k, v,
               alibi_slopes=None if slopes is None else jnp.asarray(slopes, jnp.float32))
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32), np.float64)
    for b in range(B):
        ref = attention_np(q64[b], k64[b], v64[b], S - T + np.arange(T), contiguous_map(N, K),
                           slopes, causal=causal)
        assert_close_to_scale(out[b], ref, TOLERANCE[dtype], what=f"batch row {b}")


@pytest.mark.parametrize("dtype,B,T,S,N,K,D,causal,alibi", CASES)
def test_matches_float64_reference(rng, dtype, B, T, S, N, K, D, causal, alibi):
    _check(rng, dtype, B, T, S, N, K, D, causal, alibi)


def test_random_shapes(rng):
    for _ in range(3):
        K = int(rng.choice([1, 2, 3]))
        T = int(rng.integers(1, 40))
        _check(rng, jnp.float32, 1, T, T + int(rng.integers(0, 20)), K * int(rng.integers(1, 5)),
               K, int(rng.choice([64, 128])), bool(rng.integers(2)), bool(rng.integers(2)))


LAZY = FlashAttentionConfig(block_q=16, block_k=16, num_warps=4, num_stages=1,
                            lazy_rescale=True)


@pytest.mark.parametrize("dtype,causal,alibi,growth", [
    (jnp.float32, True, False, 0.0),      # random scores: the running max rarely moves by 2^8
    (jnp.float32, True, True, 0.0),
    (jnp.bfloat16, True, False, 0.6),     # keys grow along the sequence: the max jumps often
    (jnp.float32, False, True, 0.6),
    (jnp.float16, True, True, 0.3),
])
def test_lazy_rescale_matches_float64(rng, dtype, causal, alibi, growth):
    """lazy_rescale keeps the running max until a row's max grows by more than 2^8: the same
    attention as the float64 reference, whether the max stays (random scores) or keeps
    jumping past the threshold (keys whose norm grows along the sequence)."""
    B, T, S, N, K, D = 1, 45, 77, 6, 2, 64
    q, q64 = rand(rng, (B, T, N, D), dtype)
    k64 = rng.standard_normal((B, S, K, D)) * (1 + growth * np.arange(S))[None, :, None, None]
    k = jnp.asarray(k64, dtype)
    k64 = np.asarray(k.astype(jnp.float32), np.float64)
    v, v64 = rand(rng, (B, S, K, D), dtype)
    slopes = np.asarray(alibi_slopes(N), np.float64) if alibi else None
    out = flash_attention(q, k, v, causal=causal, interpret=INTERPRET, config=LAZY,
                          alibi_slopes=None if slopes is None else jnp.asarray(slopes))
    ref = attention_np(q64[0], k64[0], v64[0], S - T + np.arange(T), contiguous_map(N, K),
                       slopes, causal=causal)
    assert_close_to_scale(np.asarray(out.astype(jnp.float32), np.float64)[0], ref,
                          TOLERANCE[dtype], what="lazy rescale")


PREFETCH = FlashAttentionConfig(block_q=16, block_k=16, num_warps=4, num_stages=1,
                                prefetch_scores=True)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("lazy", [False, True])
def test_prefetched_scores_match_float64(rng, case, lazy):
    """prefetch_scores carries the next K tile's scores through the loop: the same attention
    on every case (one key tile, partial tiles, not causal, ALiBi), alone and with
    lazy_rescale."""
    cfg = dataclasses.replace(PREFETCH, lazy_rescale=lazy)
    _check(rng, *case, config=cfg)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("order", ["heads_fastest", "q_blocks_fastest"])
@pytest.mark.parametrize("heavy", [False, True])
def test_launch_orders_match_float64(rng, case, order, heavy):
    """The grid's other launch orders (heads fastest; q-blocks fastest) and heavy-first
    q-blocks: each program still finds its own queries, K/V and ALiBi slope."""
    _check(rng, *case, config=dataclasses.replace(SMALL, heavy_first=heavy, **{order: True}))


def test_one_launch_order_at_a_time():
    with pytest.raises(ValueError, match="heads_fastest and q_blocks_fastest"):
        FlashAttentionConfig(heads_fastest=True, q_blocks_fastest=True).validate()


def test_lazy_rescale_branches_in_the_kernel(rng):
    """The lazy path is a conditional inside the kernel; the eager one has none."""
    q, _ = rand(rng, (1, 32, 2, 64), jnp.float32)
    text = {lazy: str(jax.make_jaxpr(functools.partial(
        flash_attention, causal=True, interpret=INTERPRET,
        config=FlashAttentionConfig(block_q=16, block_k=16, num_warps=4, num_stages=1,
                                    lazy_rescale=lazy)))(q, q, q))
            for lazy in (False, True)}
    assert "cond[" in text[True] and "cond[" not in text[False]


@pytest.mark.parametrize("backend", ["cuda", "rocm"])
def test_backend_tiles_under_the_recommended_compiler_options(rng, backend):
    """Each backend's default tiles (CUDA: 256-query tiles, heavy blocks first), jitted with
    pallas_kernels.compiler_options() (float32 denormals flushed on CUDA), on a length that
    fills no tile."""
    config = FlashAttentionConfig.for_backend(backend, 128)
    _check(rng, jnp.bfloat16, 1, 300, 311, 6, 2, 128, True, True, config=config,
           jit_options=compiler_options())


def test_compiler_options_per_backend():
    assert compiler_options("cuda") == {"xla_gpu_ftz": True}
    assert compiler_options("rocm") == {} == compiler_options("cpu")
    with pytest.raises(ValueError, match="backend_name must be"):
        compiler_options("tpu")


def test_default_config_and_jnp_reference(rng):
    q, _ = rand(rng, (1, 70, 4, 64), jnp.float32)
    k, _ = rand(rng, (1, 70, 2, 64), jnp.float32)
    v, _ = rand(rng, (1, 70, 2, 64), jnp.float32)
    slopes = alibi_slopes(4)
    assert_close_to_scale(flash_attention(q, k, v, alibi_slopes=slopes, interpret=INTERPRET),
                          flash_attention_reference(q, k, v, alibi_slopes=slopes), 1e-4)


def test_length_zero_gives_empty_output(rng):
    q, _ = rand(rng, (1, 0, 4, 64), jnp.float32)
    k, _ = rand(rng, (1, 0, 2, 64), jnp.float32)
    assert flash_attention(q, k, k, interpret=INTERPRET).shape == (1, 0, 4, 64)


@pytest.mark.parametrize("shapes, kwargs, match", [
    (((1, 8, 6, 64), (1, 8, 4, 64)), {}, r"query heads \(6\) must be a multiple"),
    (((8, 6, 64), (1, 8, 2, 64)), {}, "q must have rank 4"),
    (((1, 8, 4, 64), (1, 4, 2, 64)), {}, "causal attention needs kv_len >= q_len"),
    (((1, 8, 4, 96), (1, 8, 2, 96)), {}, "head_dim=96 is not supported"),
    (((1, 8, 4, 64), (2, 8, 2, 64)), {}, "does not match q shape"),
    (((1, 8, 4, 64), (1, 8, 2, 64)), dict(alibi_slopes=jnp.ones(2)), "alibi_slopes must have shape"),
    (((1, 8, 4, 64), (1, 8, 2, 64)), dict(config=FlashAttentionConfig(block_q=8)),
     "block_q=8 must be a power of two >= 16"),
])
def test_invalid_inputs(shapes, kwargs, match):
    q = jnp.ones(shapes[0], jnp.float32)
    k = jnp.ones(shapes[1], jnp.float32)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, interpret=INTERPRET, **kwargs)


def test_mixed_dtypes_rejected():
    q = jnp.ones((1, 8, 4, 64), jnp.bfloat16)
    k = jnp.ones((1, 8, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="must share one dtype"):
        flash_attention(q, k, k, interpret=INTERPRET)
