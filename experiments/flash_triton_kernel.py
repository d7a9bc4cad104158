"""The causal flash-attention forward of ``flash_triton_peer.py``, in ``triton.language``.

Kept apart from the script so that a Python with only the ``triton`` package (no JAX, no
GPU) can import it and compile it for sm_90 (``flash_triton_peer.py --sass-only``).

Layout: q, o [B, H, T, D]; k, v [B, Hk, T, D], contiguous; query head h reads KV head
h // GROUP. T is a multiple of BLOCK_M and BLOCK_M of BLOCK_N (the peer times T = 4096).
"""

import triton
import triton.language as tl


@triton.jit
def _block(acc, m_i, l_i, q, k_at, v_at, start_n, offs_m, offs_n, offs_d, qk_scale,
           D: tl.constexpr, DIAGONAL: tl.constexpr, DESC: tl.constexpr):
    """One block of BLOCK_N keys: scores, the running max and sum, the values' product."""
    if DESC:
        kt = tl.trans(k_at.load([start_n, 0]))                              # [D, BN]
        v = v_at.load([start_n, 0])                                         # [BN, D]
    else:
        rows = (start_n + offs_n)[:, None] * D + offs_d[None, :]              # [BN, D]
        kt = tl.trans(tl.load(k_at + rows))
        v = tl.load(v_at + rows)
    s = tl.dot(q, kt) * qk_scale                                            # [BM, BN] log2
    if DIAGONAL:
        s = tl.where(offs_m[:, None] >= (start_n + offs_n)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def flash_fwd(Q, K, V, O, T, qk_scale,
              H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAVY_FIRST: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr):
    """o = softmax(q k^T * scale, causal) v for BLOCK_M queries of one (batch, head).

    ``qk_scale`` is the score scale times log2(e) (scores in base 2). Grid
    ``(T / BLOCK_M, B H)``; with HEAVY_FIRST the first programs take the last queries
    (the most keys), which evens out the causal triangle's work over the GPU's waves. DESC
    loads K and V through tensor descriptors (TMA on Hopper; needs ``triton.set_allocator``).
    """
    Hk: tl.constexpr = H // GROUP
    pid = tl.program_id(0)
    start_m = (tl.num_programs(0) - 1 - pid) if HEAVY_FIRST else pid
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_base = Q + (b * H + h).to(tl.int64) * T * D
    k_base = K + (b * Hk + hk).to(tl.int64) * T * D
    v_base = V + (b * Hk + hk).to(tl.int64) * T * D
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    if DESC:   # tensor descriptors (TMA on Hopper)
        k_at = tl.make_tensor_descriptor(k_base, shape=[T, D], strides=[D, 1],
                                         block_shape=[BLOCK_N, D])
        v_at = tl.make_tensor_descriptor(v_base, shape=[T, D], strides=[D, 1],
                                         block_shape=[BLOCK_N, D])
    else:
        k_at = k_base
        v_at = v_base
    q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :])             # [BM, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    diag = start_m * BLOCK_M
    # below the diagonal: no mask (WARP_SPEC: Triton's warp specialization of the loop,
    # where the installed Triton has it; a constexpr branch, so older ones never see it)
    if WARP_SPEC:
        for start_n in tl.range(0, diag, BLOCK_N, warp_specialize=True):
            acc, m_i, l_i = _block(acc, m_i, l_i, q, k_at, v_at, start_n, offs_m, offs_n,
                                   offs_d, qk_scale, D, False, DESC)
    else:
        for start_n in range(0, diag, BLOCK_N):
            acc, m_i, l_i = _block(acc, m_i, l_i, q, k_at, v_at, start_n, offs_m, offs_n,
                                   offs_d, qk_scale, D, False, DESC)
    for start_n in range(diag, diag + BLOCK_M, BLOCK_N):     # the diagonal blocks
        acc, m_i, l_i = _block(acc, m_i, l_i, q, k_at, v_at, start_n, offs_m, offs_n, offs_d,
                               qk_scale, D, True, DESC)
    acc = acc / l_i[:, None]
    o_base = O + (b * H + h).to(tl.int64) * T * D
    tl.store(o_base + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty))


def signature(dtype: str = "bf16") -> dict:
    """The kernel's argument types for ``triton.compile`` (``ASTSource``)."""
    ptr = f"*{dtype}"
    return dict(Q=ptr, K=ptr, V=ptr, O=ptr, T="i32", qk_scale="fp32", H="constexpr",
                GROUP="constexpr", D="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                HEAVY_FIRST="constexpr", DESC="constexpr", WARP_SPEC="constexpr")
