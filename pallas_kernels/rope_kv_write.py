"""Rotate a step's queries and keys and write its K/V rows into the paged pool (Pallas, Triton).

Between the fused q/k/v projection and attention, an engine step on a RoPE model runs
several small XLA ops per layer: the rotation of the queries, the rotation of the keys, and
the two scatters that store the keys and values at their pool slots. At decode sizes each is
a few microseconds of launch and latency for well under a megabyte of data. This kernel does
all of it in one launch per layer, straight from the projection's output: program ``(i, j)``
takes tokens ``[i Bt, (i + 1) Bt)`` and head ``j`` of the ``N + 2K`` heads of ``qkv``
(query heads, then key heads, then value heads), loads its ``[Bt, H]`` rows as two halves,
rotates query and key heads (Hugging Face's half-split convention, as
:func:`optgqa_jax.rope.apply_rope`: ``[x1 cos - x2 sin, x2 cos + x1 sin]`` with angle
``position * inv_freq[i]``, in float32) and stores query heads to the output ``q`` and key
and value heads at ``pages[k, slots[t], :]``. The cosines and sines come in as float32
tables ``[T, H/2]`` (:func:`rotation_tables`) that XLA computes as the model does; every
layer's call asks for the same tables, and XLA computes them once per step. The pools are aliased to the outputs
(``input_output_aliases``), so only the written rows move; under ``jax.jit`` with the pools
donated, as the engine's step donates them, XLA updates them in place. Slots outside
``[0, S)`` (the engine's padding tokens) are not written, as the scatter's ``mode="drop"``:
the lanes of key and value heads that hold such tokens repeat the write of the block's first
token that writes (``_common.redirect_idle_lanes``), and lanes past T repeat token T - 1, so
that no masked lane aims at a written row (Pallas' interpret mode emulates a masked store by
writing the old value back).

Measured on an H100 (commit 2ecf242, ``experiments/results/h100/rope_kv_write_2ecf242/``,
Llama-3-8B shape), when the kernel still computed its cosines and sines itself (for every
head: about 60 instructions per element, most of the kernel's work): 6.8 µs per layer in a 482-sequence decode step against 7.5 µs for XLA's
rotation and two scatters (the decode step 21.88-21.91 against 21.95 ms), 47 µs at 4,096
tokens against 38.5. With ``pallas_kernels.add_rms_norm`` as well the 1000 x 256/256 engine
run was 1.3-1.6% faster (``experiments/results/h100/engine_add_norm_ce1ed36/``;
at commit 0878888 1.3-1.7%, and 1.0-2.2% on random lengths
(``experiments/results/h100/engine_small_op_defaults_0878888/``), so
``EngineConfig.rope_kv_write`` is on by default with one device).

Axis legend: T tokens of the step, N query heads, K KV heads, H head dim, S = P Z pool slots
(P pages of Z tokens), Bt tokens per program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common as C


@dataclasses.dataclass(frozen=True)
class RopeKVWriteConfig(C.RowBlockConfig):
    """Tuning knobs of :func:`rope_kv_write` (``block_t`` tokens per program; see
    ``_common.RowBlockConfig``)."""


def _make_kernel(*, T: int, N: int, K: int, H: int, S: int, block_t: int):
    h2 = H // 2

    def kernel(qkv_ref, cos_ref, sin_ref, slots_ref, kp_in, vp_in, q_ref, kp_ref, vp_ref):
        del kp_in, vp_in        # aliased to kp_ref, vp_ref: the rows not written stay as they are
        j = pl.program_id(1)                                   # head of qkv: q, then k, then v
        t = pl.program_id(0) * block_t + jnp.arange(block_t)   # [Bt] tokens
        t = jnp.minimum(t, T - 1)        # lanes past T repeat token T - 1 (the same writes)
        slot = plgpu.load(slots_ref.at[t])                                   # [Bt]
        s_ok = (slot >= 0) & (slot < S)
        # key and value heads read the rows they write: lanes of tokens that are not written
        # repeat the block's first written token (no masked lane aims at a written row)
        src, dst, write = C.redirect_idle_lanes(s_ok, t, slot)
        is_q = j < N
        shape = (block_t, h2)
        rows = jnp.broadcast_to(jnp.where(is_q, t, src)[:, None], shape)    # [Bt, H/2]
        cols = jnp.broadcast_to(jnp.arange(h2)[None, :], shape)
        x1 = plgpu.load(qkv_ref.at[rows, j * H + cols])                       # [Bt, H/2]
        x2 = plgpu.load(qkv_ref.at[rows, j * H + h2 + cols])
        # the rotation, for query and key heads (value heads keep x1, x2)
        cos = plgpu.load(cos_ref.at[rows, cols])                              # [Bt, H/2] f32
        sin = plgpu.load(sin_ref.at[rows, cols])
        a, b = x1.astype(jnp.float32), x2.astype(jnp.float32)
        rot = j < N + K
        y1 = jnp.where(rot, a * cos - b * sin, a)
        y2 = jnp.where(rot, b * cos + a * sin, b)
        # query heads: q[t, j, :]
        qj = jnp.minimum(j, N - 1)
        q_ok = jnp.broadcast_to(is_q, shape)
        plgpu.store(q_ref.at[rows, qj * H + cols], y1.astype(q_ref.dtype), mask=q_ok)
        plgpu.store(q_ref.at[rows, qj * H + h2 + cols], y2.astype(q_ref.dtype), mask=q_ok)
        # key and value heads: pages[k, slots[t], :]
        dst = jnp.broadcast_to(dst[:, None], shape)
        kv = jnp.clip(j - N, 0, 2 * K - 1)
        kk = jnp.where(kv < K, kv, kv - K)                                   # KV head
        for dst_ref, mine in ((kp_ref, (j >= N) & (j < N + K)), (vp_ref, j >= N + K)):
            ok = jnp.broadcast_to(write & mine, shape)
            plgpu.store(dst_ref.at[kk, dst, cols], y1.astype(dst_ref.dtype), mask=ok)
            plgpu.store(dst_ref.at[kk, dst, h2 + cols], y2.astype(dst_ref.dtype), mask=ok)

    return kernel


@functools.partial(jax.jit, static_argnames=("n_heads", "interpret", "config"),
                   donate_argnums=(4, 5))
def _rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages, *, n_heads: int,
                   interpret: bool, config: RopeKVWriteConfig):
    T = qkv.shape[0]
    K, S, H = k_pages.shape
    N = n_heads
    block_t = int(min(config.block_t, C.next_power_of_two(T)))
    args = (qkv, cos, sin, slots, k_pages, v_pages)
    q_shape = jax.ShapeDtypeStruct((T, N * H), qkv.dtype)
    q, k_pages, v_pages = pl.pallas_call(
        _make_kernel(T=T, N=N, K=K, H=H, S=S, block_t=block_t),
        grid=(C.cdiv(T, block_t), N + 2 * K),
        in_specs=[C.whole_block(a) for a in args],
        out_specs=[C.whole_block(q_shape), C.whole_block(k_pages), C.whole_block(v_pages)],
        out_shape=[q_shape, jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={4: 1, 5: 2},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name="optgqa_rope_kv_write",
    )(*args)
    return q.reshape(T, N, H), k_pages, v_pages


def inv_freq(head_dim: int, theta: float) -> jax.Array:
    """float32 [H/2] ``theta^(-2i/H)``: the rotation's frequencies, computed as the model's
    ``optgqa_jax.rope.rope_inv_freq`` computes them (the same values, bit for bit)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rotation_tables(positions, head_dim: int, theta: float):
    """float32 (cos, sin) [T, H/2] of the angles ``position * inv_freq``, computed by XLA as
    the model computes them (one table per step: every layer's call computes the same one, and
    XLA keeps one copy)."""
    angle = positions.astype(jnp.float32)[:, None] * inv_freq(head_dim, theta)  # [T, H/2]
    return jnp.cos(angle), jnp.sin(angle)


