"""Fused projection weights for serving: one matrix product where the model has several.

At decode time every projection is a matrix product of a few hundred token
rows with a weight matrix. The key and value projections of a GQA model are
narrow (K·H columns), so alone they cannot fill the GPU. vLLM therefore
concatenates q/k/v and gate/up at load time; this module does the same for
our parameter tree:

* ``layer_i/attn/{q,k,v}_proj/kernel`` ([D, N·H], [D, K·H], [D, K·H]) become
  ``layer_i/attn/qkv_proj/kernel`` [D, (N + 2K)·H];
* ``layer_i/mlp/{gate,up}_proj/kernel`` ([D, F] each) become
  ``layer_i/mlp/gate_up_proj/kernel`` [D, 2F].

Quantized kernels (``optgqa_jax.quant.QuantizedLinear``) are fused too, when the
parts share one ``g_idx``. The model accepts either layout and computes the same function
(``init_params(cfg, key, fused=True)`` and ``abstract_params(cfg, fused=True)``
give the fused layout directly). Loaders and checkpoints use the unfused
layout, the one that maps onto Hugging Face names.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from optgqa_jax.config import ModelConfig
from optgqa_jax.quant.linear import concat_outputs, is_quantized


def _concat(kernels):
    """Concatenate kernels along D_out; quantized kernels stay quantized (same g_idx needed)."""
    n_quantized = sum(is_quantized(k) for k in kernels)
    if n_quantized == 0:
        return jnp.concatenate(kernels, axis=1)
    if n_quantized != len(kernels):
        raise ValueError("cannot fuse a mix of quantized and float projections")
    return concat_outputs(kernels)


def fuse_layers(cfg: ModelConfig, params: dict) -> dict:
    """The fused layout of an unfused tree (no checks; works under ``jax.eval_shape``)."""
    out = dict(params)
    for i in range(cfg.n_layers):
        layer = dict(params[f"layer_{i}"])
        attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
        attn["qkv_proj"] = {"kernel": _concat([attn.pop(f"{n}_proj")["kernel"]
                                               for n in ("q", "k", "v")])}
        mlp["gate_up_proj"] = {"kernel": _concat([mlp.pop(f"{n}_proj")["kernel"]
                                                  for n in ("gate", "up")])}
        layer["attn"], layer["mlp"] = attn, mlp
        out[f"layer_{i}"] = layer
    return out


def is_fused(params: dict) -> bool:
    """Whether `params` is in the fused layout."""
    layer = params.get("layer_0", {}) if isinstance(params, Mapping) else {}
    return isinstance(layer, Mapping) and "qkv_proj" in layer.get("attn", {})


def fuse_projections(cfg: ModelConfig, params: dict) -> dict:
    """Return a copy of unfused `params` with q/k/v and gate/up concatenated per layer.

    Leaves other than those projections are shared with `params`, not copied.
    The fused matrices are new arrays, so the caller's unfused ones stay valid;
    drop your reference to free them (while both exist, the projections take
    twice their memory).

    Raises:
      ValueError: `params` does not match `cfg`, or is already fused.
    """
    from optgqa_jax.model import check_params_match  # the model imports this module

    if is_fused(params):
        raise ValueError("params are already fused")
    check_params_match(cfg, params)
    return fuse_layers(cfg, params)
