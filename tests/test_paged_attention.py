"""paged_attention (decode) against a float64 numpy reference; interpret mode on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checks import assert_close_to_scale
from kernel_cases import (INTERPRET, TOLERANCE, attention_np, contiguous_map, gather_sequence,
                          rand, random_block_tables, random_pool)
from pallas_kernels import alibi_slopes
from pallas_kernels.paged_attention import (SHORT_CONTEXT, PagedAttentionConfig,
                                            paged_attention, paged_attention_reference)

CASES = [
    # dtype, B, N, K, D, page, alibi, splits
    (jnp.float32, 3, 12, 4, 64, 16, True, None),     # non-power-of-two heads with ALiBi
    (jnp.bfloat16, 4, 8, 2, 128, 16, False, None),
    (jnp.float16, 2, 8, 8, 64, 8, True, 2),           # MHA (ratio 1), small pages, split-K
    (jnp.bfloat16, 2, 8, 1, 64, 32, True, 4),         # MQA (ratio N)
    (jnp.float32, 2, 6, 3, 128, 64, False, 2),
]


def _check(rng, dtype, B, N, K, D, Z, alibi, splits, lengths=None, prefetch="none",
           garbage_tail=False, keys_per_block=64, replicate_queries=False):
    max_pages = 5
    num_pages = B * max_pages + 3
    q, q64 = rand(rng, (B, N, D), dtype)
    k, v, k64, v64 = random_pool(rng, K, num_pages, Z, D, dtype)
    tables = random_block_tables(rng, B, max_pages, num_pages)
    if lengths is None:
        # lengths 0, 1, a page-multiple, and random non-multiples
        lengths = rng.integers(2, max_pages * Z + 1, size=B)
        lengths[0], lengths[-1] = 0, 1
        if B > 2:
            lengths[1] = 2 * Z
    lengths = np.asarray(lengths, np.int32)
    slopes = np.asarray(alibi_slopes(N), np.float64) if alibi else None
    kernel_tables = tables.copy()
    if garbage_tail:  # entries past each sequence's last page must never be read
        for b, L in enumerate(lengths):
            kernel_tables[b, -(-int(L) // Z):] = rng.choice([-7, num_pages, 10**6])
    config = PagedAttentionConfig(num_splits=splits, prefetch=prefetch,
                                  keys_per_block=keys_per_block,
                                  replicate_queries=replicate_queries)
    out = paged_attention(q, k, v, jnp.asarray(kernel_tables), jnp.asarray(lengths),
                          alibi_slopes=None if slopes is None else jnp.asarray(slopes, jnp.float32),
                          interpret=INTERPRET, config=config)
    assert out.shape == (B, N, D) and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32), np.float64)
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            assert np.all(out[b] == 0), "length 0 must give a zero row"
            continue
        ref = attention_np(q64[b][None], gather_sequence(k64, tables[b], L),
                           gather_sequence(v64, tables[b], L), [L - 1], contiguous_map(N, K),
                           slopes)[0]
        assert_close_to_scale(out[b], ref, TOLERANCE[dtype], what=f"sequence {b} (length {L})")


@pytest.mark.parametrize("dtype,B,N,K,D,Z,alibi,splits", CASES)
def test_matches_float64_reference(rng, dtype, B, N, K, D, Z, alibi, splits):
    _check(rng, dtype, B, N, K, D, Z, alibi, splits)


@pytest.mark.parametrize("prefetch", ["none", "tables", "tiles"])
def test_prefetch_modes_ignore_table_tail(rng, prefetch):
    # several blocks per split (16-key blocks over 8-key pages), so the read-ahead crosses blocks
    _check(rng, jnp.float32, 3, 6, 2, 64, 8, True, 2, prefetch=prefetch, garbage_tail=True,
           keys_per_block=16)


@pytest.mark.parametrize("dtype,B,N,K,D,Z,alibi,splits", CASES + [
    (jnp.bfloat16, 3, 28, 4, 64, 16, False, 1),     # groups of 7 (28/4), one split
    (jnp.float32, 2, 40, 8, 64, 8, True, 2),        # groups of 5 (40/8), ALiBi, split K
    (jnp.float16, 3, 12, 4, 128, 16, True, 1),      # groups of 3 (12/4)
    (jnp.float32, 2, 20, 1, 64, 16, False, 1),      # one group of 20: a 32-row tile
])
def test_replicated_queries_match(rng, dtype, B, N, K, D, Z, alibi, splits):
    # groups of 1, 4 and 8 are repeated in registers; groups of 3, 5, 7 and 20 are read as
    # masked rows of the whole query row (the last group's tile runs past N)
    _check(rng, dtype, B, N, K, D, Z, alibi, splits, replicate_queries=True)


def test_random_shapes(rng):
    for _ in range(3):
        K = int(rng.choice([1, 2, 3]))
        N = K * int(rng.choice([1, 2, 3, 4, 5]))
        _check(rng, jnp.float32, int(rng.integers(1, 4)), N, K, int(rng.choice([64, 128])),
               int(rng.choice([8, 16, 32])), bool(rng.integers(2)),
               [None, 1, 2][int(rng.integers(3))])


def test_jnp_reference_agrees(rng):
    B, N, K, D, Z = 3, 8, 2, 64, 16
    q, _ = rand(rng, (B, N, D), jnp.float32)
    k, v, _, _ = random_pool(rng, K, 20, Z, D, jnp.float32)
    tables = jnp.asarray(random_block_tables(rng, B, 4, 20))
    lengths = jnp.asarray([0, 17, 64], jnp.int32)
    slopes = alibi_slopes(N)
    assert_close_to_scale(
        paged_attention(q, k, v, tables, lengths, alibi_slopes=slopes, interpret=INTERPRET),
        paged_attention_reference(q, k, v, tables, lengths, alibi_slopes=slopes), 1e-4)


@pytest.fixture
def inputs(rng):
    q, _ = rand(rng, (2, 8, 64), jnp.float32)
    k, v, _, _ = random_pool(rng, 2, 8, 16, 64, jnp.float32)
    return q, k, v, jnp.zeros((2, 4), jnp.int32), jnp.asarray([3, 5], jnp.int32)


@pytest.mark.parametrize("mutate, match", [
    (lambda q, k, v, t, l: (q[:, :5], k, v, t, l), r"query heads \(5\) must be a multiple"),
    (lambda q, k, v, t, l: (q[:, :7], k[:1], v[:1], t, l), None),  # 7 heads over 1 KV head is fine
    (lambda q, k, v, t, l: (q[0], k, v, t, l), "q must have rank 3"),
    (lambda q, k, v, t, l: (q, k[0], v[0], t, l), "k_pages must have rank 4"),
    (lambda q, k, v, t, l: (q.astype(jnp.bfloat16), k, v, t, l), "must share one dtype"),
    (lambda q, k, v, t, l: (q.astype(jnp.int32), k, v, t, l), "q must be float32, bfloat16"),
    (lambda q, k, v, t, l: (q, k, v, t.astype(jnp.float32), l), "block_tables must be int32"),
    (lambda q, k, v, t, l: (q, k, v, t, jnp.asarray([3, 65], jnp.int32)),
     "need more pages than block_tables holds"),
    (lambda q, k, v, t, l: (q, k, v, t, jnp.asarray([-1, 2], jnp.int32)), "lengths must be >= 0"),
    (lambda q, k, v, t, l: (q, k, v, t[:1], l), "must have batch size 2"),
    (lambda q, k, v, t, l: (q[..., :48], k[..., :48], v[..., :48], t, l), "head_dim=48"),
    (lambda q, k, v, t, l: (q, k[:, :, :12], v[:, :, :12], t, l), "page_size=12"),
])
def test_invalid_inputs_raise_before_launch(inputs, mutate, match):
    args = mutate(*inputs)
    if match is None:
        paged_attention(*args, interpret=INTERPRET)
        return
    with pytest.raises(ValueError, match=match):
        paged_attention(*args, interpret=INTERPRET)


def test_bad_slopes_and_config(inputs):
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[num_q_heads\]"):
        paged_attention(*inputs, alibi_slopes=jnp.ones(3), interpret=INTERPRET)
    with pytest.raises(ValueError, match="keys_per_block=48 must be a power of two"):
        paged_attention(*inputs, config=PagedAttentionConfig(keys_per_block=48), interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"num_warps=32 must be in \[1, 16\]"):
        paged_attention(*inputs, config=PagedAttentionConfig(num_warps=32), interpret=INTERPRET)
    with pytest.raises(ValueError, match="prefetch='all' must be one of"):
        paged_attention(*inputs, config=PagedAttentionConfig(prefetch="all"), interpret=INTERPRET)


@pytest.mark.parametrize("replicate", [False, True])
@pytest.mark.parametrize("N", [16, 28])
def test_replicated_queries_drop_the_pad_and_slice(replicate, N):
    # What the knob is for: with groups of 4 (repeated in registers) or 7 (masked rows) the
    # lowered program pads q and slices the output around the kernel only when the knob is off.
    import jax
    from jax import export

    S = jax.ShapeDtypeStruct
    args = (S((4, N, 128), jnp.bfloat16), S((4, 64, 16, 128), jnp.bfloat16),
            S((4, 64, 16, 128), jnp.bfloat16), S((4, 16), jnp.int32), S((4,), jnp.int32))
    cfg = PagedAttentionConfig(replicate_queries=replicate, num_splits=1)
    text = export.export(
        jax.jit(lambda *a: paged_attention(*a, config=cfg)), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args).mlir_module()
    assert ("stablehlo.pad" in text) != replicate
    assert ("stablehlo.slice" in text) != replicate


def test_cuda_defaults_pick_key_blocks_by_group_size():
    """CUDA defaults without ALiBi: masked query rows with 64-key blocks for groups that are not
    powers of two (measured faster on the H200 for 28/4, 40/8 and 12/4), 32-key blocks with
    replicated rows for powers of two; ALiBi takes the same tiles for groups of 2 and more (with
    the block table read ahead for groups that are not powers of two), and padded queries for
    MHA or an unknown group; ROCm ignores the group."""
    PC = PagedAttentionConfig
    for g in (3, 5, 7, 20):
        cfg = PC.for_backend("cuda", group_size=g)
        assert (cfg.keys_per_block, cfg.replicate_queries) == (64, True), g
    for g in (None, 1, 4, 8):
        cfg = PC.for_backend("cuda", group_size=g)
        assert (cfg.keys_per_block, cfg.replicate_queries) == (32, True), g
    assert not PC.for_backend("cuda", alibi=True).replicate_queries
    assert not PC.for_backend("cuda", alibi=True, group_size=1).replicate_queries  # MHA
    for g in (2, 4, 8, 32):
        assert PC.for_backend("cuda", alibi=True, group_size=g) == PC.for_backend(
            "cuda", group_size=g), g
    for g in (3, 5, 7, 20):     # ... and for other groups the block table read one block ahead
        assert PC.for_backend("cuda", alibi=True, group_size=g) == dataclasses.replace(
            PC.for_backend("cuda", group_size=g), prefetch="tables"), g
    assert PC.for_backend("rocm", group_size=7) == PC.for_backend("rocm")
    # short block tables (a static bound on the contexts): other groups take 32-key blocks on
    # 2 warps with the table read ahead without ALiBi; longer ones, and ALiBi, keep the above
    short = PC(keys_per_block=32, num_warps=2, replicate_queries=True, prefetch="tables")
    for g in (3, 7):
        for ctx in (1, SHORT_CONTEXT):
            assert PC.for_backend("cuda", False, g, max_context=ctx) == short, (g, ctx)
            assert PC.for_backend("cuda", True, g, max_context=ctx) == PC.for_backend(
                "cuda", True, g), (g, ctx)
        assert PC.for_backend("cuda", False, g, SHORT_CONTEXT + 1) == PC.for_backend(
            "cuda", False, g), g
    for g in (1, 4, 8, None):
        for alibi in (False, True):
            assert PC.for_backend("cuda", alibi, g, 512) == PC.for_backend("cuda", alibi, g)
    assert PC.for_backend("rocm", group_size=7, max_context=512) == PC.for_backend("rocm")


def test_default_config_reads_the_table_capacity(monkeypatch):
    """paged_attention's default config is asked with the block table's capacity (pages x page
    size) as the context bound."""
    seen = []
    original = PagedAttentionConfig.for_backend.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("max_context"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PagedAttentionConfig, "for_backend", classmethod(spy))
    q = jnp.ones((1, 7, 64), jnp.float32)
    pages = jnp.ones((1, 4, 16, 64), jnp.float32)
    jax.eval_shape(lambda q, k, v, t, n: paged_attention(q, k, v, t, n, interpret=True),
                   q, pages, pages, jnp.zeros((1, 3), jnp.int32), jnp.ones((1,), jnp.int32))
    assert seen == [48]
