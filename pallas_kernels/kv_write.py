"""Write a step's K/V rows into the paged pool in place (Pallas, Triton lowering).

Each engine step stores the K and V rows of its T tokens at their pool slots before attention
reads the pool, which XLA does as a scatter (``pages.at[:, slots].set(rows, mode="drop")``).
This kernel does the same write as one Triton launch per layer. Measured on an H100 (commit
ecc39b2, ``experiments/results/h100/engine_kv_write_kernel_ecc39b2/``): the 1000 x 256/256
engine run at 512 sequences was the same with either (29,102-29,266 tokens/s); the decode
step's two scatters take 7 us each on the device (0.44 ms of a 22 ms step), so there was
little to gain there. The engine keeps the scatter by default
(``EngineConfig.kv_write_kernel``).

Here program ``(i, k)`` takes tokens ``[i Bt, (i + 1) Bt)`` of KV head ``k``: it loads their
``[Bt, H]`` K and V rows and stores them at ``pages[k, slots[t], :]``, 256 contiguous bytes
per row at head dim 128 in bfloat16 (a grid of ``ceil(T / Bt) K`` programs: 248 for a
482-token step of 8 KV heads at ``Bt = 16``). The pools are aliased to the outputs
(``input_output_aliases``), so only the written rows move; under ``jax.jit`` with the pools
donated, as the engine's step donates them, XLA updates them in place. Slots outside
``[0, S)`` (the engine's padding tokens) are not written, as the scatter's ``mode="drop"``
does: their lanes repeat the write of the block's first token that writes
(``_common.redirect_idle_lanes``), so that no masked lane aims at a written row (Pallas'
interpret mode emulates a masked store by writing the old value back).

Axis legend: T tokens of the step, K KV heads, H head dim, S = P Z pool slots (P pages of Z
tokens), Bt tokens per program.
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
class KVWriteConfig(C.RowBlockConfig):
    """Tuning knobs of :func:`kv_write` (``block_t`` tokens per program; see
    ``_common.RowBlockConfig``)."""


def _make_kernel(*, T: int, H: int, S: int, block_t: int):
    def kernel(k_ref, v_ref, slots_ref, kp_in, vp_in, kp_ref, vp_ref):
        del kp_in, vp_in        # aliased to kp_ref, vp_ref: the rows not written stay as they are
        kk = pl.program_id(1)                                                # KV head
        t = pl.program_id(0) * block_t + jnp.arange(block_t)                 # [Bt] tokens
        t = jnp.minimum(t, T - 1)           # lanes past T repeat token T - 1 (the same write)
        slot = plgpu.load(slots_ref.at[t])                                   # [Bt]
        ok = (slot >= 0) & (slot < S)                                        # [Bt]
        src, dst, write = C.redirect_idle_lanes(ok, t, slot)
        shape = (block_t, H)
        cols = jnp.broadcast_to(jnp.arange(H)[None, :], shape)               # [Bt, H]
        rows = jnp.broadcast_to(src[:, None], shape)
        dst_rows = jnp.broadcast_to(dst[:, None], shape)
        mask = jnp.broadcast_to(write, shape)
        for src_ref, dst_ref in ((k_ref, kp_ref), (v_ref, vp_ref)):
            vals = plgpu.load(src_ref.at[rows, kk * H + cols])
            plgpu.store(dst_ref.at[kk, dst_rows, cols], vals.astype(dst_ref.dtype), mask=mask)

    return kernel


@functools.partial(jax.jit, static_argnames=("interpret", "config"), donate_argnums=(3, 4))
def _kv_write(k_rows, v_rows, slots, k_pages, v_pages, *, interpret: bool,
              config: KVWriteConfig):
    T, K, H = k_rows.shape
    S = k_pages.shape[1]
    block_t = int(min(config.block_t, C.next_power_of_two(T)))
    args = (k_rows.reshape(T, K * H), v_rows.reshape(T, K * H), slots, k_pages, v_pages)
    return pl.pallas_call(
        _make_kernel(T=T, H=H, S=S, block_t=block_t),
        grid=(C.cdiv(T, block_t), K),
        in_specs=[C.whole_block(a) for a in args],
        out_specs=[C.whole_block(k_pages), C.whole_block(v_pages)],
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name="optgqa_kv_write",
    )(*args)


def check_kv_write_inputs(k_rows, v_rows, slots, k_pages, v_pages) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a valid write."""
    C.check_rank("k_rows", k_rows, 3, "[T, K, H]")
    C.check_rank("k_pages", k_pages, 3, "[K, S, H]")
    T, K, H = k_rows.shape
    if tuple(v_rows.shape) != (T, K, H):
        raise ValueError(f"v_rows must have k_rows' shape {(T, K, H)}, got {tuple(v_rows.shape)}")
    if k_pages.shape[0] != K or k_pages.shape[2] != H:
        raise ValueError(f"k_pages must be [K={K}, S, H={H}] (k_rows' heads and head dim), got "
                         f"{tuple(k_pages.shape)}")
    if tuple(v_pages.shape) != tuple(k_pages.shape) or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages must match k_pages ({tuple(k_pages.shape)} {k_pages.dtype}), "
                         f"got {tuple(v_pages.shape)} {v_pages.dtype}")
    for name, a in (("k_rows", k_rows), ("v_rows", v_rows), ("k_pages", k_pages)):
        C.check_float(name, a)
    C.check_int32("slots", slots)
    if tuple(slots.shape) != (T,):
        raise ValueError(f"slots must have shape [T]=({T},), got {tuple(slots.shape)}")
    if not C.is_power_of_two(H):
        raise ValueError(f"head dim H={H} must be a power of two")
    if k_pages.size >= 2 ** 31:   # the kernel's element offsets are int32
        raise ValueError(f"k_pages has {k_pages.size:,} elements; the kernel addresses at most "
                         f"2^31 - 1 per pool (split the pool or use the scatter)")


