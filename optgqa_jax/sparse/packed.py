"""PackedBSRLinear: a BSR layer's codes, groups, scales and zeros in one int32 array, the
serving layout that costs a jitted step one argument buffer per layer instead of four.

A batch-1 decode step is bound by the host: launching it costs time per argument buffer (on an
H100 with jax 0.11.2, 1.77 µs each, ``experiments/results/h100/batch1/dispatch_cost_1e1715e.md``),
and a BSR projection takes four (codes, scales, zeros, col_idx) where a dense 4-bit one takes
three. :func:`to_packed_bsr` writes them into one array (:func:`pack_blocks`: the codes, then
the groups and one scale-and-zero word per block in rows past them); the decode kernel reads each block's metadata from there
(``bsr_quant_matmul_packed``), and every other route unpacks the arrays inside the jitted
program and runs :func:`~optgqa_jax.sparse.bsr_matmul` as for the BSR layer.

Row-scope layers only (every row keeps the same number of blocks, ``row_blocks > 0``: the
paper's W4S50) with 16-bit scales; :func:`to_packed_bsr_params` leaves other layers as they
are. It is a layout for batch-1 decode: the other routes (2-64 rows, prefill) slice the arrays
out of the packed one inside the program, which XLA may copy on every call. It is a runtime layout: checkpoints store the BSR form (convert after loading), and it is
not shardable. :func:`unpack_bsr` gives the BSR layer back.

``code_order="shift_major"`` (:func:`to_packed_bsr`) also reorders each block's codes so that
the batch-1 kernel reads x as given: no per-call copy of x in the kernel's order, so a product
is one launch instead of two; the other routes reorder the codes back inside the program.
With ``x_dtype="float32"`` as well the batch-1 route hands the kernel x cast to float32 (a
cast XLA fuses into the op that produces x: the norm before q/k/v and gate/up, the gated
activation before down) and casts the product back: the kernel then multiplies without
widening x's bfloat16 halves. Compiled for sm_90 without a GPU (Triton 3.9,
``experiments/packed_sass.py``, ``results/cpu/gqsa/packed_sass_f32x_*.md``) that took the
shift-major kernel from 7.62 to 6.75 SASS instructions per code on gate/up (stream order with
the wrapper's copy: 6.62), 9.50 to 7.75 on o (7.75), 13.38 to 11.88 on down (11.38).

Axis legend: K input features, N output features, nnz stored blocks, Wg words per block,
R = ceil(nnz / Wg) rows of metadata each.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.sparse.bsr import (BSRQuantizedLinear, KERNEL_MAX_ROWS, bsr_matmul, check_bsr,
                                   is_bsr, sparse_impl)
from pallas_kernels import _common as C
from pallas_kernels.bsr_quant_matmul import PACKED_SCALE_DTYPES
from pallas_kernels.quant_codes import CODE_ORDERS, reorder_block_words

# what the batch-1 kernel may be handed x as (None: x's own dtype); see to_packed_bsr
X_DTYPES = (None, "float32")


def pack_blocks(codes, scales, zeros, col_idx) -> jax.Array:
    """One int32 array [nnz + 2 R, Wg] (``R = ceil(nnz / Wg)``) holding a BSR weight's codes,
    groups, scales and zeros, so that a product takes one argument buffer instead of four.

    Rows ``[0, nnz)`` are the codes as they are; rows ``[nnz, nnz + R)`` the group indices
    ``col_idx``, ``Wg`` per row in block order (the last row padded with 0); rows
    ``[nnz + R, nnz + 2 R)`` one word per block, the scale's 16 bits in the low half and the
    zero point in bits 16-23. 16-bit scales only (float16 or bfloat16). jnp; traceable.
    Launching a jitted program costs host time per argument buffer (an H100 with jax 0.11.2:
    1.77 µs each, ``experiments/results/h100/batch1/dispatch_cost_1e1715e.md``), and a batch-1
    decode step of a BSR model takes four per projection.
    """
    codes, scales = jnp.asarray(codes), jnp.asarray(scales)
    zeros, col_idx = jnp.asarray(zeros), jnp.asarray(col_idx)
    if codes.ndim != 2 or codes.dtype != jnp.int32:
        raise ValueError(f"codes must be int32 [nnz, words per block], got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    nnz, Wg = codes.shape
    if jnp.dtype(scales.dtype).name not in PACKED_SCALE_DTYPES:
        raise ValueError(f"scales must be one of {PACKED_SCALE_DTYPES} to be packed (16 bits "
                         f"per block), got {scales.dtype}")
    for name, a in (("scales", scales), ("zeros", zeros), ("col_idx", col_idx)):
        if a.shape != (nnz,):
            raise ValueError(f"{name} must have shape [nnz]=({nnz},), got {tuple(a.shape)}")
    R = C.cdiv(nnz, Wg)
    rows = lambda v: jnp.pad(v, (0, R * Wg - nnz)).reshape(R, Wg)  # noqa: E731
    sbits = jax.lax.bitcast_convert_type(scales, jnp.uint16).astype(jnp.int32)
    meta = sbits | (zeros.astype(jnp.int32) << 16)
    return jnp.concatenate([codes, rows(col_idx.astype(jnp.int32)), rows(meta)], axis=0)


def unpack_blocks(packed, nnz: int, scale_dtype) -> tuple:
    """(codes, scales, zeros, col_idx) of :func:`pack_blocks`' array (jnp; traceable; the codes
    in the order they were packed)."""
    packed = jnp.asarray(packed)
    Wg = packed.shape[1]
    R = C.cdiv(nnz, Wg)
    flat = lambda r0: packed[r0:r0 + R].reshape(-1)[:nnz]  # noqa: E731
    meta = flat(nnz + R)
    scales = jax.lax.bitcast_convert_type((meta & 0xFFFF).astype(jnp.uint16),
                                          jnp.dtype(scale_dtype))
    return packed[:nnz], scales, ((meta >> 16) & 0xFF).astype(jnp.uint8), flat(nnz)


@flax.struct.dataclass
class PackedBSRLinear:
    """A row-scope BSR layer with its block arrays packed into one (module docstring)."""

    packed: jax.Array     # int32 [nnz + 2 R, Wg]: codes, then groups, then scale|zero words
    row_ptr: jax.Array    # int32 [N + 1] (the BSR layer's; read only by the unpacked routes)
    row_ids: jax.Array    # int32 [nnz]
    in_features: int = flax.struct.field(pytree_node=False, default=0)
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    sym: bool = flax.struct.field(pytree_node=False, default=True)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    row_blocks: int = flax.struct.field(pytree_node=False, default=-1)
    nnz: int = flax.struct.field(pytree_node=False, default=0)
    scale_dtype: str = flax.struct.field(pytree_node=False, default="float16")
    code_order: str = flax.struct.field(pytree_node=False, default="stream")
    x_dtype: Optional[str] = flax.struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight shape (D_in, D_out)."""
        return (self.in_features, self.row_ptr.shape[0] - 1)

    @property
    def nbytes(self) -> int:
        """Bytes stored (the packed array and the row pointers)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.packed, self.row_ptr))


def is_packed_bsr(x) -> bool:
    """Whether `x` is a :class:`PackedBSRLinear` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, PackedBSRLinear)


