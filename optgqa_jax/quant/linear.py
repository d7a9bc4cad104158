"""QuantizedLinear: a quantized weight matrix as a jit-friendly pytree.

A ``QuantizedLinear`` stands wherever the model has a float kernel ``[D_in, D_out]``
(``params[...]["kernel"]``); the model multiplies by its dequantized weight.

Storage (G groups, b bits; the layout of GPTQ checkpoints' ``qweight``/``scales``/``g_idx``):

* ``qweight`` int32 [D_in * b / 32, D_out]: codes packed along the input dimension
  (``optgqa_jax.quant.packing``);
* ``scales`` [G, D_out] in ``QuantConfig.scale_dtype`` (float16 by default);
* ``zeros`` uint8 [G, D_out]: the integer zero points themselves (not packed, not minus one;
  the Hugging Face export packs them and applies the format's offset);
* ``g_idx`` int32 [D_in]: the group of each input row (not monotone after act-order).

Dequantization: ``w_hat[i, o] = scales[g, o] * (q[i, o] - zeros[g, o])`` with ``g = g_idx[i]``.
``bits``, ``group_size``, ``sym`` and the model ``dtype`` are static metadata (part of
the tree structure, so a jitted function recompiles only when they change).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.packing import pack, unpack


@flax.struct.dataclass
class QuantizedLinear:
    """Packed integer weights of one linear layer (see the module docstring for the layout)."""

    qweight: jax.Array  # int32 [D_in * bits / 32, D_out]
    scales: jax.Array   # [G, D_out]
    zeros: jax.Array    # uint8 [G, D_out]
    g_idx: jax.Array    # int32 [D_in]
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    sym: bool = flax.struct.field(pytree_node=False, default=True)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    # Whether g_idx[i] == i // group_size (or group_size == -1): the kernel then computes each
    # row's group instead of reading g_idx. False is always safe (g_idx is read).
    groups_contiguous: bool = flax.struct.field(pytree_node=False, default=False)
    # None, or int32 [D_in] after sort_groups: stored row i is logical input row perm[i]
    # (act-order rows sorted by group, so the groups are contiguous in storage); the product
    # then reads x[..., perm]. g_idx stays in logical row order.
    perm: Optional[jax.Array] = None

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight shape (D_in, D_out), as the float kernel it replaces."""
        return (self.g_idx.shape[0], self.qweight.shape[1])

    @property
    def num_groups(self) -> int:
        """Quantization groups along the input features (rows of ``scales``)."""
        return self.scales.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes stored (packed codes, scales, zeros, g_idx)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.qweight, self.scales, self.zeros, self.g_idx))

    def codes(self) -> jax.Array:
        """Unpacked integer codes, int32 [D_in, D_out], in logical row order."""
        c = unpack(self.qweight, self.bits, self.shape[0])
        return c if self.perm is None else c[jnp.argsort(self.perm)]


