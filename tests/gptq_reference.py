"""An independent float64 numpy GPTQ quantizer and GPTQ checkpoint (un)packer, for the tests.

It shares no code with optgqa_jax. Layout: our weights are w [D_in, D_out] (the transpose of torch's
nn.Linear [out, in]); the algorithm works on W = w.T [rows = D_out, columns = D_in] like the paper.

Sources read (stored copies; commits as seen there):
- Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1 (Cholesky form of H^-1, lazy batches).
- IST-DASLab/gptq @ 2d65066 (2023-07-11): `gptq.py` (`GPTQ.fasterquant`) and `quant.py`
  (`Quantizer.find_params`, `quantize`) -- the reference implementation reproduced here.
- AutoGPTQ/AutoGPTQ @ 9f7d370 (2025-04-11): `auto_gptq/quantization/gptq.py` (same loop, plus the
  returned scale/zero/g_idx bookkeeping) and `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`
  (`pack`: `zeros -= 1` before packing, the 10|1|10|1|10 3-bit layout; dequant adds 1 back).
- ModelCloud/GPTQModel v7.3.4 (@ f4c327a): `gptqmodel/quantization/gptq.py`, `quantizer.py`
  (sym zero = (maxq + 1) / 2); `gptqmodel/nn_modules/qlinear/__init__.py` (`pack_block`,
  `_pack_rows_3`); `gptqmodel/utils/model.py` (`convert_gptq_v1_to_v2_format_module` adds 1 to
  each field by a packed-word add, e.g. `qzeros += 0b00010001...0001` for 4 bits, and per decoded
  field for 3 bits; `convert_gptq_v2_to_v1_format_module` subtracts it); and
  `gptqmodel/utils/model_dequant.py` (`_shift_gptq_qzeros`: v1 -> v2 is `(field + 1) & maxq` per
  decoded field; `convert_gptq_file`: w = scales[g_idx] * (q - zeros[g_idx])).
- vLLM @ 03b2ee5: `csrc/quantization/gptq/q_gemm.cu` (`zero_offset = use_v2_format ? 0 : 1`; the
  kernels dequantize with stored zero + zero_offset), `csrc/quantization/gptq/matrix_view.cuh`
  (`MatrixView_q3_row`: 3-bit field c at bit 3c of the row's bit stream), `qdq_3.cuh`;
  `use_v2_format` is set from quantize_config `checkpoint_format == "gptq_v2"` (vllm-project/vllm
  PR #26092, merged Oct 2025).
- transformers 5.25.0 (installed here) `transformers/utils/quantization_config.py` `GPTQConfig`:
  `format` (legacy key `checkpoint_format`) is "gptq" (v1) or "gptq_v2".

Checkpoint layout (Hugging Face GPTQ): qweight int32 [D_in * bits / 32, D_out] packed along the
input dim; qzeros int32 [G, D_out * bits / 32] packed along the output dim; scales float16
[G, D_out]; g_idx int32 [D_in]. Every `bits` consecutive words along the packed dim hold 32 values
as one little-endian bit stream: value k sits at stream bits [bits*k, bits*k + bits), stream bit p
is bit p % 32 of word p // 32. For 2/4/8 bits this is "value j of a word at bit offset bits*j"; for
3 bits values 10 and 21 straddle a word boundary (the 10|1|10|1|10 scheme of AutoGPTQ, GPTQModel
and vLLM). "gptq" (v1) stores zero - 1 per field (sym 4-bit: true zero 8 stored as 7, words
0x77777777); "gptq_v2" stores the true zero. A true zero of 0 (asym only) is stored as maxq in v1
and read back modulo 2**bits here, as GPTQModel's `_shift_gptq_qzeros` does. Other readers do not
agree on that case: vLLM's kernels and AutoGPTQ's 3-bit path add 1 without the modulo, GPTQModel's
packed-word add carries into the next field, and AutoGPTQ's packer casts the -1 to uint32 before
OR-ing it in. This is the v1 "underflow" that GPTQModel's v2 format exists to avoid.
"""

import math

import numpy as np


# ----------------------------------------------------------------------------- quantization grid


def find_params(x, bits, sym):
    """Min-max grid per row, as `Quantizer.find_params(x, weight=True)` with perchannel=True.

    Args:
      x: [rows, cols] float64.
    Returns:
      (scale [rows], zero [rows]) float64; zero holds integers.
    """
    x = np.asarray(x, np.float64)
    maxq = 2**bits - 1
    xmin = np.minimum(x.min(axis=1), 0.0)
    xmax = np.maximum(x.max(axis=1), 0.0)
    if sym:
        # Reference quirk kept as is: only rows with xmin < 0 become symmetric; a row >= 0 keeps
        # xmin = 0, so scale = xmax / maxq with zero (maxq + 1) / 2 and its upper half clips.
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = np.where(flat, -1.0, xmin)
    xmax = np.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale, zero


