"""Residual add and RMS norm in one pass (Pallas, Triton lowering).

Between sublayers a Llama-family block adds the sublayer's output to the residual stream and
normalizes the sum for the next sublayer: ``s = x + h``, ``y = scale * rmsnorm(s)``. XLA runs
this as two or three kernels per site on a GPU (the add; the statistics; the scale's multiply,
which its normalization fusion leaves apart), each reading and writing the ``[T, D]``
activations. This kernel reads ``x`` and ``h`` once and writes ``s`` and ``y``: program ``i``
takes rows ``[i Bt, (i + 1) Bt)`` whole (``D`` padded to a power of two and masked).

The arithmetic is the model's (``optgqa_jax.model.RMSNorm``, Hugging Face's cast order): the sum
rounded to x's dtype; its mean square and ``rsqrt`` in float32; the normalized row rounded to
x's dtype before the scale multiplies it (the product rounded to x's dtype again). Only the
order of the mean square's float32 additions differs from XLA's.

Measured on an H100 (commit ce1ed36, ``experiments/results/h100/engine_add_norm_ce1ed36/``,
Llama-3-8B shape): 5.0 µs per launch at 482 rows against 613 µs per decode step for XLA's
adds and norms (314 µs with the kernel), 43.7 µs at 4,096 rows (about the copy bandwidth);
with ``pallas_kernels.rope_kv_write`` as well the 1000 x 256/256 engine run was 1.3-1.6%
faster; at commit 0878888 (``experiments/results/h100/engine_small_op_defaults_0878888/``)
1.3-1.7% on that workload and 1.0-2.2% on random lengths, so ``EngineConfig.add_norm_kernel``
is on by default with one device.

Axis legend: T rows (tokens), D features, Bt rows per program.
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
class AddRMSNormConfig(C.RowBlockConfig):
    """Tuning knobs of :func:`add_rms_norm` (``block_t`` rows per program, 2 by default; see
    ``_common.RowBlockConfig``)."""

    block_t: int = 2


def _make_kernel(*, T: int, D: int, block_t: int, eps: float):
    Dp = C.next_power_of_two(D)

    def kernel(x_ref, h_ref, w_ref, s_ref, y_ref):
        t = pl.program_id(0) * block_t + jnp.arange(block_t)                 # [Bt] rows
        t_ok = t < T
        shape = (block_t, Dp)
        rows = jnp.broadcast_to(jnp.where(t_ok, t, 0)[:, None], shape)
        d = jnp.arange(Dp)
        cols = jnp.broadcast_to(d[None, :], shape)
        ok = jnp.broadcast_to(t_ok[:, None], shape) & (cols < D)
        x = plgpu.load(x_ref.at[rows, cols], mask=ok, other=0).astype(jnp.float32)
        h = plgpu.load(h_ref.at[rows, cols], mask=ok, other=0).astype(jnp.float32)
        s = (x + h).astype(s_ref.dtype)                                      # [Bt, Dp]
        plgpu.store(s_ref.at[rows, cols], s, mask=ok)
        s32 = s.astype(jnp.float32)                    # padded columns are 0: no share of it
        r = jax.lax.rsqrt(jnp.sum(s32 * s32, axis=1, keepdims=True) / D + eps)  # [Bt, 1]
        w = plgpu.load(w_ref.at[d], mask=d < D, other=0).astype(jnp.float32)  # [Dp]
        normed = (s32 * r).astype(y_ref.dtype).astype(jnp.float32)
        plgpu.store(y_ref.at[rows, cols], (w[None, :] * normed).astype(y_ref.dtype), mask=ok)

    return kernel


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "config"))
def _add_rms_norm(x, h, scale, *, eps: float, interpret: bool, config: AddRMSNormConfig):
    T, D = x.shape
    block_t = int(min(config.block_t, C.next_power_of_two(T)))
    out = jax.ShapeDtypeStruct((T, D), x.dtype)
    return pl.pallas_call(
        _make_kernel(T=T, D=D, block_t=block_t, eps=eps),
        grid=(C.cdiv(T, block_t),),
        in_specs=[C.whole_block(x), C.whole_block(h), C.whole_block(scale)],
        out_specs=[C.whole_block(out), C.whole_block(out)],
        out_shape=[out, out],
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name="optgqa_add_rms_norm",
    )(x, h, scale)


def check_add_rms_norm_inputs(x, h, scale, eps) -> None:
    """Raise ValueError (naming the argument) unless the arguments form a valid call."""
    C.check_rank("x", x, 2, "[T, D]")
    C.check_float("x", x)
    if tuple(h.shape) != tuple(x.shape) or h.dtype != x.dtype:
        raise ValueError(f"h must match x ({tuple(x.shape)} {x.dtype}), got "
                         f"{tuple(h.shape)} {h.dtype}")
    if tuple(scale.shape) != (x.shape[1],):
        raise ValueError(f"scale must have shape [D]=({x.shape[1]},), got {tuple(scale.shape)}")
    C.check_float("scale", scale)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if x.size >= 2 ** 31:
        raise ValueError(f"x has {x.size:,} elements; the kernel addresses at most 2^31 - 1")


def add_rms_norm(x: jax.Array, h: jax.Array, scale: jax.Array, *, eps: float,
                 interpret: bool = False, config: Optional[AddRMSNormConfig] = None
                 ) -> tuple[jax.Array, jax.Array]:
    """``s = x + h`` and ``y = scale * rmsnorm(s)`` in one pass.

    Args:
      x: [T, D] the residual stream (float dtype).
      h: [T, D] the sublayer's output, x's dtype.
      scale: [D] the norm's scale (any float dtype; cast to x's dtype as the model's param is).
      eps: the norm's epsilon.
      interpret: Pallas interpret mode (CPU testing).
      config: tuning knobs (default :class:`AddRMSNormConfig`).

    Returns:
      (s [T, D], y [T, D]), both in x's dtype.

    Raises:
      ValueError: shapes, ranks or dtypes that do not form a call, before any launch.
    """
    check_add_rms_norm_inputs(x, h, scale, eps)
    config = config or AddRMSNormConfig()
    config.validate()
    if x.shape[0] == 0:
        return x + h, x
    return _add_rms_norm(x, h, scale.astype(x.dtype), eps=float(eps), interpret=interpret,
                         config=config)


def add_rms_norm_reference(x, h, scale, *, eps: float):
    """Pure-jnp reference: the model's residual add and ``RMSNorm``."""
    check_add_rms_norm_inputs(x, h, scale, eps)
    s = x + h
    s32 = s.astype(jnp.float32)
    normed = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
    return s, scale.astype(x.dtype) * normed.astype(x.dtype)
