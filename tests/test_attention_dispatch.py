"""The model on the Pallas kernels matches the model on the jnp reference.

On CPU the kernels run in interpret mode; on a GPU the same tests run them compiled.
"""

import jax
import numpy as np
import pytest

import optgqa_jax as og
from checks import assert_close_to_scale

MODELS = {
    "gqa-rope": ("tiny", {}),
    "alibi-6-over-2": ("tiny-alibi", {}),
    "mqa": ("tiny", dict(n_kv_heads=1)),
    "permuted-equal-groups": ("tiny", dict(n_heads=6, n_kv_heads=3,
                                            kv_head_map=[[2, 0, 1, 0, 2, 1], [0, 1, 2, 0, 1, 2]])),
    "unequal-groups": ("tiny", dict(n_heads=6, n_kv_heads=3,
                                    kv_head_map=[[2, 0, 2, 1, 0, 2], [0, 0, 0, 0, 1, 2]])),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    preset, changes = MODELS[request.param]
    cfg = og.ModelConfig.preset(preset, **changes)
    return cfg, og.init_params(cfg, jax.random.PRNGKey(11))


def test_forward_pallas_matches_reference(model, rng):
    cfg, params = model
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 21))
    ref = og.forward(cfg, params, tokens, attention_impl="reference")
    out = og.forward(cfg, params, tokens, attention_impl="pallas")
    assert_close_to_scale(out, ref, 1e-4)


def test_generation_pallas_matches_reference(model, rng):
    cfg, params = model
    prompts = [list(rng.integers(0, cfg.vocab_size, size=n)) for n in (3, 17)]
    ref = og.generate_simple(cfg, params, prompts, 6, attention_impl="reference")
    assert og.generate_simple(cfg, params, prompts, 6, attention_impl="pallas") == ref


def test_cached_logits_pallas_matches_reference(model, rng):
    cfg, params = model
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 7))
    outs = {}
    for impl in ("reference", "pallas"):
        cache = og.KVCache.zeros(cfg, 2, 32)
        pre, cache = og.forward_with_cache(cfg, params, tokens[:, :6], cache, np.zeros(2, np.int32),
                                           attention_impl=impl)
        step, _ = og.forward_with_cache(cfg, params, tokens[:, 6:], cache, np.full(2, 6, np.int32),
                                        attention_impl=impl)
        outs[impl] = np.concatenate([np.asarray(pre), np.asarray(step)], axis=1)
    assert_close_to_scale(outs["pallas"], outs["reference"], 1e-4)


def test_unequal_groups_run_on_the_kernels_padded(rng):
    """Groups of sizes 3, 1 (layer 0) and 1, 3 (layer 1): the kernels see two groups of 3,
    the short one padded with copies whose outputs are dropped; ALiBi slopes follow."""
    for preset, kv_map in (("tiny", [[0, 0, 0, 1], [0, 1, 1, 1]]),
                           ("tiny-alibi", [[1, 0, 0, 0, 1, 0], [0, 1, 1, 0, 1, 1]])):
        cfg = og.ModelConfig.preset(preset, kv_head_map=kv_map)
        params = og.init_params(cfg, jax.random.PRNGKey(0))
        tokens = rng.integers(0, cfg.vocab_size, size=(2, 9))
        ref = og.forward(cfg, params, tokens, attention_impl="reference")
        assert_close_to_scale(og.forward(cfg, params, tokens, attention_impl="pallas"), ref, 1e-4)
        prompts = [list(rng.integers(0, cfg.vocab_size, size=n)) for n in (2, 11)]
        assert (og.generate_simple(cfg, params, prompts, 4, attention_impl="pallas")
                == og.generate_simple(cfg, params, prompts, 4, attention_impl="reference"))


def test_group_layout():
    from optgqa_jax.attention import _group_layout

    assert _group_layout(None, 4, 2) is None
    assert _group_layout((0, 0, 1, 1), 4, 2) is None
    slots, where = _group_layout((1, 0, 1, 1, 0), 5, 2)  # sizes 2, 3 -> G = 3
    assert slots.tolist() == [1, 4, 1, 0, 2, 3]
    assert where.tolist() == [3, 0, 4, 5, 1]
    slots, where = _group_layout((1, 0, 0, 1), 4, 2)  # equal: a permutation
    assert slots.tolist() == [1, 2, 0, 3] and where.tolist() == [2, 0, 1, 3]


def test_unknown_impl():
    cfg = og.ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        og.forward(cfg, og.init_params(cfg, jax.random.PRNGKey(0)), [[1]], attention_impl="cuda")


@pytest.mark.parametrize("name", ["gqa-rope", "alibi-6-over-2", "unequal-groups"])
def test_mixed_step_splits_decode_rows(rng, name):
    """A mixed serving step on the kernels (decode rows through paged_attention, prompt
    chunks through paged_prefill_attention) equals the jnp reference on every real row:
    one-token sequences beside chunks, an empty padding sequence, padding rows, traced
    lengths with max_q_len = the padded token count, as the engine runs it."""
    import jax.numpy as jnp

    from optgqa_jax.attention import paged_batch_attention
    from optgqa_jax.kv_layers import PagedBatch

    preset, changes = MODELS[name]
    cfg = og.ModelConfig.preset(preset, **changes)
    N, K, H, Z, T = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 8, 32
    new, ctx = [1, 9, 1, 0, 1, 3, 1], [5, 20, 1, 0, 33, 3, 2]
    B, M = len(new), 6
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    tables = rng.permutation(B * M).reshape(B, M).astype(np.int32)
    seq = np.repeat(np.arange(B), new).astype(np.int32)
    pos = np.concatenate([np.arange(c - n, c) for n, c in zip(new, ctx)]).astype(np.int32)
    pad = T - len(seq)
    token_seq, q_pos = np.pad(seq, (0, pad)), np.pad(pos, (0, pad))
    q = jnp.asarray(rng.standard_normal((T, N, H)), jnp.float32)
    kp = jnp.asarray(rng.standard_normal((K, B * M, Z, H)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((K, B * M, Z, H)), jnp.float32)
    kv_map = None if cfg.kv_head_map is None else cfg.kv_head_map[0]
    slopes = (jnp.asarray(og.alibi_slopes(N), jnp.float32) if cfg.position == "alibi"
              else None)

    def attend(q, kp, vp, tables, ctx, cu, token_seq, q_pos, impl):
        batch = PagedBatch(slot_mapping=jnp.zeros((T,), jnp.int32), token_seq=token_seq,
                           block_tables=tables, context_lens=ctx, cu_q_lens=cu, max_q_len=T,
                           decode_only=False)
        return paged_batch_attention(q, kp, vp, batch, q_pos, kv_head_map=kv_map,
                                     alibi_slopes=slopes, impl=impl)

    args = (q, kp, vp, jnp.asarray(tables), jnp.asarray(ctx, jnp.int32), jnp.asarray(cu),
            jnp.asarray(token_seq), jnp.asarray(q_pos))
    got = jax.jit(lambda *a: attend(*a, impl="pallas"))(*args)
    ref = attend(*args, impl="reference")
    real = int(cu[-1])
    assert not np.isnan(np.asarray(got[:real])).any()
    assert_close_to_scale(got[:real], ref[:real], 1e-4)