def can_pack(b: BSRQuantizedLinear) -> bool:
    """Whether :func:`to_packed_bsr` takes `b`: every row keeps the same number of blocks
    (``row_blocks > 0``) and the scales are float16 or bfloat16."""
    return (is_bsr(b) and b.row_blocks > 0
            and jnp.dtype(b.scales.dtype).name in PACKED_SCALE_DTYPES)


def to_packed_bsr(b: BSRQuantizedLinear, name: str = "bsr",
                  code_order: str = "stream", x_dtype: Optional[str] = None) -> PackedBSRLinear:
    """Pack a BSR layer's block arrays into one (once per layer; see the module docstring).

    ``code_order``: ``"stream"`` keeps each block's codes as the BSR layer stores them;
    ``"shift_major"`` reorders them within the block (``quant_codes.reorder_block_words``:
    word w's shift p holds the group's input row ``p Wg + w``) so that the batch-1 kernel
    reads x as given, with no reordered copy of x made per call (one launch fewer); the other
    routes put the codes back in stream order inside the program (:func:`unpack_bsr`).
    ``x_dtype``: None (the kernel reads x in its own dtype) or ``"float32"`` (shift-major
    codes only: the batch-1 route casts x to float32 for the kernel and the product back to
    x's dtype, so the kernel does not widen x; see the module docstring).

    Raises:
      ValueError: `b` is not a valid BSR layer, its rows keep different numbers of blocks, its
        scales are not 16-bit floats, ``code_order`` is not one of ``CODE_ORDERS``, or
        ``x_dtype`` is not None or "float32" (or is "float32" with stream-order codes).
    """
    if code_order not in CODE_ORDERS:
        raise ValueError(f"code_order={code_order!r} must be one of {CODE_ORDERS}")
    if x_dtype not in X_DTYPES:
        raise ValueError(f"x_dtype={x_dtype!r} must be one of {X_DTYPES}")
    if x_dtype is not None and code_order != "shift_major":
        raise ValueError(f"x_dtype={x_dtype!r} needs code_order='shift_major' (stream-order "
                         "codes run on the wrapper's float32 copy of x already)")
    if not is_bsr(b):
        raise ValueError(f"{name} must be a BSRQuantizedLinear, got {type(b).__name__}")
    check_bsr(b, name)
    if b.row_blocks <= 0:
        raise ValueError(f"{name}: packed layers need every row to keep the same number of "
                         "blocks (row_blocks > 0, row-scope pruning)")
    if not can_pack(b):
        raise ValueError(f"{name}: packed layers need float16 or bfloat16 scales, got "
                         f"{b.scales.dtype}")
    codes = (b.codes if code_order == "stream"
             else reorder_block_words(b.codes, b.bits, code_order))
    return PackedBSRLinear(pack_blocks(codes, b.scales, b.zeros, b.col_idx), b.row_ptr,
                           b.row_ids, in_features=b.in_features, bits=b.bits,
                           group_size=b.group_size, sym=b.sym, dtype=b.dtype,
                           row_blocks=b.row_blocks, nnz=int(b.nnz),
                           scale_dtype=jnp.dtype(b.scales.dtype).name, code_order=code_order,
                           x_dtype=x_dtype)


