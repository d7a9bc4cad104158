"""Weighted grouped-query attention: learned per-head weights instead of the plain group mean.

Chinnakonduru & Mohapatra, 2024, "Weighted Grouped Query Attention in
Transformers" (WGQA, arXiv:2407.10855) replace GQA's mean pooling by a
weighted sum whose weights are trained during uptraining:

    W^K_g = Σ_{h∈g} w^K_h W^K_h,   W^V_g = Σ_{h∈g} w^V_h W^V_h,

initialised to w_h = 1/|g|, so the converted model starts as mean pooling
(``mean_pool`` for contiguous groups). We use one scalar weight per head and
per projection. The conversion returns that starting model; the report's
``parametrization`` (a :class:`WeightedGroups`) turns it into something to
train::

    cfg2, params2, report = convert_to_gqa(cfg, params, 2, "learned_weights")
    p = report.parametrization
    trainable = p.init(params)           # the source params (or their MHA expansion)
    loss = lambda t: nll(cfg2, p(t))     # p is hashable: jit-friendly, a static argument

Groups: contiguous (equal only) by default, or ``groups_from="<strategy>"``.
The reported objective is the relative weight-sharing error at
initialisation (``common.weight_sharing_error``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from optgqa_jax.config import ModelConfig
from optgqa_jax.fused import fuse_layers
from optgqa_jax.grouping.common import (LayerContext, LayerConversion, Strategy, as_unfused,
                                        check_float_params, layer_heads, mean_merge, membership,
                                        weight_sharing_error)
from optgqa_jax.grouping.mean_pool import contiguous_labels


@dataclasses.dataclass(frozen=True)
class WeightedGroups:
    """The WGQA parametrization of a converted model; call it to get the model's params.

    Holds static information only (hashable), so it can be closed over or be a
    static argument under ``jax.jit``.

    Attributes:
      source_cfg: configuration of the model that was converted.
      cfg: the converted configuration (its ``kv_head_map`` holds the groups).
      fused: whether the produced params use the fused layout.
    """

    source_cfg: ModelConfig
    cfg: ModelConfig
    fused: bool = False

    def init(self, params: dict) -> dict:
        """Trainable pytree at initialisation (weights 1/|g|: the mean-pooled model).

        Args:
          params: float params of ``source_cfg`` or of its MHA expansion, either layout.

        Returns:
          ``{"model": the other params (unfused, without k/v kernels),
          "k_heads": per layer float32 [N, D, H] per-query-head key projections,
          "v_heads": same for values, "w_k": per layer float32 [N], "w_v": [N]}``.
        """
        N = self.source_cfg.n_heads
        candidates = (self.source_cfg,
                      self.source_cfg.replace(n_kv_heads=N, kv_head_map=None))
        for cfg in candidates:
            try:
                check_float_params(cfg, params)
                break
            except ValueError:
                continue
        else:
            check_float_params(self.source_cfg, params)  # raises with the detailed report
        unfused, _ = as_unfused(cfg, params)
        model, k_heads, v_heads, w = dict(unfused), [], [], []
        for i in range(cfg.n_layers):
            heads = layer_heads(cfg, unfused, i)
            k_heads.append(jnp.asarray(heads.k, jnp.float32))
            v_heads.append(jnp.asarray(heads.v, jnp.float32))
            labels = np.asarray(self.cfg.layer_kv_head_map(i))
            w.append(jnp.asarray(1.0 / np.bincount(labels)[labels], jnp.float32))
            layer = dict(unfused[f"layer_{i}"])
            layer["attn"] = {k: v for k, v in layer["attn"].items()
                             if k not in ("k_proj", "v_proj")}
            model[f"layer_{i}"] = layer
        return {"model": model, "k_heads": k_heads, "v_heads": v_heads,
                "w_k": w, "w_v": list(w)}

    def __call__(self, trainable: dict) -> dict:
        """Model params from the trainable pytree (pure, differentiable, jit-able).

        New KV head g of layer i is ``Σ_{h∈g} w_h W_h`` for keys and values.
        """
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        D, K, H = cfg.d_model, cfg.n_kv_heads, cfg.head_dim
        out = dict(trainable["model"])
        for i in range(cfg.n_layers):
            P = jnp.asarray(membership(np.asarray(cfg.layer_kv_head_map(i)), K).T,
                            jnp.float32)  # [K, N]
            layer = dict(out[f"layer_{i}"])
            attn = dict(layer["attn"])
            for name, heads, w in (("k_proj", trainable["k_heads"][i], trainable["w_k"][i]),
                                   ("v_proj", trainable["v_heads"][i], trainable["w_v"][i])):
                kernel = jnp.einsum("KN,N,NDH->DKH", P, w, heads).reshape(D, K * H)
                attn[name] = {"kernel": kernel.astype(dt)}
            layer["attn"] = attn
            out[f"layer_{i}"] = layer
        return fuse_layers(cfg, out) if self.fused else out

    to_model_params = __call__


def _group(ctx: LayerContext, options) -> np.ndarray:
    return contiguous_labels(ctx.cfg.n_heads, ctx.n_kv_heads)


def _convert(ctx: LayerContext, options) -> LayerConversion:
    labels = ctx.given_labels if ctx.given_labels is not None else _group(ctx, options)
    return mean_merge(ctx, labels, weight_sharing_error(ctx.heads, labels, ctx.n_kv_heads))


STRATEGY = Strategy(name="learned_weights", convert=_convert, group=_group,
                    objective_name="relative weight-sharing error at initialisation",
                    unequal_groups=False, options={"groups_from": None},
                    parametrization=WeightedGroups)
