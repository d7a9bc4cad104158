"""paged_prefill_attention (ragged, packed) against a float64 numpy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checks import assert_close_to_scale
from kernel_cases import (INTERPRET, TOLERANCE, attention_np, contiguous_map, gather_sequence,
                          rand, random_block_tables, random_pool)
from pallas_kernels import alibi_slopes
from pallas_kernels.paged_prefill_attention import (PagedPrefillConfig, paged_prefill_attention,
                                                    paged_prefill_attention_reference)

SMALL = PagedPrefillConfig(block_q=16, keys_per_block=16)

CASES = [
    # dtype, N, K, D, page, alibi, new tokens per sequence, context lengths
    (jnp.float32, 12, 4, 64, 8, True, [5, 0, 19, 1], [9, 0, 40, 1]),   # cache hits, empty, length 1
    (jnp.bfloat16, 8, 2, 128, 16, False, [17, 3], [17, 30]),            # fresh prompt, chunk
    (jnp.float16, 4, 4, 64, 32, True, [33], [70]),                      # MHA
    (jnp.bfloat16, 8, 1, 64, 8, True, [1, 2, 3], [1, 9, 27]),           # MQA
]


def _check(rng, dtype, N, K, D, Z, alibi, new, ctx, config=SMALL):
    B = len(new)
    max_pages = max(-(-c // Z) for c in ctx) + 1
    num_pages = B * max_pages + 2
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q, q64 = rand(rng, (int(cu[-1]), N, D), dtype)
    k, v, k64, v64 = random_pool(rng, K, num_pages, Z, D, dtype)
    tables = random_block_tables(rng, B, max_pages, num_pages)
    slopes = np.asarray(alibi_slopes(N), np.float64) if alibi else None
    out = paged_prefill_attention(
        q, k, v, jnp.asarray(tables), jnp.asarray(cu), jnp.asarray(ctx, jnp.int32),
        alibi_slopes=None if slopes is None else jnp.asarray(slopes, jnp.float32),
        interpret=INTERPRET, config=config)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_sequences(np.asarray(out.astype(jnp.float32), np.float64), q64, k64, v64, tables,
                      new, ctx, K, slopes, TOLERANCE[dtype])


def _assert_sequences(out, q64, k64, v64, tables, new, ctx, K, slopes, tol):
    """Each non-empty sequence's rows of `out` against the float64 reference."""
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    N = q64.shape[1]
    for b in range(len(new)):
        n, c = new[b], ctx[b]
        if n == 0:
            continue
        ref = attention_np(q64[cu[b]:cu[b + 1]], gather_sequence(k64, tables[b], c),
                           gather_sequence(v64, tables[b], c), c - n + np.arange(n),
                           contiguous_map(N, K), slopes)
        assert_close_to_scale(out[cu[b]:cu[b + 1]], ref, tol, what=f"sequence {b}")


@pytest.mark.parametrize("dtype,N,K,D,Z,alibi,new,ctx", CASES)
def test_matches_float64_reference(rng, dtype, N, K, D, Z, alibi, new, ctx):
    _check(rng, dtype, N, K, D, Z, alibi, new, ctx)


GROUPED = PagedPrefillConfig(block_q=32, keys_per_block=16, group_heads=True)


@pytest.mark.parametrize("dtype,N,K,D,Z,alibi,new,ctx", CASES + [
    (jnp.float32, 16, 2, 64, 8, True, [3, 21, 1], [30, 21, 9]),         # G = 8: 4 tokens a tile
    (jnp.bfloat16, 6, 2, 64, 16, True, [18, 2], [18, 40]),              # G = 3: one head a program
])
def test_grouped_heads_match_float64_reference(rng, dtype, N, K, D, Z, alibi, new, ctx):
    """``group_heads``: a KV head's query heads share a program (power-of-two groups)."""
    _check(rng, dtype, N, K, D, Z, alibi, new, ctx, config=GROUPED)


LOOPED = [dataclasses.replace(SMALL, tile_programs=3),
          dataclasses.replace(GROUPED, tile_programs=2)]


@pytest.mark.parametrize("config", LOOPED, ids=["per-head", "grouped"])
@pytest.mark.parametrize("dtype,N,K,D,Z,alibi,new,ctx", [CASES[0], CASES[3]])
def test_tile_programs_loop_over_every_real_tile(rng, config, dtype, N, K, D, Z, alibi, new,
                                                 ctx):
    """``tile_programs``: fewer programs than tiles, each looping over every N-th real one."""
    _check(rng, dtype, N, K, D, Z, alibi, new, ctx, config=config)


def test_random_ragged_batches(rng):
    for _ in range(2):
        B = int(rng.integers(1, 4))
        ctx = [int(c) for c in rng.integers(1, 50, size=B)]
        new = [int(rng.integers(0, c + 1)) for c in ctx]
        K = int(rng.choice([1, 2]))
        _check(rng, jnp.float32, K * int(rng.integers(1, 4)), K, 64, int(rng.choice([8, 16])),
               bool(rng.integers(2)), new, ctx)


