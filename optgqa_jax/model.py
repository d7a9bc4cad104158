"""Llama-family decoder as Flax linen modules, with pure functional entry points.

Block: RMSNorm -> grouped-query attention (RoPE or ALiBi) -> residual ->
RMSNorm -> SwiGLU MLP -> residual. Parameters are a plain nested dict (see
:func:`init_params`); modules are never kept around, every call goes through
``Transformer(cfg).apply``.

Two paths share all weights and math:

* :func:`forward` — full causal pass over ``tokens`` (training and evaluation).
* :func:`forward_with_cache` — writes the new tokens' K/V into a contiguous
  :class:`KVCache` at per-row offsets and attends to everything cached so far
  (prefill with ``start = 0``, then decode one token at a time).

Axis legend: B batch, T tokens in this call, S cache slots, L layers, D model
dim, N query heads, K KV heads, H head dim, F MLP hidden dim, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.attention import attention, check_attention_impl, runs_pallas_kernels
from optgqa_jax import sharding
from optgqa_jax.config import ModelConfig
from optgqa_jax.kv_layers import ContiguousLayerKV
from optgqa_jax.layer_stack import is_layer_view, layer_matmul
from optgqa_jax.quant.linear import is_quantized as _is_dense_quantized
from optgqa_jax.quant.linear import lookup_columns
from optgqa_jax.quant.linear import matmul as quant_matmul
from optgqa_jax.quant.weights_left import is_weights_left, weights_left_matmul
from optgqa_jax.rope import apply_rope
from pallas_kernels._common import backend as kernel_backend
from pallas_kernels.add_rms_norm import add_rms_norm
from pallas_kernels.alibi import alibi_slopes
from optgqa_jax.sparse.bsr import bsr_matmul, is_bsr
from optgqa_jax.sparse.group_major import group_major_matmul, is_group_major
from optgqa_jax.sparse.packed import is_packed_bsr, packed_bsr_matmul
from optgqa_jax.sparse.row_block import is_row_block, row_block_matmul
from optgqa_jax.weight_layout import is_output_major
from optgqa_jax.weight_layout import matmul as output_major_matmul
from optgqa_jax.params import (_INIT, _SPARSE_DEQUANTIZE, _check_params_fast, _is_concrete,
                               check_tokens, is_quantized)
# the parameter trees' public functions, re-exported (optgqa_jax.params)
from optgqa_jax.params import (abstract_params, check_params_match,  # noqa: F401
                               init_abstract_leaves, init_params)


class KVCache(NamedTuple):
    """Contiguous K/V cache: slot s of row b holds the key/value of position s.

    The layout puts the KV head first so that one layer's cache, reshaped to
    ``[K, B*S/Z, Z, H]``, is a paged pool in the kernels' layout (row b owns
    pages ``b*S/Z ..``): the Pallas paged kernels read it without a copy.

    Attributes:
      k: [L, K, B, S, H] keys (after RoPE).
      v: [L, K, B, S, H] values.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch_size: int, max_len: int) -> "KVCache":
        """An empty cache: K and V of shape [L, K, B, max_len, H] in the model's dtype."""
        shape = (cfg.n_layers, cfg.n_kv_heads, batch_size, max_len, cfg.head_dim)
        return cls(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))


class RMSNorm(nn.Module):
    """Root-mean-square norm; statistics in float32, Hugging Face's cast order."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, residual=None):
        """x [..., D] -> the normalized x. With ``residual`` (x's shape): ``(x + residual,
        the normalized sum)`` from one Pallas kernel (``pallas_kernels.add_rms_norm``; interpret
        mode on a CPU), the same arithmetic."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        if residual is not None:
            D = x.shape[-1]
            s, y = add_rms_norm(x.reshape(-1, D), residual.reshape(-1, D), scale, eps=self.eps,
                                interpret=kernel_backend() == "cpu")
            return s.reshape(x.shape), y.reshape(x.shape)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(self.dtype)