def to_packed_bsr_params(params, code_order: str = "stream", x_dtype: Optional[str] = None):
    """`params` with every BSR kernel that :func:`can_pack` takes replaced by its
    :func:`to_packed_bsr` layout (concrete params; host side; ``code_order`` and ``x_dtype``
    as there). Other leaves are unchanged."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_bsr)[0]
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)  # noqa: E731
    converted = {name(p): to_packed_bsr(l, name(p), code_order, x_dtype) for p, l in flat
                 if can_pack(l)}
    return jax.tree_util.tree_map_with_path(lambda p, l: converted.get(name(p), l), params,
                                            is_leaf=is_bsr)


def unpack_bsr(p: PackedBSRLinear) -> BSRQuantizedLinear:
    """The BSR layer of `p` (jnp; traceable: inside a jitted program the arrays are slices of
    the packed one)."""
    codes, scales, zeros, col_idx = unpack_blocks(p.packed, p.nnz, p.scale_dtype)
    if p.code_order != "stream":
        codes = reorder_block_words(codes, p.bits, "stream")
    return BSRQuantizedLinear(codes, scales, zeros, col_idx, p.row_ptr, p.row_ids,
                              in_features=p.in_features, bits=p.bits, group_size=p.group_size,
                              sym=p.sym, dtype=p.dtype, row_blocks=p.row_blocks)


def packed_bsr_matmul(x: jax.Array, p: PackedBSRLinear, impl: str = "auto",
                      layer=None) -> jax.Array:
    """``x @ W`` for x [..., K], in x's dtype: the packed kernel
    (``pallas_kernels.bsr_quant_matmul.bsr_quant_matmul_packed``) where
    :func:`~optgqa_jax.sparse.bsr_matmul` would take the BSR kernel (``impl="pallas"``, or
    ``"auto"`` on GPUs for bfloat16/float16 x of at most ``KERNEL_MAX_ROWS`` rows), and
    :func:`~optgqa_jax.sparse.bsr_matmul` on :func:`unpack_bsr` elsewhere (same ``impl``).
    ``layer``: None, or the layer's index when `p`'s arrays stack several layers
    (``optgqa_jax.layer_stack``): the kernel reads that layer's rows in place; the other
    routes use the layer's slice. A layer packed with ``x_dtype="float32"`` gives the kernel
    x cast to float32 and casts the product back to x's dtype."""
    from pallas_kernels import _common as kc
    from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_packed
    stack = None
    if layer is not None:
        from optgqa_jax.layer_stack import take_layer
        stack, p = p, take_layer(p, layer)
    K, N = p.shape
    how = sparse_impl(x, K, impl, KERNEL_MAX_ROWS, "packed BSR layer", 1)
    if how != "pallas":
        return bsr_matmul(x, unpack_bsr(p), impl)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K) if p.x_dtype is None else x.reshape(-1, K).astype(p.x_dtype)
    y = bsr_quant_matmul_packed(x2, (p if stack is None else stack).packed,
                                nnz=p.nnz, layer=layer,
                                scale_dtype=p.scale_dtype, out_features=N, bits=p.bits,
                                group_size=p.group_size, row_blocks=p.row_blocks,
                                code_order=p.code_order, interpret=kc.backend() == "cpu")
    return y.astype(x.dtype).reshape(*lead, N)
