"""BSRQuantizedLinear: group-sparse 4-bit weights in Block Sparse Row form (GQSA's format).

A pruned layer keeps, per output feature ``n`` (a *row* of the paper's ``W`` [D_out, D_in]),
some of its ``G = K / gs`` quantization groups. Only the kept groups are stored, row by row,
with their columns ascending (CSR over blocks of ``1 x gs`` weights):

* ``row_ptr`` int32 [N + 1]: row ``n``'s blocks are ``row_ptr[n] : row_ptr[n + 1]``;
* ``col_idx`` int32 [nnz]: the group (block column) ``g`` of each block, ascending in a row;
* ``codes`` int32 [nnz, gs * b / 32]: the block's ``gs`` codes packed as in ``qweight``
  (input ``g gs + k`` at bits ``b (k mod P)`` of word ``k / P``, P = 32 / b codes per word);
* ``scales`` [nnz] (float16 by default) and ``zeros`` uint8 [nnz]: the block's grid;
* ``row_ids`` int32 [nnz]: the row of each block (from ``row_ptr``; kept for the kernel).

``W[g gs + k, n] = scales[t] (code[t, k] - zeros[t])`` for the block ``t`` of row ``n`` with
``col_idx[t] = g``; absent blocks are zeros. :func:`to_bsr` converts a dense
``QuantizedLinear`` (pruned groups dropped), :func:`to_dense` converts back (absent groups
written as codes 0, zero 0, scale 0), :func:`bsr_matmul` multiplies (the Pallas kernel
``pallas_kernels.bsr_quant_matmul`` on GPUs), :func:`save_bsr`/:func:`load_bsr` use orbax.
Conversions are host-side bookkeeping on concrete arrays (numpy), not traced.
"""

from __future__ import annotations

import json
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.quant.linear import QuantizedLinear, contiguous_groups

BSR_BITS = (2, 4, 8)


@flax.struct.dataclass
class BSRQuantizedLinear:
    """Kept quantization groups of one linear layer in Block Sparse Row form (module docstring)."""

    codes: jax.Array     # int32 [nnz, group_size * bits / 32]
    scales: jax.Array    # [nnz]
    zeros: jax.Array     # uint8 [nnz]
    col_idx: jax.Array   # int32 [nnz]
    row_ptr: jax.Array   # int32 [N + 1]
    row_ids: jax.Array   # int32 [nnz]
    in_features: int = flax.struct.field(pytree_node=False, default=0)
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    sym: bool = flax.struct.field(pytree_node=False, default=True)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    # Blocks per row when every row keeps the same number (row-scope pruning), else -1: the
    # product then adds each row's partial sums with a reshape instead of a segment sum.
    row_blocks: int = flax.struct.field(pytree_node=False, default=-1)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight shape (D_in, D_out)."""
        return (self.in_features, self.row_ptr.shape[0] - 1)

    @property
    def num_groups(self) -> int:
        """Quantization groups per output row of the dense layer (``in_features // group_size``)."""
        return self.in_features // self.group_size

    @property
    def nnz(self) -> int:
        """Number of stored (kept) groups."""
        return self.codes.shape[0]

    @property
    def density(self) -> float:
        """Fraction of groups kept."""
        K, N = self.shape
        return self.nnz / max(1, self.num_groups * N)

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes, scales, zeros, column indices, row pointers; not row_ids,
        which the kernel could recompute)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.codes, self.scales, self.zeros, self.col_idx, self.row_ptr))