def contiguous_groups(g_idx, group_size: int) -> Optional[bool]:
    """Whether a concrete `g_idx` is ``i // group_size`` (any g_idx of one group is); None
    when `g_idx` is traced."""
    if isinstance(g_idx, jax.core.Tracer):
        return None
    g = np.asarray(g_idx)
    if group_size == -1:
        return bool((g == 0).all())
    return bool(np.array_equal(g, np.arange(g.shape[0]) // group_size))


def from_codes(codes, scales, zeros, g_idx, qc: QuantConfig, dtype) -> QuantizedLinear:
    """Build a :class:`QuantizedLinear` from unpacked codes [D_in, D_out] and grids [G, D_out]."""
    codes = jnp.asarray(codes)
    # Decided from the config, so a traced and a concrete build agree: without act-order (or
    # with one group per channel) the groups are contiguous by construction.
    contiguous = not qc.act_order or qc.group_size == -1
    return QuantizedLinear(
        qweight=pack(codes.astype(jnp.int32), qc.bits),
        scales=jnp.asarray(scales).astype(qc.scale_dtype),
        zeros=jnp.asarray(zeros).astype(jnp.uint8),
        g_idx=jnp.asarray(g_idx, jnp.int32),
        bits=qc.bits, group_size=qc.group_size, sym=qc.sym, dtype=jnp.dtype(dtype).name,
        groups_contiguous=contiguous)


def dequantize(ql: QuantizedLinear, dtype=None) -> jax.Array:
    """The float weight [D_in, D_out] of `ql` (in `dtype`, default the model dtype it replaces)."""
    q = ql.codes().astype(jnp.float32)                      # [D_in, D_out]
    s = ql.scales.astype(jnp.float32)[ql.g_idx]             # [D_in, D_out]
    z = ql.zeros.astype(jnp.float32)[ql.g_idx]
    return (s * (q - z)).astype(dtype or ql.dtype)


def lookup_columns(ql: QuantizedLinear, ids: jax.Array, dtype=None) -> jax.Array:
    """Columns ``ids`` of the dequantized weight, as rows: ``dequantize(ql).T[ids]``, float
    [..., D_in] for int ids [...], reading only those columns' codes and grids.

    This is the embedding lookup of a quantized token table, which is stored as the LM
    head is, ``[D, V]`` (``QuantConfig.quantize_embedding``): a token's row of the table is
    one output column, its groups run along the model dimension.
    """
    flat = jnp.reshape(ids, (-1,))                              # [n]
    q = unpack(jnp.take(ql.qweight, flat, axis=1), ql.bits, ql.shape[0])  # [D_in, n]
    if ql.perm is not None:
        q = q[jnp.argsort(ql.perm)]
    s = jnp.take(ql.scales, flat, axis=1).astype(jnp.float32)[ql.g_idx]   # [D_in, n]
    z = jnp.take(ql.zeros, flat, axis=1).astype(jnp.float32)[ql.g_idx]
    rows = (s * (q.astype(jnp.float32) - z)).T                  # [n, D_in]
    return rows.reshape(*jnp.shape(ids), ql.shape[0]).astype(dtype or ql.dtype)


MATMUL_IMPLS = ("auto", "pallas", "dequantize", "dequantize_kernel")


# impl="auto" runs the fused kernel up to this many rows of x and "dequantize_kernel" above,
# unless the device's tuning table holds fused tiles measured faster than that route for the
# shape's row bucket (quant_matmul_config.fused_measured_faster). On an H200 (jax 0.11.2,
# commit bfc3e84, experiments/results/h200/quant/bench_quant_bfc3e84.md), 4 bits in groups of
# 128: at 64 rows the fused kernel beat the Pallas dequantize + bfloat16 product on all four
# Llama-3-8B shapes (gate/up 98.5 against 151.6 µs), at 256 rows it lost on all four (gate/up
# 273.5 against 182.6; q/k/v 64.8 against 48.9). XLA's dequantize-then-multiply was slower than
# both at 64 and 256 rows. On an H100 (commit 5b427eb, experiments/results/h100/quant/
# tune_quant_256_5b427eb.md) a tile search at 256 and 512 rows found fused tiles faster than the
# dequantize route for one shape only, down (14336 x 4096) at 256 rows (94.7 against 114.9 µs);
# that entry is in the packaged table. Rows between the buckets are not measured.
KERNEL_MAX_ROWS = 64


def matmul(x: jax.Array, ql: QuantizedLinear, impl: str = "auto", out_dtype=None,
           layer=None) -> jax.Array:
    """``x @ dequantize(ql)`` for x [..., D_in], in ``out_dtype`` (default x's dtype; float32
    accumulation either way, so ``out_dtype=float32`` gives unrounded sums, e.g. logits).

    ``layer``: None, or the index of the layer when `ql`'s arrays stack several layers
    (``optgqa_jax.layer_stack``): the kernel reads that layer's rows of the stack in place; the
    other routes use the layer's slice of it.

    ``impl``:

    * ``"pallas"``: the dequantizing Pallas kernel (``pallas_kernels.quant_matmul``: codes read
      packed, dequantized in registers; in interpret mode on a CPU);
    * ``"dequantize"``: XLA builds the float weight and multiplies;
    * ``"dequantize_kernel"``: the streaming Pallas kernel ``pallas_kernels.dequant`` writes
      the float weight (each word read once, each weight written once), then the plain float
      product (cuBLAS on NVIDIA);
    * ``"auto"`` (default): on GPUs with bfloat16/float16 x and 2-, 4- or 8-bit codes, the
      fused kernel up to ``KERNEL_MAX_ROWS`` rows of x (decode) and ``"dequantize_kernel"``
      above (prefill), where the layer's format allows it; above ``KERNEL_MAX_ROWS`` rows the
      fused kernel too where the device's tuning table has tiles for the shape's row bucket
      that were timed faster than the dequantize route
      (``pallas_kernels.quant_matmul_config.fused_measured_faster``); ``"dequantize"``
      everywhere else (CPUs, float32, 3 bits).

    Raises:
      ValueError: an unknown ``impl``; ``"pallas"`` with 3-bit codes; ``"dequantize_kernel"``
        with a format the kernel does not take.
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {MATMUL_IMPLS}")
    stack = None
    if layer is not None:   # the layer's own arrays (XLA drops the slices the kernel skips)
        from optgqa_jax.layer_stack import take_layer
        stack, ql = ql, take_layer(ql, layer)
    from pallas_kernels import _common as kc
    from pallas_kernels import dequant as kdq
    from pallas_kernels.quant_matmul import KERNEL_BITS, quant_matmul
    from pallas_kernels.quant_matmul_config import fused_measured_faster
    # the streaming dequantize kernel takes rows stored in group order, in groups it can tile
    dequant_kernel_ok = ql.groups_contiguous and kdq.supported(ql.bits, ql.group_size)
    if impl == "auto":
        rows = int(np.prod(x.shape[:-1]))
        gpu_format = (kc.backend() != "cpu" and ql.bits in KERNEL_BITS
                      and jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))
        if gpu_format and (rows <= KERNEL_MAX_ROWS or fused_measured_faster(
                kc.device_kind(), rows, ql.shape[0], ql.shape[1], ql.bits, ql.group_size)):
            impl = "pallas"
        elif gpu_format and dequant_kernel_ok:
            impl = "dequantize_kernel"
        else:
            impl = "dequantize"
    if impl == "dequantize":
        return jnp.dot(x, dequantize(ql, x.dtype), preferred_element_type=out_dtype)
    if impl == "dequantize_kernel" and not dequant_kernel_ok:
        raise ValueError(f"impl='dequantize_kernel' takes {kdq.DEQUANT_BITS}-bit codes in "
                         "groups of a power of two (or per channel) stored in group order; "
                         f"got bits={ql.bits}, group_size={ql.group_size}, "
                         f"groups_contiguous={ql.groups_contiguous}")
    if ql.perm is not None:  # rows stored sorted by group: permute the activations instead
        x = jnp.take(x, ql.perm, axis=-1)
    if impl == "dequantize_kernel":
        w = kdq.dequantize_packed(ql.qweight, ql.scales, ql.zeros, bits=ql.bits,
                                  group_size=ql.group_size, K=ql.shape[0], dtype=x.dtype,
                                  interpret=kc.backend() == "cpu")
        return jnp.dot(x, w, preferred_element_type=out_dtype)
    lead, (d_in, d_out) = x.shape[:-1], ql.shape
    w = ql if stack is None else stack       # a stack is read in place by the kernel
    y = quant_matmul(x.reshape(-1, d_in), w.qweight, w.scales, w.zeros, bits=ql.bits,
                     group_size=ql.group_size,
                     g_idx=None if ql.groups_contiguous else ql.g_idx,
                     interpret=kc.backend() == "cpu", out_dtype=out_dtype, layer=layer)
    return y.reshape(*lead, d_out)


def sort_groups(ql: QuantizedLinear) -> QuantizedLinear:
    """The same layer with its rows stored sorted by group (act-order checkpoints).

    GPTQ with act-order forms groups in the order of decreasing Hessian diagonal, so a group's
    rows are scattered over the input and ``g_idx`` is not monotone. Like the fast CUDA GPTQ
    kernels, this sorts the rows once (at load time) so that every group is contiguous in
    storage, records the permutation in ``perm`` and lets the product permute the activations
    (``x[..., perm]``, cheap for decode) instead of gathering a scale and zero per row.
    Layers whose groups are already contiguous, or whose sorted groups would not all hold
    ``group_size`` rows, are returned unchanged (the kernel then reads ``g_idx``).
    ``dequantize``, ``codes``, checkpoints and the Hugging Face export see the logical rows.

    Raises:
      ValueError: a traced ``g_idx`` (call it on concrete params, outside ``jit``).
    """
    if ql.groups_contiguous or ql.perm is not None:
        return ql
    if isinstance(ql.g_idx, jax.core.Tracer):
        raise ValueError("sort_groups needs concrete params (call it outside jax.jit)")
    g = np.asarray(ql.g_idx)
    perm = np.argsort(g, kind="stable")
    if ql.group_size == -1 or not np.array_equal(g[perm], np.arange(g.shape[0]) // ql.group_size):
        return ql
    codes = unpack(ql.qweight, ql.bits, ql.shape[0])[jnp.asarray(perm)]
    return ql.replace(qweight=pack(codes, ql.bits), groups_contiguous=True,
                      perm=jnp.asarray(perm, jnp.int32))


def unsort_groups(ql: QuantizedLinear) -> QuantizedLinear:
    """Inverse of :func:`sort_groups`: rows back in logical order (what files store)."""
    if ql.perm is None:
        return ql
    return ql.replace(qweight=pack(ql.codes(), ql.bits), perm=None,
                      groups_contiguous=bool(contiguous_groups(ql.g_idx, ql.group_size)))


def prepare_for_kernels(params):
    """`params` with every quantized kernel passed through :func:`sort_groups` (the Engine
    does this when it serves on a GPU)."""
    return jax.tree_util.tree_map(lambda l: sort_groups(l) if is_quantized(l) else l, params,
                                  is_leaf=is_quantized)


def concat_outputs(parts: Sequence[QuantizedLinear]) -> QuantizedLinear:
    """Concatenate layers that read the same input along D_out (fused q/k/v, gate/up).

    Raises:
      ValueError: the parts differ in bits, group size, symmetry, dtype or ``g_idx``
        (act-order layers quantized with different Hessians cannot share one ``g_idx``).
    """
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.sym, p.dtype) != (first.bits, first.group_size, first.sym,
                                                      first.dtype):
            raise ValueError("cannot fuse quantized layers with different bits/group_size/sym/"
                             f"dtype: {(p.bits, p.group_size, p.sym, p.dtype)} vs "
                             f"{(first.bits, first.group_size, first.sym, first.dtype)}")
        if not isinstance(p.g_idx, jax.core.Tracer) and not np.array_equal(
                np.asarray(p.g_idx), np.asarray(first.g_idx)):
            raise ValueError("cannot fuse quantized layers whose g_idx differ (act-order "
                             "layers quantized with different Hessians); serve them unfused")
    cat = lambda name: jnp.concatenate([getattr(p, name) for p in parts], axis=1)
    return first.replace(qweight=cat("qweight"), scales=cat("scales"), zeros=cat("zeros"))


def split_outputs(ql: QuantizedLinear, sizes: Sequence[int]) -> list[QuantizedLinear]:
    """Inverse of :func:`concat_outputs`: split D_out into parts of the given sizes."""
    if sum(sizes) != ql.shape[1]:
        raise ValueError(f"sizes {list(sizes)} do not add up to D_out={ql.shape[1]}")
    cuts = np.cumsum(sizes)[:-1].tolist()
    sp = lambda a: jnp.split(a, cuts, axis=1)
    return [ql.replace(qweight=q, scales=s, zeros=z)
            for q, s, z in zip(sp(ql.qweight), sp(ql.scales), sp(ql.zeros))]


def is_quantized(x) -> bool:
    """Whether `x` is a :class:`QuantizedLinear` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, QuantizedLinear)
