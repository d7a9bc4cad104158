"""An independent float64 numpy Llama forward pass, written for the tests.

It shares no code with optgqa_jax: RoPE, the ALiBi bias matrix, the causal
mask and the per-head attention loop are spelled out here from their
definitions. It reads our parameter pytree (kernels are [in, out]).
"""

import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, positions, theta):
    """x [T, N, H]; pairs (i, i + H/2) rotate by angle pos * theta^(-2i/H)."""
    T, N, H = x.shape
    half = H // 2
    freqs = theta ** (-np.arange(half) * 2.0 / H)
    ang = positions[:, None] * freqs[None, :]  # [T, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def attention_np(q, k, v, q_positions, kv_head_map, slopes=None, sm_scale=None, causal=True):
    """q [T, N, H], k/v [S, K, H]; key slot s is position s; explicit bias and mask matrices.

    Rows with no visible key give zeros.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, N, H = q.shape
    S = k.shape[0]
    sm_scale = 1 / np.sqrt(H) if sm_scale is None else sm_scale
    rel = np.arange(S)[None, :] - np.asarray(q_positions)[:, None]  # [T, S]: j - i
    mask = rel <= 0 if causal else np.ones((T, S), bool)
    out = np.zeros((T, N, H))
    for h in range(N):
        kh, vh = k[:, kv_head_map[h]], v[:, kv_head_map[h]]
        scores = (q[:, h] @ kh.T) * sm_scale  # [T, S]
        if slopes is not None:
            scores = scores + slopes[h] * rel  # the ALiBi bias matrix
        scores = np.where(mask, scores, -np.inf)
        top = scores.max(axis=1, keepdims=True)
        p = np.where(mask, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0.0)
        denom = p.sum(axis=1, keepdims=True)
        out[:, h] = (p / np.where(denom == 0, 1, denom)) @ vh
    return out


def forward_np(cfg, params, tokens, slopes=None):
    """tokens [T] -> float64 logits [T, V] for one sequence."""
    P = {k: v for k, v in params.items()}
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = f(P["embed"]["embedding"])[np.asarray(tokens)]
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for i in range(cfg.n_layers):
        L = P[f"layer_{i}"]
        h = rms_norm(x, f(L["attn_norm"]["scale"]), cfg.norm_eps)
        q = (h @ f(L["attn"]["q_proj"]["kernel"])).reshape(T, N, H)
        k = (h @ f(L["attn"]["k_proj"]["kernel"])).reshape(T, K, H)
        v = (h @ f(L["attn"]["v_proj"]["kernel"])).reshape(T, K, H)
        if cfg.position == "rope":
            q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
        a = attention_np(q, k, v, pos, cfg.layer_kv_head_map(i), slopes)
        x = x + a.reshape(T, N * H) @ f(L["attn"]["o_proj"]["kernel"])
        h = rms_norm(x, f(L["mlp_norm"]["scale"]), cfg.norm_eps)
        g = h @ f(L["mlp"]["gate_proj"]["kernel"])
        u = h @ f(L["mlp"]["up_proj"]["kernel"])
        x = x + (g / (1 + np.exp(-g)) * u) @ f(L["mlp"]["down_proj"]["kernel"])
    x = rms_norm(x, f(P["final_norm"]["scale"]), cfg.norm_eps)
    head = f(P["embed"]["embedding"]).T if cfg.tie_embeddings else f(P["lm_head"])
    return x @ head