def kv_write(k_rows: jax.Array, v_rows: jax.Array, slots: jax.Array, k_pages: jax.Array,
             v_pages: jax.Array, *, interpret: bool = False,
             config: Optional[KVWriteConfig] = None) -> tuple[jax.Array, jax.Array]:
    """``k_pages[:, slots[t]] = k_rows[t]`` and the same for V, in place.

    Args:
      k_rows, v_rows: [T, K, H] the step's rows (cast to the pools' dtype).
      slots: int32 [T] pool slot of each token; slots outside ``[0, S)`` are not written.
        Two tokens must not share a slot inside ``[0, S)`` (which one lands is undefined,
        as for a scatter).
      k_pages, v_pages: [K, S, H] the pools (a paged pool ``[K, P, Z, H]`` reshaped to
        ``[K, P Z, H]``). Donated: do not use them after the call.
      interpret: Pallas interpret mode (CPU testing).
      config: tuning knobs (default :class:`KVWriteConfig`).

    Returns:
      (k_pages, v_pages) with the rows written.

    Raises:
      ValueError: shapes, ranks or dtypes that do not form a write, before any launch.
    """
    check_kv_write_inputs(k_rows, v_rows, slots, k_pages, v_pages)
    config = config or KVWriteConfig()
    config.validate()
    if k_rows.shape[0] == 0:
        return k_pages, v_pages
    return _kv_write(k_rows, v_rows, slots, k_pages, v_pages, interpret=interpret,
                     config=config)


def kv_write_reference(k_rows, v_rows, slots, k_pages, v_pages):
    """Pure-jnp reference: the scatter the engine ran before (out-of-range slots dropped)."""
    check_kv_write_inputs(k_rows, v_rows, slots, k_pages, v_pages)
    slots = jnp.where(slots < 0, k_pages.shape[1], slots)   # dropped (.at would wrap them)
    return (k_pages.at[:, slots].set(jnp.moveaxis(k_rows, 1, 0).astype(k_pages.dtype),
                                     mode="drop"),
            v_pages.at[:, slots].set(jnp.moveaxis(v_rows, 1, 0).astype(v_pages.dtype),
                                     mode="drop"))
