"""Random group-sparse (BSR) weights of any preset, for speed and memory benchmarks.

``optgqa bench --quantize w4g128s50`` serves a model whose linear kernels are random 4-bit
codes in groups of 128 with 50% of every row's groups removed (stored as BSR), the
counterpart of ``optgqa_jax.quant.synthetic`` for dense quantized weights.
"""

from __future__ import annotations

import re
from typing import Optional

import jax.numpy as jnp
import numpy as np

from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.synthetic import replace_linear_kernels
from optgqa_jax.sparse.bsr import BSRQuantizedLinear, from_arrays


def parse_sparse_spec(spec: str) -> tuple[QuantConfig, Optional[float]]:
    """``"w4g128s50"`` -> (QuantConfig(bits=4, group_size=128), 0.5); ``"w4g128"`` -> (…, None).

    Raises:
      ValueError: a malformed spec, a sparsity of 100% or more, or a group-sparse spec without
        a group size.
    """
    from optgqa_jax.quant.synthetic import EXTRAS, parse_spec
    m = re.fullmatch(r"(w\d+(?:g(?:-1|\d+))?)(?:s(\d+))?" + EXTRAS, spec or "")
    if m is None:
        raise ValueError(f"quantization spec {spec!r} must look like 'w4g128' or 'w4g128s50' "
                         "(bits, group size, % of groups pruned), optionally with '+head' and "
                         "'+emb' (the LM head and the token table, dense)")
    qc = parse_spec(m.group(1) + m.group(3))
    if m.group(2) is None:
        return qc, None
    s = int(m.group(2)) / 100
    if not 0 <= s < 1:
        raise ValueError(f"{spec!r}: the pruned share must be below 100%")
    if qc.group_size == -1:
        raise ValueError(f"{spec!r}: group sparsity needs a group size (e.g. w4g128s50)")
    return qc, s


SERVING_LAYOUTS = ("", "gm", "pk", "pksm", "pksmf", "rb16", "rb32", "rb64", "wl")
# layouts of group-sparse layers; "wl" is the dense layers' (quant.to_weights_left_params)
SPARSE_LAYOUTS = ("gm", "pk", "pksm", "pksmf", "rb16", "rb32", "rb64")


def parse_serving_spec(spec: str) -> tuple[QuantConfig, Optional[float], str]:
    """:func:`parse_sparse_spec` plus an optional layout suffix before any ``+head``/``+emb``:
    ``gm`` (``"w4g128s50gm"``) serves the BSR layers in group-major order
    (``sparse.to_group_major_params``), ``pk`` (``"w4g128s50pk"``) with each layer's arrays
    packed into one (``sparse.to_packed_bsr_params``), ``pksm`` the same with each block's
    codes in shift-major order (``code_order="shift_major"``: the batch-1 kernel reads x as
    given), ``pksmf`` that with x handed to the batch-1 kernel in float32
    (``x_dtype="float32"``); ``rbB`` (``"w4g128s50rb16"``, B = 16, 32 or 64) prunes with one
    mask per block of B output features and serves the layers as
    ``sparse.RowBlockQuantizedLinear``; ``wl`` (``"w4g128wl"``, dense only) serves the dense layers
    with their words transposed for the weights-left kernel (``quant.to_weights_left_params``).
    Returns (QuantConfig, sparsity or None, layout: one of :data:`SERVING_LAYOUTS`, "" for
    the layers as they are).

    Raises:
      ValueError: as :func:`parse_sparse_spec`, a group-sparse layout suffix on a spec
        without group sparsity, or ``wl`` on one with it.
    """
    if not isinstance(spec, str):
        return (*parse_sparse_spec(spec), "")     # raises: not a spec
    base, plus, extras = spec.partition("+")
    layout = next((s for s in SERVING_LAYOUTS if s and base.endswith(s)), "")
    qc, sparsity = parse_sparse_spec(base[:len(base) - len(layout)] + plus + extras)
    if layout in SPARSE_LAYOUTS and sparsity is None:
        raise ValueError(f"{spec!r}: the {layout!r} layout needs group sparsity "
                         f"(e.g. w4g128s50{layout})")
    if layout == "wl" and sparsity is not None:
        raise ValueError(f"{spec!r}: the 'wl' layout is for dense layers (e.g. w4g128wl)")
    return qc, sparsity, layout


