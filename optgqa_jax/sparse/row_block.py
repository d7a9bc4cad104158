"""RowBlockQuantizedLinear: group-sparse 4-bit weights whose blocks of output features share
one mask, stored as compacted dense blocks (the layout of ``pallas_kernels.row_block_quant_matmul``).

With ``SparsityConfig(row_block=B)`` the ``B`` output features ``[j B, (j + 1) B)`` keep the
same ``R`` of their ``G = K / gs`` quantization groups. Such a layer needs no per-block index
list: the kept groups of every block are one row of ``group_map``, and the codes of the kept
groups sit one under another as a dense GPTQ-layout matrix of ``R gs`` rows:

* ``qweight`` int32 [R gs b / 32, N]: row ``r gs + k`` of feature ``n`` is input
  ``group_map[n / B, r] gs + k``;
* ``scales`` [R, N] and ``zeros`` uint8 [R, N]: the kept groups' grids;
* ``group_map`` int32 [N / B, R]: each block's kept groups, ascending.

A decode product then runs the dense W4 kernel over ``R gs`` rows instead of ``K``, reading x
at the kept groups (:func:`row_block_matmul`): half the weight bytes at 50% sparsity, without
the per-block gathers of x that per-feature masks (BSR) need. The price is accuracy: every
feature of a block loses the same groups (``results/cpu/gqsa/`` compares the two patterns).

:func:`to_row_block` converts a pruned dense ``QuantizedLinear`` (or its BSR form) host side,
:func:`row_block_to_dense` converts back, :func:`dequantize_row_block` gives the float weight.
It is a serving layout: checkpoints store the BSR or dense form (convert after loading).

Axis legend: K input features, N output features, gs group size, G = K / gs groups, R kept
groups per block, B = ``row_block`` features per block.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.quant.linear import QuantizedLinear, contiguous_groups
from optgqa_jax.sparse.bsr import (dequantized_product, is_bsr, kept_groups, kept_mask,
                                   to_dense, use_sparse_kernel)

# impl="auto" runs the kernel up to this many rows of x (the dense W4 kernel's decode range,
# optgqa_jax.quant.matmul) and dequantizes above. Timed at one row only (H100, 534d50c,
# results/h100/gqsa/row_block_speed_534d50c.md); the 16-row bound is the dense kernel's.
ROW_BLOCK_KERNEL_MAX_ROWS = 16


@flax.struct.dataclass
class RowBlockQuantizedLinear:
    """Kept groups of one linear layer, shared by blocks of output features (module
    docstring); a pytree."""

    qweight: jax.Array     # int32 [R * gs * bits / 32, N]
    scales: jax.Array      # [R, N]
    zeros: jax.Array       # uint8 [R, N]
    group_map: jax.Array   # int32 [N / row_block, R]
    in_features: int = flax.struct.field(pytree_node=False, default=0)
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    sym: bool = flax.struct.field(pytree_node=False, default=True)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    row_block: int = flax.struct.field(pytree_node=False, default=16)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight shape (D_in, D_out)."""
        return (self.in_features, self.qweight.shape[1])

    @property
    def kept_groups(self) -> int:
        """R, the groups each block keeps."""
        return self.group_map.shape[1]

    @property
    def density(self) -> float:
        """Fraction of the groups stored."""
        return self.kept_groups * self.group_size / max(1, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes, scales, zeros, map)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.qweight, self.scales, self.zeros, self.group_map))


