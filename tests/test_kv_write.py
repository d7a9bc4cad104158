"""pallas_kernels.kv_write against the scatter it replaces (interpret mode on a CPU, compiled
on a GPU), and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET
from pallas_kernels.kv_write import KVWriteConfig, kv_write, kv_write_reference


def _case(rng, T, K, H, S, dtype, pad):
    """Rows, slots (T - pad distinct slots in [0, S), then `pad` past the pool or negative),
    and pools, all random."""
    rows = lambda: jnp.asarray(rng.standard_normal((T, K, H)), dtype)  # noqa: E731
    real = rng.choice(S, T - pad, replace=False)
    past = [S + i if i % 2 == 0 else -1 - i for i in range(pad)]
    slots = jnp.asarray(np.concatenate([real, past]).astype(np.int32))
    pool = lambda: jnp.asarray(rng.standard_normal((K, S, H)), dtype)  # noqa: E731
    return rows(), rows(), slots, pool(), pool()


@pytest.mark.parametrize("T,K,H,S,block_t,pad,dtype", [
    (13, 3, 16, 50, 4, 3, jnp.bfloat16),       # odd T, 3 heads, padding past and below
    (1, 1, 32, 8, 16, 0, jnp.float16),         # one token
    (37, 2, 64, 300, 16, 5, jnp.float32),
    (64, 4, 16, 64, 8, 0, jnp.bfloat16),       # every slot of the pool written
])
def test_matches_the_scatter(rng, T, K, H, S, block_t, pad, dtype):
    k, v, slots, kp, vp = _case(rng, T, K, H, S, dtype, pad)
    ref_k, ref_v = (np.asarray(a) for a in kv_write_reference(k, v, slots, kp, vp))
    before_k = np.asarray(kp)
    got_k, got_v = kv_write(k, v, slots, jnp.array(kp), jnp.array(vp), interpret=INTERPRET,
                            config=KVWriteConfig(block_t=block_t))
    np.testing.assert_array_equal(np.asarray(got_k), ref_k)        # exact: rows are copied
    np.testing.assert_array_equal(np.asarray(got_v), ref_v)
    written = np.asarray(slots)[(np.asarray(slots) >= 0) & (np.asarray(slots) < S)]
    kept = np.setdiff1d(np.arange(S), written)
    np.testing.assert_array_equal(np.asarray(got_k)[:, kept], before_k[:, kept])
    assert not np.isnan(np.asarray(got_k, np.float32)).any()


@pytest.mark.parametrize("slots", [
    [-1, 0, 9, 5, -3, 2],       # padding after the token that writes slot 0, lanes past T
    [4, 7, 1, 0],               # slot 0 last, lanes past T repeat it
    [-2, 50, -1],               # nothing written
])
def test_padding_beside_slot_zero(rng, slots):
    """Lanes that do not write (padding slots, lanes past T) share a block with the token that
    writes slot 0: the written row must be the token's (in interpret mode a masked lane aimed
    at row 0 used to write the old row back over it)."""
    T, K, H, S = len(slots), 2, 16, 8
    k, v, _, kp, vp = _case(rng, T, K, H, S, jnp.bfloat16, 0)
    slots = jnp.asarray(slots, jnp.int32)
    ref_k, ref_v = (np.asarray(a) for a in kv_write_reference(k, v, slots, kp, vp))
    got_k, got_v = kv_write(k, v, slots, jnp.array(kp), jnp.array(vp), interpret=INTERPRET,
                            config=KVWriteConfig(block_t=8))
    np.testing.assert_array_equal(np.asarray(got_k), ref_k)
    np.testing.assert_array_equal(np.asarray(got_v), ref_v)


def test_no_tokens_leaves_the_pools(rng):
    k, v, slots, kp, vp = _case(rng, 0, 2, 16, 8, jnp.bfloat16, 0)
    got_k, got_v = kv_write(k, v, slots, kp, vp, interpret=INTERPRET)
    assert got_k is kp and got_v is vp


@pytest.mark.parametrize("change,match", [
    (dict(v=jnp.zeros((5, 2, 16), jnp.bfloat16)), "v_rows must have k_rows' shape"),
    (dict(kp=jnp.zeros((3, 8, 16), jnp.bfloat16)), r"k_pages must be \[K=2"),
    (dict(vp=jnp.zeros((2, 9, 16), jnp.bfloat16)), "v_pages must match k_pages"),
    (dict(slots=jnp.zeros((4,), jnp.int32)), r"slots must have shape \[T\]"),
    (dict(slots=jnp.zeros((6,), jnp.float32)), "slots"),
    (dict(k=jnp.zeros((6, 2), jnp.bfloat16)), "k_rows"),
])
def test_bad_input_is_refused_before_launch(change, match):
    args = dict(k=jnp.zeros((6, 2, 16), jnp.bfloat16), v=jnp.zeros((6, 2, 16), jnp.bfloat16),
                slots=jnp.zeros((6,), jnp.int32), kp=jnp.zeros((2, 8, 16), jnp.bfloat16),
                vp=jnp.zeros((2, 8, 16), jnp.bfloat16))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        kv_write(args["k"], args["v"], args["slots"], args["kp"], args["vp"], interpret=INTERPRET)


def test_pools_past_int32_offsets_are_refused():
    big = jax.ShapeDtypeStruct((16, 2 ** 20, 128), jnp.bfloat16)      # 2^31 elements
    rows = jax.ShapeDtypeStruct((4, 16, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="2\\^31 - 1 per pool"):
        jax.eval_shape(lambda k, v, s, kp, vp: kv_write(k, v, s, kp, vp), rows, rows,
                       jax.ShapeDtypeStruct((4,), jnp.int32), big, big)


@pytest.mark.parametrize("cfg,match", [(KVWriteConfig(block_t=6), "block_t=6"),
                                       (KVWriteConfig(num_warps=32), "num_warps=32"),
                                       (KVWriteConfig(num_stages=0), "num_stages=0")])
def test_bad_config_is_refused(cfg, match):
    z = jnp.zeros((2, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        kv_write(z, z, jnp.zeros((2,), jnp.int32), jnp.zeros((1, 4, 16), jnp.bfloat16),
                 jnp.zeros((1, 4, 16), jnp.bfloat16), interpret=INTERPRET, config=cfg)