def test_default_config_and_jnp_reference(rng):
    new, ctx, Z = [20, 7], [20, 45], 16
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(new)]), jnp.int32)
    q, _ = rand(rng, (27, 6, 64), jnp.float32)
    k, v, _, _ = random_pool(rng, 2, 10, Z, 64, jnp.float32)
    tables = jnp.asarray(random_block_tables(rng, 2, 4, 10))
    ctx = jnp.asarray(ctx, jnp.int32)
    slopes = alibi_slopes(6)
    assert_close_to_scale(
        paged_prefill_attention(q, k, v, tables, cu, ctx, alibi_slopes=slopes, interpret=INTERPRET),
        paged_prefill_attention_reference(q, k, v, tables, cu, ctx, alibi_slopes=slopes), 1e-4)


def test_traced_inputs_need_max_q_len(rng):
    q, _ = rand(rng, (4, 4, 64), jnp.float32)
    k, v, _, _ = random_pool(rng, 2, 4, 16, 64, jnp.float32)
    tables, cu, ctx = jnp.zeros((1, 2), jnp.int32), jnp.asarray([0, 4], jnp.int32), jnp.asarray([6], jnp.int32)
    with pytest.raises(ValueError, match="max_q_len must be given"):
        jax.jit(lambda c: paged_prefill_attention(q, k, v, tables, c, ctx, interpret=INTERPRET))(cu)
    out = jax.jit(lambda c: paged_prefill_attention(q, k, v, tables, c, ctx, max_q_len=4,
                                                    interpret=INTERPRET))(cu)
    assert_close_to_scale(out, paged_prefill_attention_reference(q, k, v, tables, cu, ctx), 1e-4)


@pytest.mark.parametrize("cu, ctx, match", [
    ([0, 3, 4], [5, 1], "must rise from 0 to total_tokens=5"),
    ([0, 4, 5], [3, 1], "sequence 0 has 4 new tokens but context_lens"),
    ([0, 4, 5], [40, 1], "need more pages than block_tables holds"),
    ([0, 5], [5, 1], r"cu_q_lens must have shape \[B\+1\]"),
])
def test_inconsistent_lengths(rng, cu, ctx, match):
    q, _ = rand(rng, (5, 4, 64), jnp.float32)
    k, v, _, _ = random_pool(rng, 2, 8, 16, 64, jnp.float32)
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(q, k, v, jnp.zeros((2, 2), jnp.int32), jnp.asarray(cu, jnp.int32),
                                jnp.asarray(ctx, jnp.int32), interpret=INTERPRET)


def test_tile_map_covers_every_sequence_once(rng):
    """The flattened tile axis: each sequence's tokens in block_q tiles, in order, once;
    tiles past the last are skipped (first index out of reach); the static tile count is
    enough for any split of the tokens."""
    from pallas_kernels.paged_prefill_attention import num_tiles, tile_map

    for new, bq in (([0, 5, 1, 33, 0, 16], 16), ([1] * 7, 16), ([64], 64), ([0], 16)):
        cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
        T, B = int(cu[-1]), len(new)
        n = num_tiles(max(T, 1), B, max(max(new), 1), bq)
        got = np.asarray(tile_map(jnp.asarray(cu), bq, n))
        want = [(b, f) for b, m in enumerate(new) for f in range(0, m, bq)]
        assert n >= len(want)
        assert [tuple(r) for r in got[:len(want)]] == want
        assert (got[len(want):, 1] >= max(new)).all() and (got[:, 0] < B).all()
    for _ in range(20):   # the bound holds for random splits, T not a multiple of block_q
        B, bq = int(rng.integers(1, 40)), int(rng.choice([16, 32, 64]))
        new = rng.integers(0, 200, size=B)
        need = int(sum(-(-int(m) // bq) for m in new))
        assert num_tiles(int(new.sum()), B, int(new.max()), bq) >= need


def test_engine_step_shape_traced(rng):
    """As the engine calls it in a mixed step: traced lengths, max_q_len = the padded token
    count, many one-token (decode) sequences beside a long prompt chunk, empty padding
    sequences and padding rows after the last sequence."""
    new = [1, 1, 37, 1, 0, 1, 0, 0]
    ctx = [9, 30, 50, 1, 0, 17, 0, 0]
    N, K, D, Z, T = 6, 2, 64, 8, 64
    B = len(new)
    max_pages = max(-(-c // Z) for c in ctx) + 1
    num_pages = B * max_pages + 2
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q, q64 = rand(rng, (T, N, D), jnp.float32)           # rows past cu[-1] are padding
    k, v, k64, v64 = random_pool(rng, K, num_pages, Z, D, jnp.float32)
    tables = random_block_tables(rng, B, max_pages, num_pages)
    slopes = np.asarray(alibi_slopes(N), np.float64)
    run = jax.jit(lambda *a: paged_prefill_attention(
        *a, max_q_len=T, alibi_slopes=jnp.asarray(slopes, jnp.float32), interpret=INTERPRET,
        config=SMALL))
    out = run(q, k, v, jnp.asarray(tables), jnp.asarray(cu), jnp.asarray(ctx, jnp.int32))
    out = np.asarray(out, np.float64)
    assert out.shape == (T, N, D) and not np.isnan(out[:cu[-1]]).any()
    _assert_sequences(out, q64, k64, v64, tables, new, ctx, K, slopes, TOLERANCE[jnp.float32])