def quantize(x, scale, zero, maxq):
    """Integer codes clip(round(x / scale) + zero, 0, maxq); np.round is half-to-even like torch.

    With sym, a group's most negative element quantized while still unmodified (a group's first
    column at a block start, column 0 for group_size -1) lands on the tie x / scale = -maxq / 2,
    decided by its last ulp: independent implementations may differ there by one code, and GPTQ
    then carries the difference into the later columns of the row. Tests must allow for it.
    """
    return np.clip(np.round(x / scale) + zero, 0, maxq)


def dequantize(codes, scale, zero):
    return scale * (codes - zero)


def _grid_fn(bits, sym, scale_dtype):
    """find_params with the scale then rounded to scale_dtype (zero found from the exact scale)."""

    def grid(x):
        scale, zero = find_params(x, bits, sym)
        if scale_dtype is not None:
            scale = scale.astype(scale_dtype).astype(np.float64)
        return scale, zero

    return grid


def _result(codes_t, scales, zeros, g_idx, **extra):
    """Assemble the output dict; codes_t is [D_out, D_in] in original column order."""
    codes = codes_t.T.astype(np.int64)  # [D_in, D_out]
    scales = np.stack(scales)  # [G, D_out]
    zeros = np.rint(np.stack(zeros)).astype(np.int64)  # [G, D_out]
    g_idx = np.asarray(g_idx, np.int64)
    w_hat = scales[g_idx] * (codes - zeros[g_idx])
    return dict(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, w_hat=w_hat, **extra)


# ----------------------------------------------------------------------------- GPTQ and RTN


def gptq_reference(w, H, *, bits, group_size, sym, act_order, static_groups, damp=0.01,
                   block_size=128, scale_dtype=None):
    """GPTQ of one linear layer, float64, following IST-DASLab `GPTQ.fasterquant` step by step.

    Args:
      w: [D_in, D_out] weights (our layout).
      H: [D_in, D_in] Hessian 2/n X^T X of the layer inputs.
      group_size: input columns per grid, or -1 for one grid per output row.
      act_order: quantize columns in order of descending diag(H) (stable sort).
      static_groups: find every group's grid up front from the un-updated W in original order.
      damp: percdamp; damp * mean(diag H) is added to the diagonal.
      scale_dtype: None (float64) or e.g. "float16": the scale is rounded to it as soon as it is
        found and the rounded scale is used both to code and to dequantize.
    Returns:
      dict with codes int64 [D_in, D_out], scales [G, D_out], zeros int64 [G, D_out], g_idx int64
      [D_in] (original order), w_hat [D_in, D_out] = scales[g_idx] * (codes - zeros[g_idx]),
      perm int64 [D_in] (column j of the loop is input perm[j]) and loss = sum (w - q)^2 / d^2 / 2.
    Raises:
      np.linalg.LinAlgError if the damped H is not positive definite.
    """
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"{group_size=} must be -1 or positive")
    W = np.array(w, np.float64).T.copy()  # [rows = D_out, columns = D_in]
    H = np.array(H, np.float64, copy=True)
    rows, columns = W.shape
    maxq = 2**bits - 1
    grid = _grid_fn(bits, sym, scale_dtype)

    # The per-row grid of group_size -1 comes from W BEFORE dead columns are zeroed: the reference
    # calls find_params(W) first (IST-DASLab, AutoGPTQ and GPTQModel alike).
    row_grid = grid(W) if group_size == -1 else None

    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if static_groups and group_size != -1:
        static = [grid(W[:, g:g + group_size]) for g in range(0, columns, group_size)]

    perm = np.arange(columns)
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]

    H[np.diag_indices(columns)] += damp * np.mean(np.diag(H))
    L = np.linalg.cholesky(H)  # H = L L^T
    L_inv = np.linalg.inv(L)
    Hinv = np.linalg.cholesky(L_inv.T @ L_inv).T  # upper U with U^T U = H^-1

    codes = np.zeros((rows, columns))
    losses = np.zeros((rows, columns))
    scales, zeros = [], []  # groups in the order the loop finds them
    scale, zero = row_grid if group_size == -1 else (None, None)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1:
                if static is not None:
                    scale, zero = static[perm[col] // group_size]  # group of the original index
                elif col % group_size == 0:
                    # Reference quirk reproduced: the grid reads the OUTER W, which holds the lazy
                    # updates of earlier blocks but not the updates made inside this block (those
                    # live in W1), nor any update to columns of the group lying in later blocks.
                    scale, zero = grid(W[:, col:col + group_size])
                    scales.append(scale)
                    zeros.append(zero)
            w_col = W1[:, i]
            d = Hinv1[i, i]
            c = quantize(w_col, scale, zero, maxq)
            q = dequantize(c, scale, zero)
            codes[:, col] = c
            losses[:, col] = (w_col - q) ** 2 / d**2 / 2
            err = (w_col - q) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])  # OBS update of the rest of the block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later columns

    codes_orig = np.empty_like(codes)
    codes_orig[:, perm] = codes
    if group_size == -1:
        scales, zeros, g_idx = [row_grid[0]], [row_grid[1]], np.zeros(columns, np.int64)
    elif static is not None:
        scales, zeros = [s for s, _ in static], [z for _, z in static]
        g_idx = np.arange(columns) // group_size
    else:
        g_idx = np.empty(columns, np.int64)
        g_idx[perm] = np.arange(columns) // group_size  # groups formed in the permuted order
    return _result(codes_orig, scales, zeros, g_idx, perm=perm.astype(np.int64),
                   loss=float(losses.sum()))