def is_row_block(x) -> bool:
    """Whether `x` is a :class:`RowBlockQuantizedLinear` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, RowBlockQuantizedLinear)


def to_row_block(layer, row_block: int, keep=None, name: str = "layer"
                 ) -> RowBlockQuantizedLinear:
    """Store a pruned layer's kept groups as compacted row blocks (host side, once per layer).

    Args:
      layer: a dense ``QuantizedLinear`` (contiguous groups, 2, 4 or 8 bits) or a
        ``BSRQuantizedLinear``.
      row_block: output features per block (divides D_out); the kernel needs a power of two
        >= 16.
      keep: optional bool [G, N] mask of the kept groups (dense layers); by default the groups
        whose dequantized weights are not all zero, or the BSR layer's stored groups.
      name: the layer's name in error messages.

    Raises:
      ValueError: an unsupported layer, a block size that does not divide D_out, or features
        of one block that keep different groups or different numbers of groups.
    """
    if is_bsr(layer):
        keep = kept_mask(layer) if keep is None else keep
        layer = to_dense(layer)
    if not isinstance(layer, QuantizedLinear):
        raise ValueError(f"{name} must be a QuantizedLinear or BSRQuantizedLinear, got "
                         f"{type(layer).__name__}")
    K, N = layer.shape
    gs, bits = layer.group_size, layer.bits
    if bits not in (2, 4, 8):
        raise ValueError(f"{name}: bits={bits} cannot be stored in row blocks (codes must fill "
                         "int32 words: 2, 4 or 8)")
    if gs == -1 or gs < 1 or K % gs or (gs * bits) % 32:
        raise ValueError(f"{name}: group_size={gs} must divide D_in={K} with group_size * bits "
                         "a multiple of 32 (per-channel grids have no groups to drop)")
    if layer.perm is not None or not bool(contiguous_groups(layer.g_idx, gs)):
        raise ValueError(f"{name}: row blocks need contiguous groups (no act-order)")
    if isinstance(row_block, bool) or not isinstance(row_block, (int, np.integer)) or (
            row_block < 1 or N % row_block):
        raise ValueError(f"{name}: row_block={row_block!r} must be a positive int dividing "
                         f"D_out={N}")
    G, W, B = K // gs, gs * bits // 32, int(row_block)
    keep = kept_groups(layer, keep, name)
    blocks = keep.reshape(G, N // B, B)
    if not (blocks == blocks[:, :, :1]).all():
        j = int(np.nonzero((blocks != blocks[:, :, :1]).any(axis=(0, 2)))[0][0])
        raise ValueError(f"{name}: the features of block {j} (columns {j * B}-{j * B + B - 1}) "
                         f"keep different groups; row_block={B} needs one mask per block "
                         "(prune with SparsityConfig(row_block=...))")
    counts = blocks[:, :, 0].sum(axis=0)                                   # [N / B]
    if (counts != counts[0]).any():
        raise ValueError(f"{name}: blocks keep different numbers of groups ({counts.min()} to "
                         f"{counts.max()}); row blocks need the same count in every block "
                         "(scope='row' pruning)")
    R = int(counts[0])
    gmap = np.stack([np.nonzero(blocks[:, j, 0])[0] for j in range(N // B)]
                    ).reshape(N // B, R).astype(np.int32)                  # [N / B, R]
    cols = np.repeat(gmap, B, axis=0).T                                    # [R, N] groups
    n = np.arange(N)[None, :]
    words = np.asarray(layer.qweight).reshape(G, W, N)[cols, :, n]         # [R, N, W]
    qweight = words.transpose(0, 2, 1).reshape(R * W, N)
    return RowBlockQuantizedLinear(
        qweight=jnp.asarray(qweight, jnp.int32),
        scales=jnp.asarray(np.asarray(layer.scales)[cols, n]),
        zeros=jnp.asarray(np.asarray(layer.zeros)[cols, n]),
        group_map=jnp.asarray(gmap), in_features=K, bits=bits, group_size=gs,
        sym=layer.sym, dtype=layer.dtype, row_block=B)


def dequantize_row_block(rb: RowBlockQuantizedLinear, dtype=None) -> jax.Array:
    """The float weight [K, N] of `rb` (jnp; traceable): the kept groups at their places,
    zeros elsewhere."""
    from pallas_kernels.row_block_quant_matmul import row_block_dequantize
    return row_block_dequantize(rb.qweight, rb.scales, rb.zeros, rb.group_map,
                                in_features=rb.in_features, bits=rb.bits,
                                group_size=rb.group_size, row_block=rb.row_block,
                                dtype=jnp.dtype(dtype or rb.dtype))


def row_block_to_dense(rb: RowBlockQuantizedLinear) -> QuantizedLinear:
    """The dense ``QuantizedLinear`` of `rb` (host side); absent groups are codes 0, zero 0,
    scale 0, so they dequantize to exact zeros."""
    K, N = rb.shape
    gs, B, R = rb.group_size, rb.row_block, rb.kept_groups
    G, W = K // gs, gs * rb.bits // 32
    cols = np.repeat(np.asarray(rb.group_map), B, axis=0).T                # [R, N]
    n = np.arange(N)[None, :]
    words = np.zeros((G, N, W), np.int32)
    words[cols, n] = np.asarray(rb.qweight).reshape(R, W, N).transpose(0, 2, 1)
    scales = np.zeros((G, N), np.asarray(rb.scales).dtype)
    zeros = np.zeros((G, N), np.uint8)
    scales[cols, n], zeros[cols, n] = np.asarray(rb.scales), np.asarray(rb.zeros)
    return QuantizedLinear(
        qweight=jnp.asarray(words.transpose(0, 2, 1).reshape(G * W, N)),
        scales=jnp.asarray(scales), zeros=jnp.asarray(zeros),
        g_idx=jnp.asarray(np.arange(K) // gs, jnp.int32), bits=rb.bits, group_size=gs,
        sym=rb.sym, dtype=rb.dtype, groups_contiguous=True)


def row_block_matmul(x: jax.Array, rb: RowBlockQuantizedLinear, impl: str = "auto"
                     ) -> jax.Array:
    """``x @ dequantize_row_block(rb)`` for x [..., K], in x's dtype.

    ``impl``: ``"pallas"`` runs ``pallas_kernels.row_block_quant_matmul`` (interpret mode on
    a CPU); ``"dequantize"`` makes the float weight and multiplies (XLA); ``"auto"`` takes the
    kernel on GPUs for bfloat16/float16 x of at most ``ROW_BLOCK_KERNEL_MAX_ROWS`` rows and
    dequantizes elsewhere.
    """
    from pallas_kernels import _common as kc
    from pallas_kernels.row_block_quant_matmul import row_block_quant_matmul
    K, N = rb.shape
    if not use_sparse_kernel(x, K, impl, ROW_BLOCK_KERNEL_MAX_ROWS, "row-block layer"):
        return dequantized_product(x, rb, dequantize_row_block)
    lead = x.shape[:-1]
    y = row_block_quant_matmul(x.reshape(-1, K), rb.qweight, rb.scales, rb.zeros,
                               rb.group_map, bits=rb.bits, group_size=rb.group_size,
                               row_block=rb.row_block, interpret=kc.backend() == "cpu")
    return y.reshape(*lead, N)


def to_row_block_params(params, row_block: int):
    """`params` with every BSR kernel (``sparse.to_bsr_params``' output) replaced by its
    :func:`to_row_block` layout (concrete params; host side). Other leaves are unchanged.

    Raises:
      ValueError: naming the layer, where its mask is not shared by blocks of `row_block`.
    """
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_bsr)[0]
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)  # noqa: E731
    converted = {name(p): to_row_block(l, row_block, name=name(p)) for p, l in flat
                 if is_bsr(l)}
    return jax.tree_util.tree_map_with_path(lambda p, l: converted.get(name(p), l), params,
                                            is_leaf=is_bsr)