class Linear(nn.Module):
    """``x @ kernel`` without bias; the kernel may be a float array, a ``QuantizedLinear`` (or
    a group-sparse layout of ``optgqa_jax.sparse``) or an ``OutputMajorKernel`` (the float
    kernel stored transposed, ``optgqa_jax.weight_layout``).

    A quantized kernel runs through ``optgqa_jax.quant.matmul``: the dequantizing Pallas
    kernel on GPUs (``impl`` "auto" or "pallas"), a dequantize-then-multiply elsewhere. Two
    optional collections serve calibration (both are no-ops in an ordinary ``apply``):
    ``linear_inputs`` (sown inputs, when made mutable) and ``perturbations`` (a zero
    added to the output, whose gradient is the gradient with respect to the output).
    """

    features: int
    dtype: jnp.dtype
    impl: str = "auto"  # the model's attention impl; see _QUANT_IMPL

    @nn.compact
    def __call__(self, x):
        if self.has_variable("params", "kernel"):  # skips flax's shape check: may be quantized
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", _INIT, (x.shape[-1], self.features), self.dtype)
        x = x.astype(self.dtype)
        self.sow("linear_inputs", "x", x)
        if is_bsr(kernel):
            y = bsr_matmul(x, kernel, _QUANT_IMPL[self.impl])
        elif is_group_major(kernel):
            y = group_major_matmul(x, kernel, _QUANT_IMPL[self.impl])
        elif is_packed_bsr(kernel):
            y = packed_bsr_matmul(x, kernel, _QUANT_IMPL[self.impl])
        elif is_row_block(kernel):       # blocks of features share one mask (sparse.row_block)
            y = row_block_matmul(x, kernel, _QUANT_IMPL[self.impl])
        elif is_layer_view(kernel):      # one layer of a stacked layer (layer_stack)
            y = layer_matmul(x, kernel, _QUANT_IMPL[self.impl])
        elif is_weights_left(kernel):    # words stored transposed (quant.weights_left)
            y = weights_left_matmul(x, kernel, _QUANT_IMPL[self.impl])
        elif is_quantized(kernel):
            y = _quantized_product(x, kernel, _QUANT_IMPL[self.impl], self.scope.path)
        elif is_output_major(kernel):    # stored [D_out, D_in] (optgqa_jax.weight_layout)
            y = output_major_matmul(x, kernel)
        else:
            y = jnp.dot(x, kernel.astype(self.dtype))
        return self.perturb("out", y)


def _quantized_product(x, ql, impl: str, path, out_dtype=None):
    """``x @ ql`` for a dense QuantizedLinear by ``quant.matmul``; on a tensor-parallel kernel
    mesh (``sharding.kernel_mesh``) on each device's shard of the layer at params `path`."""
    fn = lambda xx, qq: quant_matmul(xx, qq, impl, out_dtype=out_dtype)  # noqa: E731
    y = None
    if sharding.current_kernel_mesh() is not None:
        y = sharding.quantized_matmul_per_device(x, ql, path, fn)
    return fn(x, ql) if y is None else y


# The model's ``attention_impl`` also picks the quantized matmul: kernels under "pallas",
# kernels on GPUs under "auto", the dequantizing jnp path under "reference" and "xla".
_QUANT_IMPL = {"auto": "auto", "pallas": "pallas", "reference": "dequantize", "xla": "dequantize"}


def _dense(features: int, name: str, dtype, impl: str = "auto") -> Linear:
    return Linear(features, dtype, impl, name=name)