def rtn_reference(w, bits, group_size, sym, scale_dtype=None):
    """Round-to-nearest on the same grids, groups in original column order; same dict, no loss."""
    W = np.asarray(w, np.float64).T  # [D_out, D_in]
    columns = W.shape[1]
    size = columns if group_size == -1 else group_size
    grid = _grid_fn(bits, sym, scale_dtype)
    codes = np.zeros_like(W)
    scales, zeros = [], []
    for g in range(0, columns, size):
        block = W[:, g:g + size]
        scale, zero = grid(block)
        codes[:, g:g + size] = quantize(block, scale[:, None], zero[:, None], 2**bits - 1)
        scales.append(scale)
        zeros.append(zero)
    return _result(codes, scales, zeros, np.arange(columns) // size, perm=np.arange(columns))


# ----------------------------------------------------------------------------- checkpoint packing


def _chunk(bits):
    """(words, values) of the smallest whole bit stream: 3 bits -> (3, 32), 4 bits -> (1, 8)."""
    words = bits // math.gcd(bits, 32)
    return words, 32 * words // bits


def pack_int32(values, bits, axis):
    """Packs integers in [0, 2**bits) along `axis` into int32 words (little-endian bit stream)."""
    v = np.moveaxis(np.asarray(values, np.int64), axis, 0)
    n_words, n_values = _chunk(bits)
    if v.shape[0] % n_values:
        raise ValueError(f"{v.shape[0]=} must be a multiple of {n_values} for {bits=}")
    if v.size and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}) for {bits=}")
    v = v.reshape(-1, n_values, *v.shape[1:])
    words = np.zeros((v.shape[0], n_words) + v.shape[2:], np.int64)
    for k in range(n_values):
        for b in range(bits):
            p = bits * k + b  # stream bit of bit b of value k
            words[:, p // 32] |= ((v[:, k] >> b) & 1) << (p % 32)
    words = words.reshape(-1, *v.shape[2:]).astype(np.uint32).view(np.int32)
    return np.ascontiguousarray(np.moveaxis(words, 0, axis))


def unpack_int32(words, bits, axis):
    """Inverse of pack_int32: int32 words -> int64 values in [0, 2**bits) along `axis`."""
    u = np.moveaxis(np.asarray(words).astype(np.int64) & 0xFFFFFFFF, axis, 0)
    n_words, n_values = _chunk(bits)
    if u.shape[0] % n_words:
        raise ValueError(f"{u.shape[0]=} words must be a multiple of {n_words} for {bits=}")
    u = u.reshape(-1, n_words, *u.shape[1:])
    values = np.zeros((u.shape[0], n_values) + u.shape[2:], np.int64)
    for k in range(n_values):
        for b in range(bits):
            p = bits * k + b
            values[:, k] |= ((u[:, p // 32] >> (p % 32)) & 1) << b
    return np.moveaxis(values.reshape(-1, *u.shape[2:]), 0, axis)


def unpack_hf_gptq(qweight, qzeros, scales, g_idx, bits, checkpoint_format="gptq"):
    """Dequantizes a Hugging Face GPTQ layer to w [D_in, D_out] float64 (our layout).

    Args:
      qweight: int32 [D_in * bits / 32, D_out].
      qzeros: int32 [G, D_out * bits / 32].
      scales: float16 [G, D_out].
      g_idx: int [D_in], group of each input row.
      checkpoint_format: "gptq" (v1, stored zero = true zero - 1) or "gptq_v2" (true zero).
    """
    maxq = 2**bits - 1
    q = unpack_int32(qweight, bits, axis=0)  # [D_in, D_out]
    z = unpack_int32(qzeros, bits, axis=1)  # [G, D_out]
    if checkpoint_format == "gptq":
        z = (z + 1) & maxq  # per decoded field, as GPTQModel `_shift_gptq_qzeros(delta=1)`
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"{checkpoint_format=} must be 'gptq' or 'gptq_v2'")
    g = np.asarray(g_idx, np.int64)
    if q.shape[0] != g.shape[0]:
        raise ValueError(f"qweight unpacks to {q.shape[0]} rows but g_idx has {g.shape[0]}")
    return np.asarray(scales).astype(np.float64)[g] * (q - z[g])


def pack_hf_gptq_reference(codes, zeros, bits):
    """codes [D_in, D_out], true zeros [G, D_out] -> (qweight, qzeros) in v1 ("gptq") layout."""
    maxq = 2**bits - 1
    qweight = pack_int32(codes, bits, axis=0)
    qzeros = pack_int32((np.asarray(zeros, np.int64) - 1) & maxq, bits, axis=1)
    return qweight, qzeros