def _rotate(x, positions, theta: float):
    """x [T, heads, H] rotated by ``positions`` [T] in float32, as the model rotates (the
    reference's rotation)."""
    cos, sin = rotation_tables(positions, x.shape[-1], theta)
    cos, sin = cos[:, None], sin[:, None]                                   # [T, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def check_rope_kv_write_inputs(qkv, positions, slots, k_pages, v_pages, n_heads) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a valid call."""
    C.check_rank("qkv", qkv, 2, "[T, (N + 2K) H]")
    C.check_rank("k_pages", k_pages, 3, "[K, S, H]")
    C.check_float("qkv", qkv)
    C.check_float("k_pages", k_pages)
    T = qkv.shape[0]
    K, _, H = k_pages.shape
    if not (isinstance(n_heads, int) and n_heads >= 1):
        raise ValueError(f"n_heads must be an int >= 1, got {n_heads!r}")
    if qkv.shape[1] != (n_heads + 2 * K) * H:
        raise ValueError(f"qkv must be [T, (N + 2K) H] = [T, {(n_heads + 2 * K) * H}] for "
                         f"n_heads={n_heads} and k_pages' K={K}, H={H}; got {tuple(qkv.shape)}")
    if tuple(v_pages.shape) != tuple(k_pages.shape) or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages must match k_pages ({tuple(k_pages.shape)} {k_pages.dtype}), "
                         f"got {tuple(v_pages.shape)} {v_pages.dtype}")
    for name, a in (("positions", positions), ("slots", slots)):
        C.check_int32(name, a)
        if tuple(a.shape) != (T,):
            raise ValueError(f"{name} must have shape [T]=({T},), got {tuple(a.shape)}")
    if not (C.is_power_of_two(H) and H >= 2):
        raise ValueError(f"head dim H={H} must be a power of two >= 2")
    if k_pages.size >= 2 ** 31 or T * n_heads * H >= 2 ** 31:   # int32 element offsets
        raise ValueError(f"k_pages has {k_pages.size:,} elements; the kernel addresses at most "
                         f"2^31 - 1 per pool (split the pool or use the scatter)")


