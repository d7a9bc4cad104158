"""GroupMajorLinear: a BSR layer's kept blocks reordered by group, the serving layout of the
group-major decode kernel (``pallas_kernels.bsr_gm_quant_matmul``).

:class:`~optgqa_jax.sparse.BSRQuantizedLinear` stores blocks row by row, which is the format
(checkpoints, conversions, checks). For decode, :func:`to_group_major` reorders them once per
layer by group, then by output feature, and pads each group's list to a multiple of ``block_t``
with empty blocks (scale 0, feature ``N``): every program of the kernel then multiplies ``block_t``
blocks of one group by the same slice of x. Nothing is duplicated: the result holds the same
codes, scales and zeros (plus the padding and one int32 feature id per block) and replaces the
BSR layer in the params; the model multiplies it with :func:`group_major_matmul`.

It is a runtime layout: checkpoints store the BSR form (convert after loading), and it is not
shardable. :func:`dequantize_group_major` gives the float weight back.

Axis legend: K input features, N output features, G = K / gs groups, nnz_p stored blocks
(kept + padding), T = block_t blocks per program.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.sparse.bsr import (BSRQuantizedLinear, check_bsr, dequantized_product, is_bsr,
                                   use_sparse_kernel)

# impl="auto" runs the kernel up to this many rows of x. On an H200 (jax 0.11.2, commit aadfc42,
# experiments/results/h200/gqsa/gqsa_speed_aadfc42.md) it took 0.54-0.88x dense W4's time at
# one row but 3.5-4.4x at 16 rows (gate/up), so only one row for now.
GM_KERNEL_MAX_ROWS = 1


@flax.struct.dataclass
class GroupMajorLinear:
    """A BSR layer's blocks in group-major order (module docstring); a pytree."""

    codes: jax.Array          # int32 [nnz_p, gs * bits / 32]
    scales: jax.Array         # [nnz_p], padding 0
    zeros: jax.Array          # uint8 [nnz_p]
    rows: jax.Array           # int32 [nnz_p], output feature of each block; padding N
    program_group: jax.Array  # int32 [nnz_p / T], the group of each program's T blocks
    in_features: int = flax.struct.field(pytree_node=False, default=0)
    out_features: int = flax.struct.field(pytree_node=False, default=0)
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    sym: bool = flax.struct.field(pytree_node=False, default=True)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    block_t: int = flax.struct.field(pytree_node=False, default=64)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight shape (D_in, D_out)."""
        return (self.in_features, self.out_features)

    @property
    def nbytes(self) -> int:
        """Bytes stored (every array, padding included)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.codes, self.scales, self.zeros, self.rows, self.program_group))

    def blocks(self):
        """The kernel's ``GroupMajorBlocks`` view of the arrays."""
        from pallas_kernels.bsr_gm_quant_matmul import GroupMajorBlocks
        return GroupMajorBlocks(self.codes, self.scales, self.zeros, self.rows,
                                self.program_group)


def is_group_major(x) -> bool:
    """Whether `x` is a :class:`GroupMajorLinear` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, GroupMajorLinear)


def to_group_major(b: BSRQuantizedLinear, block_t: int = 64,
                   name: str = "bsr") -> GroupMajorLinear:
    """Reorder a BSR layer's blocks by group (host side, once per layer).

    Args:
      b: a concrete, valid :class:`~optgqa_jax.sparse.BSRQuantizedLinear`.
      block_t: blocks per kernel program (a power of two); each group's list is padded to a
        multiple of it.
      name: the layer's name in error messages.

    Raises:
      ValueError: `b` is not a valid BSR layer, or block_t is not a power of two.
    """
    from pallas_kernels.bsr_gm_quant_matmul import group_major_blocks
    if not is_bsr(b):
        raise ValueError(f"{name} must be a BSRQuantizedLinear, got {type(b).__name__}")
    check_bsr(b, name)
    K, N = b.shape
    gm = group_major_blocks(b.codes, b.scales, b.zeros, b.col_idx, b.row_ids, out_features=N,
                            groups=K // b.group_size, block_t=block_t)
    return GroupMajorLinear(*gm, in_features=K, out_features=N, bits=b.bits,
                            group_size=b.group_size, sym=b.sym, dtype=b.dtype,
                            block_t=int(block_t))


def to_group_major_params(params, block_t: int = 64):
    """`params` with every BSR kernel replaced by its :func:`to_group_major` layout (concrete
    params; host side). Other leaves are unchanged."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_bsr)[0]
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
    converted = {name(p): to_group_major(l, block_t, name(p)) for p, l in flat if is_bsr(l)}
    return jax.tree_util.tree_map_with_path(lambda p, l: converted.get(name(p), l), params,
                                            is_leaf=is_bsr)


def dequantize_group_major(g: GroupMajorLinear, dtype=None) -> jax.Array:
    """The float weight [K, N] of `g` (jnp; traceable): the kept blocks scattered, the padding
    dropped."""
    from pallas_kernels.bsr_quant_matmul import dequantize_blocks
    K, N = g.shape
    G, gs = K // g.group_size, g.group_size
    blocks = dequantize_blocks(g.codes, g.scales, g.zeros, g.bits, gs)      # [nnz_p, gs] f32
    groups = jnp.repeat(g.program_group, g.block_t, total_repeat_length=g.codes.shape[0])
    dtype = jnp.dtype(dtype or g.dtype)
    # scattered in the output dtype: the same values as a float32 scatter cast afterwards
    dense = jnp.zeros((N + 1, G, gs), dtype).at[g.rows, groups].set(blocks.astype(dtype))[:N]
    return dense.reshape(N, K).T


def group_major_matmul(x: jax.Array, g: GroupMajorLinear, impl: str = "auto") -> jax.Array:
    """``x @ dequantize_group_major(g)`` for x [..., K], in x's dtype.

    ``impl``: ``"pallas"`` runs ``pallas_kernels.bsr_gm_quant_matmul`` (interpret mode on a
    CPU); ``"dequantize"`` scatters the float weight and multiplies (XLA); ``"auto"`` takes the
    kernel on GPUs for bfloat16/float16 x with at most ``GM_KERNEL_MAX_ROWS`` rows (decode) and
    dequantizes elsewhere.
    """
    from pallas_kernels import _common as kc
    from pallas_kernels.bsr_gm_quant_matmul import bsr_gm_quant_matmul
    K, N = g.shape
    if not use_sparse_kernel(x, K, impl, GM_KERNEL_MAX_ROWS, "group-major layer"):
        return dequantized_product(x, g, dequantize_group_major)
    lead = x.shape[:-1]
    y = bsr_gm_quant_matmul(x.reshape(-1, K), g.blocks(), out_features=N, bits=g.bits,
                            group_size=g.group_size, interpret=kc.backend() == "cpu")
    return y.reshape(*lead, N)