class Attention(nn.Module):
    """Grouped-query self-attention of one layer."""

    cfg: ModelConfig
    layer: int
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, positions, layer_kv=None):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        B, T, _ = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_map = cfg.layer_kv_head_map(self.layer)
        if self.has_variable("params", "qkv_proj"):  # fused layout (optgqa_jax.fused)
            qkv = _dense((N + 2 * K) * H, "qkv_proj", dt, self.impl)(x)
            if (cfg.position == "rope" and layer_kv is not None
                    and layer_kv.takes_qkv(self.impl, H)):
                # rotation and K/V write in one kernel (EngineConfig.rope_kv_write)
                out, layer_kv = layer_kv.attend_qkv(qkv, positions, n_heads=N,
                                                    theta=cfg.rope_theta, kv_head_map=kv_map,
                                                    impl=self.impl)  # [B, T, N, H]
                out = _dense(cfg.d_model, "o_proj", dt, self.impl)(out.reshape(B, T, N * H))
                return out, layer_kv
            q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
        else:
            q = _dense(N * H, "q_proj", dt, self.impl)(x)
            k = _dense(K * H, "k_proj", dt, self.impl)(x)
            v = _dense(K * H, "v_proj", dt, self.impl)(x)
        q = q.reshape(B, T, N, H)  # [B, T, N, H]
        k = k.reshape(B, T, K, H)  # [B, T, K, H]
        v = v.reshape(B, T, K, H)  # [B, T, K, H]
        slopes = None
        if cfg.position == "rope":
            q = apply_rope(q, positions, cfg.rope_theta)
            k = apply_rope(k, positions, cfg.rope_theta)
        elif cfg.position == "alibi":
            slopes = alibi_slopes(N)
        if layer_kv is None:
            out = attention(q, k, v, positions, kv_head_map=kv_map, alibi_slopes=slopes,
                            impl=self.impl)  # [B, T, N, H]
        else:  # store this call's k, v and attend to everything stored so far
            out, layer_kv = layer_kv.attend(q, k, v, positions, kv_head_map=kv_map,
                                            alibi_slopes=slopes, impl=self.impl)
        out = _dense(cfg.d_model, "o_proj", dt, self.impl)(out.reshape(B, T, N * H))
        return out, layer_kv


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        dt, F = self.cfg.jnp_dtype, self.cfg.ffn_dim
        if self.has_variable("params", "gate_up_proj"):  # fused layout (optgqa_jax.fused)
            gate, up = jnp.split(_dense(2 * F, "gate_up_proj", dt, self.impl)(x), 2, axis=-1)
        else:
            gate = _dense(F, "gate_proj", dt, self.impl)(x)  # [B, T, F]
            up = _dense(F, "up_proj", dt, self.impl)(x)
        return _dense(self.cfg.d_model, "down_proj", dt, self.impl)(nn.silu(gate) * up)


class Block(nn.Module):
    """One decoder layer: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``.

    With ``add_norm`` the residual adds run inside the norms' kernel
    (``pallas_kernels.add_rms_norm``): the block takes the previous block's MLP output as
    ``pending`` (not yet added to ``x``; None for the first block) and returns
    ``(x, layer_kv, pending)`` with its own MLP output pending, so each add and the norm after
    it are one launch. The caller adds the last block's pending output."""

    cfg: ModelConfig
    layer: int
    impl: str = "auto"
    add_norm: bool = False

    @nn.compact
    def __call__(self, x, positions, layer_kv=None, pending=None):
        cfg = self.cfg
        attn_norm = RMSNorm(cfg.norm_eps, cfg.jnp_dtype, name="attn_norm")
        mlp_norm = RMSNorm(cfg.norm_eps, cfg.jnp_dtype, name="mlp_norm")
        mlp = MLP(cfg, self.impl, name="mlp")
        if self.add_norm:
            if pending is None:
                n = attn_norm(x)
            else:
                x, n = attn_norm(x, pending)                # x + pending, and its norm
            h, layer_kv = Attention(cfg, self.layer, self.impl, name="attn")(n, positions,
                                                                              layer_kv)
            x, n = mlp_norm(x, h)
            return x, layer_kv, mlp(n)
        h, layer_kv = Attention(cfg, self.layer, self.impl, name="attn")(
            attn_norm(x), positions, layer_kv)
        x = x + h
        x = x + mlp(mlp_norm(x))
        return x, layer_kv