def is_bsr(x) -> bool:
    """Whether `x` is a :class:`BSRQuantizedLinear` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, BSRQuantizedLinear)


def check_bsr(b: BSRQuantizedLinear, name: str = "bsr") -> None:
    """Raise ValueError (naming the field) unless `b` is a well-formed BSR layer: shapes and
    dtypes agree, ``row_ptr`` starts at 0, never decreases and ends at nnz, ``col_idx`` lies in
    ``[0, G)`` and strictly ascends within each row, ``row_ids`` matches ``row_ptr``. Index
    checks need concrete arrays (they are skipped for traced ones)."""
    if b.bits not in BSR_BITS:
        raise ValueError(f"{name}.bits={b.bits!r} must be one of {BSR_BITS}")
    gs, K = b.group_size, b.in_features
    if not isinstance(gs, (int, np.integer)) or gs < 1 or (gs * b.bits) % 32:
        raise ValueError(f"{name}.group_size={gs!r} must be positive with group_size * bits a "
                         "multiple of 32 (whole int32 words per group)")
    if K < 0 or K % gs:
        raise ValueError(f"{name}.in_features={K} must be a multiple of group_size={gs}")
    nnz, words = b.codes.shape[0], gs * b.bits // 32
    if b.codes.ndim != 2 or b.codes.shape[1] != words or b.codes.dtype != jnp.int32:
        raise ValueError(f"{name}.codes must be int32 [nnz, {words}], got {b.codes.dtype} "
                         f"{tuple(b.codes.shape)}")
    for field, arr, dt in (("scales", b.scales, None), ("zeros", b.zeros, jnp.uint8),
                           ("col_idx", b.col_idx, jnp.int32), ("row_ids", b.row_ids, jnp.int32)):
        if arr.shape != (nnz,) or (dt is not None and arr.dtype != dt):
            raise ValueError(f"{name}.{field} must have shape [nnz]=({nnz},)"
                             f"{'' if dt is None else ' and dtype ' + jnp.dtype(dt).name}, got "
                             f"{arr.dtype} {tuple(arr.shape)}")
    if not jnp.issubdtype(b.scales.dtype, jnp.floating):
        raise ValueError(f"{name}.scales must be floating point, got {b.scales.dtype}")
    if b.row_ptr.ndim != 1 or b.row_ptr.shape[0] < 1 or b.row_ptr.dtype != jnp.int32:
        raise ValueError(f"{name}.row_ptr must be int32 [N + 1], got {b.row_ptr.dtype} "
                         f"{tuple(b.row_ptr.shape)}")
    if any(isinstance(a, jax.core.Tracer) for a in (b.row_ptr, b.col_idx, b.row_ids)):
        return
    ptr, col, rid = (np.asarray(a) for a in (b.row_ptr, b.col_idx, b.row_ids))
    if ptr[0] != 0 or ptr[-1] != nnz or (np.diff(ptr) < 0).any():
        raise ValueError(f"{name}.row_ptr must start at 0, never decrease and end at nnz={nnz}; "
                         f"got first {ptr[0]}, last {ptr[-1]}")
    G = K // gs
    if nnz and (col.min() < 0 or col.max() >= G):
        raise ValueError(f"{name}.col_idx values must lie in [0, G={G}), got "
                         f"[{col.min()}, {col.max()}]")
    rows = np.repeat(np.arange(ptr.shape[0] - 1, dtype=np.int32), np.diff(ptr))
    same_row = rows[1:] == rows[:-1]
    if (same_row & (np.diff(col) <= 0)).any():
        t = int(np.nonzero(same_row & (np.diff(col) <= 0))[0][0])
        raise ValueError(f"{name}.col_idx must strictly ascend within a row: row {rows[t]} has "
                         f"group {col[t]} before {col[t + 1]} (unsorted or repeated)")
    if not np.array_equal(rid, rows):
        raise ValueError(f"{name}.row_ids does not match row_ptr")
    if b.row_blocks != -1 and not (np.diff(ptr) == b.row_blocks).all():
        raise ValueError(f"{name}.row_blocks={b.row_blocks}, but rows hold different numbers "
                         "of blocks")


def from_arrays(codes, scales, zeros, col_idx, row_ptr, *, in_features: int, bits: int = 4,
                group_size: int = 128, sym: bool = True, dtype="float32",
                name: str = "bsr") -> BSRQuantizedLinear:
    """Build and check a :class:`BSRQuantizedLinear` from its stored arrays (``row_ids``
    derived from ``row_ptr``)."""
    row_ptr = np.asarray(row_ptr)
    if row_ptr.ndim != 1 or row_ptr.shape[0] < 1 or (np.diff(row_ptr) < 0).any():
        raise ValueError(f"{name}.row_ptr must be a non-decreasing [N + 1] vector")
    rows = np.repeat(np.arange(row_ptr.shape[0] - 1, dtype=np.int32), np.diff(row_ptr))
    counts = np.unique(np.diff(row_ptr))
    row_blocks = int(counts[0]) if counts.size == 1 and counts[0] > 0 else -1
    b = BSRQuantizedLinear(codes=jnp.asarray(codes), scales=jnp.asarray(scales),
                           zeros=jnp.asarray(zeros), col_idx=jnp.asarray(col_idx),
                           row_ptr=jnp.asarray(row_ptr, jnp.int32), row_ids=jnp.asarray(rows),
                           in_features=int(in_features), bits=int(bits),
                           group_size=int(group_size), sym=bool(sym),
                           dtype=jnp.dtype(dtype).name,
                           row_blocks=row_blocks)
    check_bsr(b, name)
    return b


def _group_words(ql: QuantizedLinear) -> np.ndarray:
    """int32 [N, G, gs * b / 32]: each group's packed words (the qweight rows of the group)."""
    K, N = ql.shape
    G, W = K // ql.group_size, ql.group_size * ql.bits // 32
    return np.asarray(ql.qweight).reshape(G, W, N).transpose(2, 0, 1)