def rope_kv_write(qkv: jax.Array, positions: jax.Array, slots: jax.Array, k_pages: jax.Array,
                  v_pages: jax.Array, *, n_heads: int, theta: float, interpret: bool = False,
                  config: Optional[RopeKVWriteConfig] = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries, and the rotated keys and the values written into the pools in place.

    Args:
      qkv: [T, (N + 2K) H] the fused projection's output: N query heads, then K key heads,
        then K value heads, H features each (``optgqa_jax.fused``'s layout).
      positions: int32 [T] position of each token (the rotation's angle).
      slots: int32 [T] pool slot of each token; slots outside ``[0, S)`` are not written.
        Two tokens must not share a slot inside ``[0, S)`` (which one lands is undefined,
        as for a scatter).
      k_pages, v_pages: [K, S, H] the pools (a paged pool ``[K, P, Z, H]`` reshaped to
        ``[K, P Z, H]``). Donated: do not use them after the call.
      n_heads: N, the query heads.
      theta: RoPE base (as :func:`optgqa_jax.rope.apply_rope`).
      interpret: Pallas interpret mode (CPU testing).
      config: tuning knobs (default :class:`RopeKVWriteConfig`).

    Returns:
      (q [T, N, H] in qkv's dtype, k_pages, v_pages with the rows written).

    Raises:
      ValueError: shapes, ranks or dtypes that do not form a call, before any launch.
    """
    check_rope_kv_write_inputs(qkv, positions, slots, k_pages, v_pages, n_heads)
    config = config or RopeKVWriteConfig()
    config.validate()
    T, H = qkv.shape[0], k_pages.shape[2]
    if T == 0:
        return jnp.zeros((0, n_heads, H), qkv.dtype), k_pages, v_pages
    cos, sin = rotation_tables(positions, H, theta)
    return _rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages, n_heads=n_heads,
                          interpret=interpret, config=config)


def rope_kv_write_reference(qkv, positions, slots, k_pages, v_pages, *, n_heads: int,
                            theta: float):
    """Pure-jnp reference: the model's split and rotation (as ``optgqa_jax.rope.apply_rope``)
    and the engine's scatter (out-of-range slots dropped)."""
    check_rope_kv_write_inputs(qkv, positions, slots, k_pages, v_pages, n_heads)
    T = qkv.shape[0]
    K, S, H = k_pages.shape
    q, k, v = jnp.split(qkv.reshape(T, n_heads + 2 * K, H), [n_heads, n_heads + K], axis=1)
    q, k = _rotate(q, positions, theta), _rotate(k, positions, theta)
    slots = jnp.where(slots < 0, S, slots)   # dropped (.at would wrap them)
    return (q, k_pages.at[:, slots].set(jnp.moveaxis(k, 1, 0).astype(k_pages.dtype),
                                        mode="drop"),
            v_pages.at[:, slots].set(jnp.moveaxis(v, 1, 0).astype(v_pages.dtype), mode="drop"))