class Transformer(nn.Module):
    """The whole decoder: tokens [B, T] -> float32 logits [B, T, V].

    ``impl`` selects the attention implementation (see ``optgqa_jax.attention``).
    ``add_norm_kernel``: where the attention runs its Pallas kernels on one device, each
    residual add and the norm after it run as one ``pallas_kernels.add_rms_norm`` launch
    (``Block.add_norm``; the engine's ``EngineConfig.add_norm_kernel``).
    """

    cfg: ModelConfig
    impl: str = "auto"
    add_norm_kernel: bool = False

    @nn.compact
    def __call__(self, tokens, positions, kv: Optional[Sequence] = None, select=None):
        """tokens, positions [B, T]; kv: None or one KV object per layer (``kv_layers``);
        select: optional int [B, R] token indices whose logits are wanted (default all).

        Returns (float32 logits [B, T or R, V], updated kv tuple or None).
        """
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        table = (self.get_variable("params", "embed")["embedding"]
                 if self.has_variable("params", "embed") else None)
        if _is_dense_quantized(table):  # QuantConfig.quantize_embedding: stored [D, V]
            x = lookup_columns(table, tokens, dt)  # [B, T, D]
        else:
            embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=dt,
                             embedding_init=_INIT, name="embed")
            x = embed(tokens)  # [B, T, D]
            table = embed.embedding  # [V, D]
        new_kv = []
        add_norm = bool(self.add_norm_kernel and runs_pallas_kernels(self.impl, cfg.head_dim)
                        and sharding.current_kernel_mesh() is None)
        pending = None       # with add_norm: the last block's MLP output, not yet added to x
        for i in range(cfg.n_layers):
            block = Block(cfg, i, self.impl, add_norm, name=f"layer_{i}")
            if add_norm:
                x, layer_kv, pending = block(x, positions, None if kv is None else kv[i],
                                             pending)
            else:
                x, layer_kv = block(x, positions, None if kv is None else kv[i])
            new_kv.append(layer_kv)
        if pending is not None:
            x = x + pending
        if select is not None:
            x = jnp.take_along_axis(x, select[..., None], axis=1)  # [B, R, D]
        x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
        # quantized heads multiply like quantized layers (the kernel for decode rows on GPUs,
        # never a dequantized copy of the whole [D, V] table per step), logits in float32
        if cfg.tie_embeddings and _is_dense_quantized(table):
            logits = _quantized_product(x, table, _QUANT_IMPL[self.impl],
                                        ("embed", "embedding"), jnp.float32)
        elif cfg.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)
        else:
            if self.has_variable("params", "lm_head"):  # may be quantized
                w = self.get_variable("params", "lm_head")
            else:
                w = self.param("lm_head", _INIT, (cfg.d_model, cfg.vocab_size), dt)
            if _is_dense_quantized(w):
                logits = _quantized_product(x, w, _QUANT_IMPL[self.impl], ("lm_head",),
                                            jnp.float32)
            elif is_weights_left(w):
                logits = weights_left_matmul(x, w, _QUANT_IMPL[self.impl], jnp.float32)
            elif is_output_major(w):     # stored [V, D] (optgqa_jax.weight_layout)
                logits = jnp.einsum("BTD,VD->BTV", x, w.kernel_t.astype(dt),
                                    preferred_element_type=jnp.float32)
            else:    # float, or a group-sparse layout made float here
                w = next((deq(w) for test, deq in _SPARSE_DEQUANTIZE if test(w)), w)
                logits = jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32), None if kv is None else tuple(new_kv)


# ----------------------------------------------------------------------------- public API
@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(cfg, params, tokens, impl):
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return Transformer(cfg, impl).apply({"params": params}, tokens, positions)[0]