def to_bsr(ql: QuantizedLinear, keep=None, name: str = "layer") -> BSRQuantizedLinear:
    """Store the kept groups of a dense ``QuantizedLinear`` in BSR form.

    Args:
      ql: contiguous groups (no act-order permutation), 2, 4 or 8 bits, a group size whose
        codes fill whole int32 words.
      keep: optional bool [G, N] mask of the groups to store; by default every group whose
        dequantized weights are not all zero.

    Raises:
      ValueError: per-channel grids, act-order layers, 3-bit codes, a bad mask.
    """
    K, N = ql.shape
    gs = ql.group_size
    if ql.bits not in BSR_BITS:
        raise ValueError(f"{name}: bits={ql.bits} cannot be stored as BSR (codes must fill "
                         f"int32 words: {BSR_BITS})")
    if gs == -1 or gs < 1 or K % gs or (gs * ql.bits) % 32:
        raise ValueError(f"{name}: group_size={gs} must divide D_in={K} with group_size * bits "
                         "a multiple of 32 (per-channel grids have no groups to drop)")
    if ql.perm is not None or not bool(contiguous_groups(ql.g_idx, gs)):
        raise ValueError(f"{name}: BSR needs contiguous groups (g_idx = i // group_size, no "
                         "act-order)")
    scales, zeros = np.asarray(ql.scales), np.asarray(ql.zeros)               # [G, N]
    keep = kept_groups(ql, keep, name)
    kt = keep.T                                                              # [N, G]
    n_idx, g_idx = np.nonzero(kt)                                            # row-major order
    words = _group_words(ql)[n_idx, g_idx]                                   # [nnz, W]
    row_ptr = np.concatenate([[0], np.cumsum(kt.sum(axis=1))]).astype(np.int32)
    return from_arrays(words.astype(np.int32), scales.T[n_idx, g_idx], zeros.T[n_idx, g_idx],
                       g_idx.astype(np.int32), row_ptr, in_features=K, bits=ql.bits,
                       group_size=gs, sym=ql.sym, dtype=ql.dtype, name=name)


def kept_groups(ql: QuantizedLinear, keep=None, name: str = "layer") -> np.ndarray:
    """bool [G, N]: `keep` checked, or by default the groups of `ql` (contiguous groups of
    ``ql.group_size``) whose dequantized weights are not all zero.

    Raises:
      ValueError: `keep` is not bool [G, N].
    """
    K, N = ql.shape
    gs = ql.group_size
    G = K // gs
    if keep is None:
        from optgqa_jax.quant.linear import dequantize
        w = np.asarray(dequantize(ql, jnp.float32)).reshape(G, gs, N)
        keep = (w != 0).any(axis=1)
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.shape != (G, N):
        raise ValueError(f"{name}: keep must be bool [G, N] = [{G}, {N}], got {keep.dtype} "
                         f"{keep.shape}")
    return keep


