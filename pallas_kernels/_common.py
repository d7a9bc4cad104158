"""Helpers shared by the kernels: backend detection, input checks, small math."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)
MASK_VALUE = -1e30  # finite: exp2(MASK_VALUE - m) underflows to 0 and never makes NaN
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def backend() -> str:
    """"cuda", "rocm" or "cpu": the platform the kernels will be compiled for."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    version = getattr(dev.client, "platform_version", "") or ""
    return "rocm" if dev.platform == "rocm" or "rocm" in version.lower() else "cuda"


def device_kind() -> str:
    """The kind of ``jax.devices()[0]``, e.g. "NVIDIA H100 80GB HBM3" (tuning tables' key)."""
    return jax.devices()[0].device_kind


def compiler_options(backend_name: str | None = None) -> dict:
    """XLA compiler options that make these kernels faster, for ``jax.jit(..., compiler_options=)``.

    On CUDA: ``{"xla_gpu_ftz": True}``, which flushes float32 denormals to zero
    in the jitted program. The kernels' base-2 exponentials then compile to a
    single ``ex2.approx.ftz`` instead of the denormal-safe sequence (Triton's
    own compiler always builds its kernels this way). It changes no result
    above 1.2e-38. On an H100 it made ``flash_attention`` 2-7% faster (the
    flash rows of ``experiments/results/h100/bench_kernels.md``). Other backends: ``{}``.

    The options apply to the outermost ``jax.jit`` only, so pass them where the
    kernels are called from, e.g.
    ``jax.jit(step, compiler_options=pallas_kernels.compiler_options())``.
    ``backend_name`` defaults to the platform of ``jax.devices()[0]``.
    """
    name = backend() if backend_name is None else backend_name
    if name not in ("cuda", "rocm", "cpu"):
        raise ValueError(f"backend_name must be 'cuda', 'rocm', 'cpu' or None, got {name!r}")
    return {"xla_gpu_ftz": True} if name == "cuda" else {}


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def cdiv(a, b):
    return (a + b - 1) // b


def check_float(name: str, x) -> None:
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_int32(name: str, x) -> None:
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"{name} must be int32, got {x.dtype}")


def check_rank(name: str, x, rank: int, legend: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {legend}, got shape {tuple(x.shape)}")


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported; the kernels need one of "
                         f"{SUPPORTED_HEAD_DIMS} (pad the heads, or use the jnp reference)")


def check_heads(num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"number of query heads ({num_q_heads}) must be a multiple of the number "
                         f"of KV heads ({num_kv_heads})")


def check_slopes(alibi_slopes, num_q_heads: int):
    """Return float32 slopes [N] or None; raise on a bad shape."""
    if alibi_slopes is None:
        return None
    slopes = jnp.asarray(alibi_slopes, jnp.float32)
    if slopes.shape != (num_q_heads,):
        raise ValueError(f"alibi_slopes must have shape [num_q_heads]=({num_q_heads},), got "
                         f"{tuple(slopes.shape)}")
    return slopes


def is_concrete(x) -> bool:
    """Whether `x` holds values that checks may read (not a tracer, not a shape-only
    ``jax.ShapeDtypeStruct``)."""
    return not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


def dot(a, b):
    """2-D matrix product with float32 accumulation.

    float32 inputs ask for full IEEE precision: Triton's default for float32 is
    TF32, about 1e-3 relative error, which would hide real bugs in the tests.
    """
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def validate_tuning(config, block_fields: tuple[str, ...], minimum_block: int = 16) -> None:
    """Shared checks of the kernels' tuning configs (raise ValueError naming the field)."""
    for name in block_fields:
        v = getattr(config, name)
        if not (is_power_of_two(v) and v >= minimum_block):
            raise ValueError(f"{name}={v} must be a power of two >= {minimum_block}")
    if not 1 <= config.num_warps <= 16:  # ROCm: 16 warps of 64 lanes fill a workgroup
        raise ValueError(f"num_warps={config.num_warps} must be in [1, 16]")
    if config.num_stages < 1:
        raise ValueError(f"num_stages={config.num_stages} must be >= 1")


def whole_block(a):
    """A ``pl.BlockSpec`` handing every program the whole of array ``a`` (the kernel indexes
    it itself), for a grid of any rank."""
    from jax.experimental import pallas as pl
    return pl.BlockSpec(a.shape, lambda *ids: (0,) * a.ndim)


@dataclasses.dataclass(frozen=True)
class RowBlockConfig:
    """Tuning knobs of the kernels that stream whole rows, ``block_t`` rows per program
    (``kv_write``, ``rope_kv_write``, ``add_rms_norm``; each subclasses it with its default).

    Attributes:
      block_t: rows (tokens) per program (a power of two >= 1).
      num_warps, num_stages: Triton launch parameters.
    """

    block_t: int = 16
    num_warps: int = 4
    num_stages: int = 1

    def validate(self) -> None:
        if not (isinstance(self.block_t, int) and self.block_t >= 1
                and is_power_of_two(self.block_t)):
            raise ValueError(f"block_t={self.block_t!r} must be a power of two >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be 1, 2, 4, 8 or 16")
        if not (isinstance(self.num_stages, int) and 1 <= self.num_stages <= 8):
            raise ValueError(f"num_stages={self.num_stages!r} must be an int in [1, 8]")


def redirect_idle_lanes(ok, src, dst):
    """Inside a kernel that scatters rows: point the lanes that must not write at the write of
    the block's first lane that does (same source row, same destination row).

    A masked store on a GPU stores nothing from its masked lanes, but Pallas' interpret mode
    emulates it by writing the old value back; a masked lane aimed at a row that a live lane
    of the same store writes then races it, and the stale value can win. With every idle lane
    repeating a live lane's write, all writes to one row carry the same value, on any backend.

    Args:
      ok: bool [B] lanes that write.
      src: int32 [B] source row of each lane (a valid index on every lane).
      dst: int32 [B] destination row of each lane (valid where ``ok``).

    Returns:
      (src [B], dst [B], write): the redirected rows and a scalar bool, whether the block writes
      at all (store with mask ``write`` on every lane; with no live lane the rows are 0 and
      nothing is stored).
    """
    n = ok.shape[0]
    lane = jnp.arange(n)
    first = jnp.min(jnp.where(ok, lane, n))                     # n when no lane writes
    pick = lane == first
    src0 = jnp.sum(jnp.where(pick, src, 0))
    dst0 = jnp.sum(jnp.where(pick, dst, 0))
    return jnp.where(ok, src, src0), jnp.where(ok, dst, dst0), first < n


def online_softmax_step(acc, m, l, s, v):
    """One FlashAttention running-softmax update (inside kernels).

    Args:
      acc: float32 [M, D] unnormalised output so far; m: [M] running max; l: [M] running sum.
      s: float32 [M, N] scores already in log2 units (scaled by log2 e), masked entries MASK_VALUE.
      v: [N, D] values of this block.

    Returns:
      the updated (acc, m, l).
    """
    m_new = jnp.maximum(m, s.max(axis=-1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + p.sum(axis=-1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_new, l