def forward(cfg: ModelConfig, params: dict, tokens, *, attention_impl: str = "auto") -> jax.Array:
    """Full causal forward pass, no cache.

    Args:
      cfg: the model's configuration.
      params: parameters as returned by :func:`init_params` or a loader.
      tokens: int [B, T] token ids, ``1 <= T <= cfg.max_seq_len``.
      attention_impl: ``"auto"`` (Pallas kernels on GPU for bfloat16/float16, jnp
        reference on CPU and for float32 full passes), ``"pallas"``, ``"reference"`` or
        ``"xla"`` (``jax.nn.dot_product_attention``: cuDNN where it applies, differentiable;
        what training uses).

    Returns:
      float32 logits [B, T, vocab_size].

    Raises:
      ValueError: bad shape, ids outside the vocabulary (checked when `tokens` is
        concrete, i.e. not inside a trace), T > max_seq_len, or params whose
        structure, shapes or dtypes do not match `cfg`.
    """
    tokens = jnp.asarray(tokens)
    check_tokens(cfg, tokens)
    _check_params_fast(cfg, params)
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"tokens has length {tokens.shape[1]}, longer than "
                         f"max_seq_len={cfg.max_seq_len}")
    if tokens.shape[1] == 0:
        raise ValueError("tokens must hold at least one token per row, got length 0")
    check_attention_impl(attention_impl)
    return _forward(cfg, params, tokens.astype(jnp.int32), attention_impl)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=3)
def _forward_with_cache(cfg, params, tokens, cache, start, impl):
    T = tokens.shape[1]
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    layers = [ContiguousLayerKV(cache.k[i], cache.v[i]) for i in range(cfg.n_layers)]
    logits, layers = Transformer(cfg, impl).apply({"params": params}, tokens, positions, layers)
    return logits, KVCache(jnp.stack([l.k for l in layers]), jnp.stack([l.v for l in layers]))


def forward_with_cache(cfg: ModelConfig, params: dict, tokens, cache: KVCache, start, *,
                       attention_impl: str = "auto") -> tuple[jax.Array, KVCache]:
    """Run `tokens` at positions ``start[b] + t`` against a contiguous cache.

    The new keys/values are written into the cache; each token attends to the
    cache slots up to its own position. The input cache is donated (its
    buffers are reused for the result): do not use it after the call.

    Args:
      cfg: model configuration.
      params: parameters.
      tokens: int [B, T] token ids.
      cache: :class:`KVCache` with S slots per row.
      start: int [B] position of each row's first token in this call.
      attention_impl: ``"auto"``, ``"pallas"``, ``"reference"`` or ``"xla"`` (see
        :func:`forward`).

    Returns:
      (float32 logits [B, T, V], updated cache).
    """
    tokens = jnp.asarray(tokens)
    check_tokens(cfg, tokens)
    _check_params_fast(cfg, params)
    start = jnp.asarray(start, jnp.int32)
    check_attention_impl(attention_impl)
    B, T = tokens.shape
    S = cache.k.shape[3]
    if start.shape != (B,):
        raise ValueError(f"start must have shape [batch]=({B},), got {tuple(start.shape)}")
    if cache.k.shape[:3] != (cfg.n_layers, cfg.n_kv_heads, B):
        raise ValueError(f"cache has leading shape {cache.k.shape[:3]}, expected "
                         f"(n_layers={cfg.n_layers}, n_kv_heads={cfg.n_kv_heads}, batch={B})")
    if _is_concrete(start):
        last = int(np.asarray(start).max()) + T
        if last > S:
            raise ValueError(f"positions up to {last - 1} do not fit the cache of {S} slots")
        if last > cfg.max_seq_len:
            raise ValueError(f"positions up to {last - 1} exceed max_seq_len={cfg.max_seq_len}")
    return _forward_with_cache(cfg, params, tokens.astype(jnp.int32), cache, start, attention_impl)