def kept_mask(b: BSRQuantizedLinear) -> np.ndarray:
    """bool [G, N]: which groups `b` stores."""
    K, N = b.shape
    keep = np.zeros((N, K // b.group_size), bool)
    keep[np.asarray(b.row_ids), np.asarray(b.col_idx)] = True
    return keep.T


def to_dense(b: BSRQuantizedLinear) -> QuantizedLinear:
    """The dense ``QuantizedLinear`` of `b`; absent groups are codes 0, zero 0, scale 0."""
    check_bsr(b)
    K = b.shape[0]
    qweight, scales, zeros = repacked_dense(b)
    return QuantizedLinear(
        qweight=qweight, scales=scales, zeros=zeros,
        g_idx=jnp.asarray(np.arange(K) // b.group_size, jnp.int32), bits=b.bits,
        group_size=b.group_size, sym=b.sym, dtype=b.dtype, groups_contiguous=True)


def dequantize_bsr(b: BSRQuantizedLinear, dtype=None) -> jax.Array:
    """The float weight [K, N] of `b` (jnp; traceable): scatter of the kept groups."""
    from pallas_kernels.bsr_quant_matmul import dequantize_blocks
    K, N = b.shape
    G, gs = K // b.group_size, b.group_size
    dtype = jnp.dtype(dtype or b.dtype)
    blocks = dequantize_blocks(b.codes, b.scales, b.zeros, b.bits, gs)      # [nnz, gs] f32
    # scattered in the output dtype: the same values as a float32 scatter cast afterwards
    dense = jnp.zeros((N, G, gs), dtype).at[b.row_ids, b.col_idx].set(blocks.astype(dtype),
                                                                      **_SORTED_UNIQUE)
    return dense.reshape(N, K).T


REPACK_METHODS = ("scatter", "gather")


def repacked_dense(b: BSRQuantizedLinear, method: str = "scatter"
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(qweight int32 [K * b / 32, N], scales [G, N], zeros uint8 [G, N]) of `b` as the dense
    kernel's layout, traceable (jnp): :func:`to_dense`'s arrays, made on the device; absent
    groups are codes 0, zero 0 and scale 0, so they dequantize to exact zeros. This writes 4
    bits per weight where :func:`dequantize_bsr` writes 16 (and computes float32 blocks before
    that).

    ``method``: ``"scatter"`` puts the kept groups' packed words whole into a zero [N, G, W]
    array and transposes it once; ``"gather"`` (layers whose rows keep the same number R of
    groups, ``row_blocks > 0``) writes the dense layout directly, each (group, feature) reading
    its block, found by counting the feature's kept groups below it: no zero fill, no
    scatter, no separate transpose. Both give the same arrays bit for bit; which is faster
    is measured by ``experiments/gqsa_eval.py --part speed`` at more than one row.

    Raises:
      ValueError: an unknown `method`, or ``"gather"`` for a layer whose rows differ.
    """
    if method not in REPACK_METHODS:
        raise ValueError(f"method={method!r} must be one of {REPACK_METHODS}")
    K, N = b.shape
    G, W = K // b.group_size, b.group_size * b.bits // 32
    if method == "gather":
        if b.row_blocks <= 0:
            raise ValueError("method='gather' needs every row to keep the same number of groups "
                             f"(row_blocks > 0), got row_blocks={b.row_blocks}")
        R = b.row_blocks
        col = b.col_idx.reshape(N, R)                                          # [N, R]
        g = jnp.arange(G, dtype=jnp.int32)
        r = jnp.minimum(jnp.sum(col[:, None, :] < g[None, :, None], axis=-1), R - 1)  # [N, G]
        found = jnp.take_along_axis(col, r, axis=1) == g[None, :]              # [N, G] kept
        t = (jnp.arange(N, dtype=jnp.int32)[:, None] * R + r).T                # [G, N] block
        words = jnp.where(found.T[:, None, :], jnp.swapaxes(b.codes[t], 1, 2), 0)  # [G, W, N]
        scales = jnp.where(found.T, b.scales[t], jnp.zeros((), b.scales.dtype))
        zeros = jnp.where(found.T, b.zeros[t], jnp.zeros((), jnp.uint8))
        return words.reshape(G * W, N), scales, zeros
    at = (b.row_ids, b.col_idx)
    words = jnp.zeros((N, G, W), jnp.int32).at[at].set(b.codes, **_SORTED_UNIQUE)
    qweight = words.transpose(1, 2, 0).reshape(G * W, N)                  # [G * W, N]
    scales = jnp.zeros((N, G), b.scales.dtype).at[at].set(b.scales, **_SORTED_UNIQUE)
    zeros = jnp.zeros((N, G), jnp.uint8).at[at].set(b.zeros, **_SORTED_UNIQUE)
    return qweight, scales.T, zeros.T


# (row, group) pairs of a valid BSR layer are sorted and never repeat (check_bsr): told to XLA,
# its scatters need no handling of colliding updates
_SORTED_UNIQUE = dict(indices_are_sorted=True, unique_indices=True)


MATMUL_IMPLS = ("auto", "pallas", "repack", "gathered", "dequantize")
# impl="auto" runs the kernel up to this many rows of x. On an H200 (jax 0.11.2, commit 91177cd,
# experiments/results/h200/gqsa/) the kernel took 0.81-1.02x dense W4's time at one row but
# 4.6-15x at 16 rows (every row of x gathers its own group slices), so only one row for now.
KERNEL_MAX_ROWS = 1
# ... and from there up to this many rows the dense W4 kernel on the layer repacked each call
# (repacked_dense). The dequantizing route it replaces made 16-sequence decode of the
# Llama-3-8B shape with W4S30 weights run at 167 tokens/s against dense W4's 2,563 (H100,
# b4f2e9e, experiments/results/h100/gqsa/gqsa_engine_b4f2e9e.md): it computes every kept weight
# in float32 and scatters 16-bit weights each step, four times the bytes of the repacked codes,
# which the dense kernel then reads at 4 bits. Timed on an H200 (jax 0.11.2, commit b226bd5,
# experiments/results/h200/gqsa/gqsa_tune_b226bd5.md) at 16 rows, W4S50: 2.3-5.1x dense W4's
# time per layer (gate/up 289.6 against 56.6 µs), still faster than this kernel (4.1-8.9x), and
# the engine's 16-sequence decode 846 tokens/s against dense W4's 3,108
# (gqsa_engine_s50_b226bd5.md; W4S30 on the dequantizing route took 167 against 2,563 on an
# H100). Layers whose rows keep equal numbers of groups repack with the gather instead
# (repacked_dense(method="gather")): on an H100 (jax 0.11.2, commit 8035686,
# experiments/results/h100/gqsa/gqsa_tune_8035686.md) at 16 rows, W4S50, the product took
# 125.8 against 336.8 µs on gate/up, 81.0 against 160.3 on down, 33.5 against 72.2 on q/k/v
# and 25.9 against 47.5 on o (1.8-2.7x faster; still 1.8-2.9x dense W4).
REPACK_MAX_ROWS = 64
# Which route impl="auto" takes for 2 to REPACK_MAX_ROWS rows: "gathered" (the default:
# pallas_kernels.bsr_gather_quant_matmul, the kept blocks read in place on the dense kernel's
# tensor-core tiles through a block map, no repacked layout written) or "repack" (above). On
# an H100 (jax 0.11.2, commit 7364f16, experiments/results/h100/gqsa/gqsa_tune_7364f16.md) at
# 16 rows, W4S50, gathered against the gather repack in the same run: gate/up 67.2 against
# 129.4 µs, down 40.9 against 83.4, q/k/v 29.8 against 34.9 (o's row was cut by the step's
# time limit); still 1.20-1.36x dense W4's time. The engine's 16-sequence W4S50 decode on the
# gathered route ran at 2,222 tokens/s (gqsa_engine_gathered_7364f16.md), against 1,547 on
# the gather repack in an earlier run on another H100 (commit 544c0a0). Where the block-map
# kernel does not apply (8-bit codes with bfloat16 x) "auto" repacks. The environment
# variable lets a benchmark run the engine on either route without code changes.
BATCHED_ROUTE_ENV = "OPTGQA_BSR_BATCHED"
BATCHED_ROUTES = ("repack", "gathered")


def batched_route() -> str:
    """The route for 2 to ``REPACK_MAX_ROWS`` rows: ``$OPTGQA_BSR_BATCHED`` or "gathered".

    Raises:
      ValueError: the variable names another route.
    """
    route = os.environ.get(BATCHED_ROUTE_ENV, "gathered") or "gathered"
    if route not in BATCHED_ROUTES:
        raise ValueError(f"{BATCHED_ROUTE_ENV}={route!r} must be one of {BATCHED_ROUTES}")
    return route


def sparse_impl(x: jax.Array, in_features: int, impl: str, max_rows: int, what: str,
                repack_max_rows: int = 0) -> str:
    """How a group-sparse product of `x` runs: ``"pallas"`` (its kernel), ``"repack"`` (the
    dense kernel on the layer repacked, BSR only) or ``"dequantize"``. ``impl="auto"`` takes
    the kernel on GPUs for bfloat16/float16 x of at most `max_rows` rows, the repacked route up
    to `repack_max_rows` rows, and dequantizes elsewhere (CPUs, float32 x, prefill).

    Raises:
      ValueError: an unknown `impl`, or x without `in_features` features (`what` names the
        layer in the message).
    """
    allowed = (MATMUL_IMPLS if repack_max_rows
               else tuple(i for i in MATMUL_IMPLS if i not in ("repack", "gathered")))
    if impl not in allowed:
        raise ValueError(f"impl={impl!r} must be one of {allowed} for a {what}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the {what} {in_features}")
    if impl != "auto":
        return impl
    from pallas_kernels import _common as kc
    rows = int(np.prod(x.shape[:-1]))
    if kc.backend() == "cpu" or jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16),
                                                           jnp.dtype(jnp.float16)):
        return "dequantize"
    if rows <= max_rows:
        return "pallas"
    return "repack" if rows <= repack_max_rows else "dequantize"


def use_sparse_kernel(x: jax.Array, in_features: int, impl: str, max_rows: int,
                      what: str) -> bool:
    """Whether a group-sparse product of `x` takes its Pallas kernel (:func:`sparse_impl`
    without the repacked route)."""
    return sparse_impl(x, in_features, impl, max_rows, what) == "pallas"


def dequantized_product(x: jax.Array, w, dequantize) -> jax.Array:
    """``x @ dequantize(w, x.dtype)``, with the float weight made only once ``x`` exists.

    The float weight depends on the params alone, so XLA is free to compute every layer's
    before the first layer runs and to keep them all alive at once. An optimization barrier
    that ties ``w`` to ``x`` makes it when its layer runs instead. (The Llama-3-8B engine with
    W4S50 BSR weights peaked at 31 GiB for 3.8 GiB of params on an H100, commit 1de6b96, while
    its 256-token prefill dequantized the BSR layers; that is what this guards against.)
    """
    x, w = jax.lax.optimization_barrier((x, w))
    return jnp.dot(x, dequantize(w, x.dtype))


def bsr_matmul(x: jax.Array, b: BSRQuantizedLinear, impl: str = "auto") -> jax.Array:
    """``x @ dequantize_bsr(b)`` for x [..., K], in x's dtype.

    ``impl``: ``"pallas"`` runs ``pallas_kernels.bsr_quant_matmul`` (reads only the kept
    groups; interpret mode on a CPU); ``"repack"`` writes the kept groups' packed codes into
    the dense layout (:func:`repacked_dense`: the gather where every row keeps the same number
    of groups, else the scatter) and runs the dense ``quant_matmul`` kernel; ``"gathered"``
    runs ``pallas_kernels.bsr_gather_quant_matmul`` (the dense kernel's tensor-core tiles
    reading the kept blocks in place through a block map; bfloat16 x with 2 or 4 bits,
    float16 x with 2, 4 or 8); ``"dequantize"`` scatters the float weight and multiplies
    (XLA); ``"auto"`` takes the BSR kernel on GPUs for bfloat16/float16 x with at most
    ``KERNEL_MAX_ROWS`` rows (batch-1 decode), the block-map kernel up to ``REPACK_MAX_ROWS``
    (batched decode; the repacked route where it does not apply, or where the environment
    variable ``OPTGQA_BSR_BATCHED=repack`` asks, :func:`batched_route`), and dequantizes
    elsewhere (prefill, CPUs).
    """
    from pallas_kernels import _common as kc
    from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul
    K, N = b.shape
    how = sparse_impl(x, K, impl, KERNEL_MAX_ROWS, "BSR layer", REPACK_MAX_ROWS)
    if impl == "auto" and how == "repack" and batched_route() == "gathered":
        from pallas_kernels.bsr_gather_quant_matmul import supported
        how = "gathered" if supported(x.dtype, b.bits) else how
    if how == "dequantize":
        return dequantized_product(x, b, dequantize_bsr)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if how == "gathered":
        from pallas_kernels.bsr_gather_quant_matmul import bsr_gather_quant_matmul
        y = bsr_gather_quant_matmul(x2, b.codes, b.scales, b.zeros, b.col_idx, b.row_ids,
                                    out_features=N, bits=b.bits, group_size=b.group_size,
                                    interpret=kc.backend() == "cpu")
    elif how == "repack":
        from pallas_kernels.quant_matmul import quant_matmul
        x2, b = jax.lax.optimization_barrier((x2, b))   # repacked when its layer runs
        qweight, scales, zeros = repacked_dense(
            b, method="gather" if b.row_blocks > 0 else "scatter")
        y = quant_matmul(x2, qweight, scales, zeros, bits=b.bits, group_size=b.group_size,
                         interpret=kc.backend() == "cpu")
    else:
        y = bsr_quant_matmul(x2, b.codes, b.scales, b.zeros, b.col_idx, b.row_ids,
                             out_features=N, bits=b.bits, group_size=b.group_size,
                             row_blocks=b.row_blocks, interpret=kc.backend() == "cpu")
    return y.reshape(*lead, N)


def to_bsr_params(params):
    """`params` with every ``QuantizedLinear`` kernel stored as BSR (its all-zero groups, the
    pruned ones, dropped; :func:`to_bsr`). The model multiplies BSR kernels with
    :func:`bsr_matmul`. A quantized token table (``embed/embedding``, never pruned) stays a
    dense ``QuantizedLinear``. Call on concrete params (host-side conversion)."""
    from optgqa_jax.quant.linear import is_quantized
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
    converted = {name(p): to_bsr(l, name=name(p)) for p, l in flat
                 if is_quantized(l) and name(p) != "embed/embedding"}
    return jax.tree_util.tree_map_with_path(
        lambda p, l: converted.get(name(p), l), params, is_leaf=is_quantized)


_ARRAYS = ("codes", "scales", "zeros", "col_idx", "row_ptr")
_META_FILE = "bsr.json"


def save_bsr(path: str, b: BSRQuantizedLinear, *, overwrite: bool = False) -> str:
    """Write `b` to the directory `path` with orbax (arrays) and ``bsr.json`` (static fields,
    shapes). Returns the absolute path. Raises FileExistsError unless `overwrite`."""
    import orbax.checkpoint as ocp
    check_bsr(b)
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} already exists; pass overwrite=True")
    os.makedirs(path, exist_ok=True)
    arrays = {k: getattr(b, k) for k in _ARRAYS}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "arrays"), arrays, force=overwrite)
    ckpt.wait_until_finished()
    meta = dict(format="optgqa-bsr", version=1, in_features=b.in_features, bits=b.bits,
                group_size=b.group_size, sym=b.sym, dtype=b.dtype,
                shapes={k: [list(a.shape), jnp.dtype(a.dtype).name] for k, a in arrays.items()})
    with open(os.path.join(path, _META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def load_bsr(path: str) -> BSRQuantizedLinear:
    """Read a layer written by :func:`save_bsr` (bit-exact; checked with :func:`check_bsr`)."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    meta_path = os.path.join(path, _META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} holds no {_META_FILE}: not a saved BSR layer")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != "optgqa-bsr":
        raise ValueError(f"{meta_path}: not an optgqa BSR layer")
    target = {k: jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d)) for k, (s, d) in
              meta["shapes"].items()}
    arrays = ocp.StandardCheckpointer().restore(os.path.join(path, "arrays"), target)
    return from_arrays(**arrays, in_features=meta["in_features"], bits=meta["bits"],
                       group_size=meta["group_size"], sym=meta["sym"], dtype=meta["dtype"],
                       name=path)