def random_bsr_linear(seed: int, d_in: int, d_out: int, qc: QuantConfig, sparsity: float,
                      dtype: str, std: float = 0.02) -> BSRQuantizedLinear:
    """A BSR layer with uniform random codes, ``round(sparsity * G)`` groups removed from
    every row (at random places), built on the host."""
    rng = np.random.default_rng(seed)
    gs = qc.group_size
    if gs < 1 or d_in % gs:
        raise ValueError(f"group_size={gs} must divide D_in={d_in}")
    G, W = d_in // gs, gs * qc.bits // 32
    kept = G - int(round(sparsity * G))
    cols = np.sort(np.argsort(rng.random((d_out, G)), axis=1)[:, :kept], axis=1)
    nnz = d_out * kept
    levels = 2 ** qc.bits
    codes = rng.integers(-2 ** 31, 2 ** 31, (nnz, W), dtype=np.int64).astype(np.int32)
    scale = std * np.sqrt(12.0) / levels
    scales = (scale * rng.uniform(0.8, 1.2, nnz)).astype(qc.scale_dtype)
    return from_arrays(codes, scales, np.full(nnz, levels // 2, np.uint8),
                       cols.reshape(-1).astype(np.int32),
                       np.arange(d_out + 1, dtype=np.int64).astype(np.int32) * kept,
                       in_features=d_in, bits=qc.bits, group_size=gs, sym=qc.sym,
                       dtype=jnp.dtype(dtype).name)


def random_row_block_linear(seed: int, d_in: int, d_out: int, qc: QuantConfig,
                            sparsity: float, row_block: int, dtype: str, std: float = 0.02):
    """A :class:`~optgqa_jax.sparse.row_block.RowBlockQuantizedLinear` with uniform random
    codes, ``round(sparsity * G)`` groups removed from every block of `row_block` output
    features (at random places), built on the host."""
    from optgqa_jax.sparse.row_block import RowBlockQuantizedLinear
    rng = np.random.default_rng(seed)
    gs = qc.group_size
    if gs < 1 or d_in % gs:
        raise ValueError(f"group_size={gs} must divide D_in={d_in}")
    if row_block < 1 or d_out % row_block:
        raise ValueError(f"row_block={row_block} must divide D_out={d_out}")
    G, W = d_in // gs, gs * qc.bits // 32
    kept = G - int(round(sparsity * G))
    gmap = np.sort(np.argsort(rng.random((d_out // row_block, G)), axis=1)[:, :kept], axis=1)
    levels = 2 ** qc.bits
    qweight = rng.integers(-2 ** 31, 2 ** 31, (kept * W, d_out), dtype=np.int64).astype(np.int32)
    scale = std * np.sqrt(12.0) / levels
    scales = (scale * rng.uniform(0.8, 1.2, (kept, d_out))).astype(qc.scale_dtype)
    return RowBlockQuantizedLinear(
        qweight=jnp.asarray(qweight), scales=jnp.asarray(scales),
        zeros=jnp.full((kept, d_out), levels // 2, jnp.uint8),
        group_map=jnp.asarray(gmap.astype(np.int32)), in_features=d_in, bits=qc.bits,
        group_size=gs, sym=qc.sym, dtype=jnp.dtype(dtype).name, row_block=int(row_block))


def random_sparsify(params: dict, qc: QuantConfig, sparsity: float, seed: int = 0,
                    dtype=None, row_block: Optional[int] = None) -> dict:
    """`params` with every linear kernel replaced by a random BSR layer (norms kept; the
    embeddings and the LM head kept, or dense-quantized as ``qc`` asks); with `row_block`,
    by a random :class:`~optgqa_jax.sparse.row_block.RowBlockQuantizedLinear` with one mask
    per block of that many output features. Raises ValueError for params without linear
    kernels."""
    from optgqa_jax.quant.synthetic import random_quantize_table_and_head
    if row_block is None:
        make = lambda i, name, leaf: random_bsr_linear(  # noqa: E731
            seed * 100003 + i, *leaf.shape, qc, sparsity, dtype or leaf.dtype)
    else:
        make = lambda i, name, leaf: random_row_block_linear(  # noqa: E731
            seed * 100003 + i, *leaf.shape, qc, sparsity, row_block, dtype or leaf.dtype)
    out = replace_linear_kernels(params, make, what="sparsify")
    return random_quantize_table_and_head(out, qc, seed, dtype)
