"""pallas_kernels.rope_kv_write against a float64 rotation and the model's own rotation and
scatter (interpret mode on a CPU, compiled on a GPU), and its errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET, TOLERANCE
from optgqa_jax.rope import apply_rope, rope_inv_freq
from pallas_kernels.rope_kv_write import (RopeKVWriteConfig, inv_freq, rope_kv_write,
                                          rope_kv_write_reference)

THETA = 10000.0


def _case(rng, T, N, K, H, S, dtype, pad, max_pos=4096):
    """qkv rows, positions, slots (T - pad distinct slots in [0, S), then `pad` past the pool or
    negative) and pools, all random."""
    qkv = jnp.asarray(rng.standard_normal((T, (N + 2 * K) * H)), dtype)
    pos = jnp.asarray(rng.integers(0, max_pos, T).astype(np.int32))
    real = rng.choice(S, T - pad, replace=False)
    past = [S + i if i % 2 == 0 else -1 - i for i in range(pad)]
    slots = jnp.asarray(np.concatenate([real, past]).astype(np.int32))
    pool = lambda: jnp.asarray(rng.standard_normal((K, S, H)), dtype)  # noqa: E731
    return qkv, pos, slots, pool(), pool()


def _rotate64(x, pos, H):
    """float64 [T, heads, H] rotation (Hugging Face's half-split RoPE). The angles are the
    model's float32 products ``position * theta^(-2i/H)`` (at positions in the
    thousands their float32 rounding moves a rotation by ~1e-4, more than float32's tolerance);
    cos, sin and the rotation are float64."""
    freq = np.asarray(rope_inv_freq(H, THETA))                 # the model's float32 frequencies
    ang = (pos.astype(np.float32)[:, None, None] * freq).astype(np.float64)   # [T, 1, H/2]
    x1, x2 = x[..., :H // 2], x[..., H // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


@pytest.mark.parametrize("T,N,K,H,S,block_t,pad,dtype", [
    (13, 6, 3, 16, 50, 4, 3, jnp.bfloat16),      # odd T, 6/3 heads, padding past and below
    (1, 1, 1, 32, 8, 16, 0, jnp.float16),        # one token, one head each
    (37, 7, 1, 64, 300, 16, 5, jnp.float32),     # 7 query heads over 1 KV head
    (64, 4, 2, 16, 64, 8, 0, jnp.bfloat16),      # every slot of the pool written
])
def test_matches_float64_and_the_model(rng, T, N, K, H, S, block_t, pad, dtype):
    qkv, pos, slots, kp, vp = _case(rng, T, N, K, H, S, dtype, pad)
    ref_q, ref_k, ref_v = (np.asarray(a.astype(jnp.float32))
                           for a in rope_kv_write_reference(qkv, pos, slots, kp, vp,
                                                            n_heads=N, theta=THETA))
    before_k, before_v = np.asarray(kp), np.asarray(vp)
    q, k, v = rope_kv_write(qkv, pos, slots, jnp.array(kp), jnp.array(vp), n_heads=N,
                            theta=THETA, interpret=INTERPRET,
                            config=RopeKVWriteConfig(block_t=block_t))
    q, k, v = (np.asarray(a.astype(jnp.float32)) for a in (q, k, v))
    assert q.shape == (T, N, H) and not np.isnan(q).any() and not np.isnan(k).any()
    # against float64: one rounding of the rotated rows to the dtype
    x64 = np.asarray(qkv.astype(jnp.float32), np.float64).reshape(T, N + 2 * K, H)
    p64 = np.asarray(pos)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(q, _rotate64(x64[:, :N], p64, H), rtol=tol, atol=tol)
    ok = (np.asarray(slots) >= 0) & (np.asarray(slots) < S)
    written = np.asarray(slots)[ok]
    want_k = _rotate64(x64[:, N:N + K], p64, H)[ok]                       # [T', K, H]
    np.testing.assert_allclose(k[:, written], np.moveaxis(want_k, 1, 0), rtol=tol, atol=tol)
    np.testing.assert_array_equal(v[:, written], np.moveaxis(x64[ok, N + K:], 1, 0))
    # against the model's rotation and the engine's scatter: equal up to one unit in the last
    # place of the dtype (exact in interpret mode; a GPU's cos/sin may round differently)
    ulp = float(jnp.finfo(dtype).eps)
    for got, want in ((q, ref_q), (k, ref_k), (v, ref_v)):
        np.testing.assert_allclose(got, want, rtol=2 * ulp, atol=2 * ulp)
    # rows not written stay as they were
    kept = np.setdiff1d(np.arange(S), written)
    np.testing.assert_array_equal(k[:, kept], before_k[:, kept].astype(np.float32))
    np.testing.assert_array_equal(v[:, kept], before_v[:, kept].astype(np.float32))


def test_reference_rotates_as_the_model(rng):
    T, N, K, H = 9, 4, 2, 32
    qkv, pos, slots, kp, vp = _case(rng, T, N, K, H, 16, jnp.float32, 0)
    q, k, _ = rope_kv_write_reference(qkv, pos, slots, kp, vp, n_heads=N, theta=THETA)
    heads = qkv.reshape(1, T, N + 2 * K, H)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(
        apply_rope(heads[:, :, :N], pos[None], THETA)[0]))
    want_k = np.asarray(apply_rope(heads[:, :, N:N + K], pos[None], THETA)[0])
    np.testing.assert_array_equal(np.asarray(k)[:, np.asarray(slots)], np.moveaxis(want_k, 1, 0))
    np.testing.assert_array_equal(np.asarray(inv_freq(H, 500000.0)),
                                  np.asarray(rope_inv_freq(H, 500000.0)))


@pytest.mark.parametrize("slots", [
    [-1, 0, 9, 5, -3, 2],       # padding after the token that writes slot 0, lanes past T
    [4, 7, 1, 0],               # slot 0 last, lanes past T repeat it
    [-2, 50, -1],               # nothing written
])
def test_padding_beside_slot_zero(rng, slots):
    """Lanes that do not write (padding slots, lanes past T) share a block with the token that
    writes slot 0 (and with token 0's query rows): the written rows must be the tokens' (in
    interpret mode a masked lane aimed at row 0 used to write the old row back over it)."""
    T, N, K, H, S = len(slots), 3, 2, 16, 8
    qkv, pos, _, kp, vp = _case(rng, T, N, K, H, S, jnp.bfloat16, 0)
    slots = jnp.asarray(slots, jnp.int32)
    want = rope_kv_write_reference(qkv, pos, slots, kp, vp, n_heads=N, theta=THETA)
    got = rope_kv_write(qkv, pos, slots, jnp.array(kp), jnp.array(vp), n_heads=N, theta=THETA,
                        interpret=INTERPRET, config=RopeKVWriteConfig(block_t=8))
    ulp = float(jnp.finfo(jnp.bfloat16).eps)   # a GPU's cos/sin may round differently
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=2 * ulp, atol=2 * ulp)


def test_no_tokens(rng):
    qkv, pos, slots, kp, vp = _case(rng, 0, 2, 1, 16, 8, jnp.bfloat16, 0)
    q, got_k, got_v = rope_kv_write(qkv, pos, slots, kp, vp, n_heads=2, theta=THETA,
                                    interpret=INTERPRET)
    assert q.shape == (0, 2, 16) and got_k is kp and got_v is vp


@pytest.mark.parametrize("change,match", [
    (dict(qkv=jnp.zeros((6, 7 * 16), jnp.bfloat16)), r"qkv must be \[T, \(N \+ 2K\) H\]"),
    (dict(qkv=jnp.zeros((6, 4, 16), jnp.bfloat16)), "qkv"),
    (dict(vp=jnp.zeros((2, 9, 16), jnp.bfloat16)), "v_pages must match k_pages"),
    (dict(slots=jnp.zeros((4,), jnp.int32)), r"slots must have shape \[T\]"),
    (dict(pos=jnp.zeros((6,), jnp.float32)), "positions"),
    (dict(n=0), "n_heads must be an int >= 1"),
    (dict(kp=jnp.zeros((2, 8, 12), jnp.bfloat16), vp=jnp.zeros((2, 8, 12), jnp.bfloat16),
          qkv=jnp.zeros((6, 8 * 12), jnp.bfloat16)), "head dim H=12"),
])
def test_bad_input_is_refused_before_launch(change, match):
    args = dict(qkv=jnp.zeros((6, 8 * 16), jnp.bfloat16), pos=jnp.zeros((6,), jnp.int32),
                slots=jnp.zeros((6,), jnp.int32), kp=jnp.zeros((2, 8, 16), jnp.bfloat16),
                vp=jnp.zeros((2, 8, 16), jnp.bfloat16), n=4)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        rope_kv_write(args["qkv"], args["pos"], args["slots"], args["kp"], args["vp"],
                      n_heads=args["n"], theta=THETA, interpret=INTERPRET)


@pytest.mark.parametrize("cfg,match", [(RopeKVWriteConfig(block_t=6), "block_t=6"),
                                       (RopeKVWriteConfig(num_warps=32), "num_warps=32"),
                                       (RopeKVWriteConfig(num_stages=0), "num_stages=0")])
def test_bad_config_is_refused(cfg, match):
    z = jnp.zeros((2, 4 * 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        rope_kv_write(z, jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32),
                      jnp.zeros((1, 4, 16), jnp.bfloat16), jnp.zeros((1, 4, 16), jnp.bfloat16),
                      n_heads=2, theta=THETA, interpret=INTERPRET, config=cfg)
