"""Uptraining a converted GQA model: a short continued training that lets it adapt to its groups.

Ainslie et al. (2023) recover most of the quality lost by mean-pooling K/V heads with a short
"uptraining" (about 5% of the original pre-training). :func:`uptrain` runs the project's training
loop (:func:`optgqa_jax.train.train`) on a converted model:

* Every strategy: all weights train; the groups stay fixed, so every query head of a group keeps
  reading one shared K/V head.
* ``learned_weights`` (WGQA): pass the conversion's report; the trainable parameters are then the
  strategy's own (per-head K/V projections and their merge weights ``w_h``, see
  :class:`optgqa_jax.grouping.learned_weights.WeightedGroups`) plus the rest of the model.

One compiled step for every grouping. A model's ``kv_head_map`` is static (part of the jitted
config), so training each converted model as itself would compile a new step for every strategy
and KV budget. Instead the step trains the grouped parameters ``[D, K·H]`` and expands them,
inside the step, into the exactly equivalent MHA model (query head h reads a copy of KV head
``kv_head_map[h]``, gathered with a traced index): the expansion is a gather, its gradient sums
the copies' gradients back into the shared head, and every grouping with the same K shares one
compiled step. Evaluation reuses the MHA form the same way.

Axis legend: D model dim, N query heads, K KV heads, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optgqa_jax.config import ModelConfig
from optgqa_jax.grouping.common import check_float_params, unfuse_layers
from optgqa_jax.fused import is_fused
from optgqa_jax.train import TrainConfig, TrainResult, train


def mha_config(cfg: ModelConfig) -> ModelConfig:
    """The MHA configuration that :func:`expand_kv` maps a grouping of `cfg` onto."""
    return cfg.replace(n_kv_heads=cfg.n_heads, kv_head_map=None)


def kv_index(cfg: ModelConfig) -> list:
    """Per layer, int32 [N]: the KV head each query head reads (a device array, traced in jit)."""
    return [jnp.asarray(cfg.layer_kv_head_map(i), jnp.int32) for i in range(cfg.n_layers)]


def expand_kv(params: dict, index: list, head_dim: int) -> dict:
    """Grouped (unfused) params -> the equivalent MHA params, by gathering K/V head columns.

    Args:
      params: unfused params whose ``k_proj``/``v_proj`` kernels are [D, K·H].
      index: per layer int [N], the KV head of every query head (may be traced).
      head_dim: H.

    Returns:
      The same tree with ``k_proj``/``v_proj`` kernels [D, N·H]; column block h is KV head
      ``index[h]``'s. Under ``mha_config(cfg)`` it computes what the grouped model computes.
    """
    out = dict(params)
    for i, idx in enumerate(index):
        layer = dict(out[f"layer_{i}"])
        attn = dict(layer["attn"])
        for name in ("k_proj", "v_proj"):
            w = attn[name]["kernel"]
            D = w.shape[0]
            heads = w.reshape(D, -1, head_dim)  # [D, K, H]
            attn[name] = {"kernel": jnp.take(heads, idx, axis=1).reshape(D, -1)}  # [D, N*H]
        layer["attn"] = attn
        out[f"layer_{i}"] = layer
    return out


@dataclasses.dataclass(frozen=True)
class ExpandToMHA:
    """``to_model_params`` for the training loop: trainable -> MHA-form model params.

    Static (hashable) state only: the head width and, for ``learned_weights``, the
    parametrization that builds the grouped params first. The grouping itself arrives as the
    traced ``aux`` argument (:func:`kv_index`), so it is not part of the compiled step.
    """

    head_dim: int
    parametrization: Any = None

    def __call__(self, trainable, index):
        grouped = trainable if self.parametrization is None else self.parametrization(trainable)
        return expand_kv(grouped, index, self.head_dim)


def to_mha(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """A grouped model as its exactly equivalent MHA model (for evaluation with one compile
    per architecture rather than one per grouping). Unfused layout."""
    if is_fused(params):
        params = unfuse_layers(cfg, params)
    return mha_config(cfg), expand_kv(params, kv_index(cfg), cfg.head_dim)


def uptrain(cfg: ModelConfig, params: dict, train_windows, *, steps: Optional[int] = None,
            tc: Optional[TrainConfig] = None, report=None, source_params: Optional[dict] = None,
            eval_windows=None,
            out_dir: Optional[str] = None, progress: bool = True
            ) -> tuple[ModelConfig, dict, TrainResult]:
    """Continue training a converted model with its groups fixed.

    Args:
      cfg, params: the converted model (``convert_to_gqa``'s first two results; float params,
        either layout).
      train_windows: int [n, T] token windows (``optgqa_jax.data.corpus_windows``).
      steps: number of optimizer steps (overrides ``tc.steps``; one of the two is needed).
      tc: training settings; default ``TrainConfig(steps=steps)`` with a warmup of a tenth
        of the steps.
      report: the conversion's ``GroupingReport``; when it carries a parametrization
        (``learned_weights``), its trainable parameters are trained.
      source_params: the params the conversion started from; needed with a parametrization,
        whose per-head K/V projections are the source model's (the converted params hold
        only their initial merge).
      eval_windows: optional held-out windows, scored during and after training.
      out_dir: checkpoints and logs (see :func:`optgqa_jax.train.train`).
      progress: tqdm bar.

    Returns:
      ``(cfg, params, result)``: the same config, the uptrained params (unfused, in
      ``cfg.dtype``) and the training loop's result (history, tokens/s).

    Raises:
      ValueError: neither `steps` nor `tc`, steps < 1, params not matching `cfg`, a report
        whose parametrization belongs to another configuration, or one without
        `source_params`.
    """
    if tc is None:
        if steps is None:
            raise ValueError("uptrain needs steps=... or tc=TrainConfig(...)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive integer")
        tc = TrainConfig(steps=steps, warmup_steps=max(1, steps // 10))
    elif steps is not None:
        tc = dataclasses.replace(tc, steps=steps)
    check_float_params(cfg, params)
    if is_fused(params):
        params = unfuse_layers(cfg, params)
    parametrization = getattr(report, "parametrization", None)
    if parametrization is not None:
        if parametrization.cfg != cfg:
            raise ValueError("report.parametrization was made for another configuration "
                             "than cfg; pass the report of this conversion")
        if source_params is None:
            raise ValueError(f"report.parametrization ({report.strategy}) trains the source "
                             "model's per-head K/V projections: pass source_params=")
        parametrization = dataclasses.replace(parametrization, fused=False)  # expand_kv: unfused
        trainable = parametrization.init(source_params)
    else:
        trainable = params
    expand = ExpandToMHA(cfg.head_dim, parametrization)
    result = train(mha_config(cfg), trainable, train_windows, tc, eval_windows=eval_windows,
                   out_dir=out_dir, progress=progress, to_model_params=expand,
                   aux=kv_index(cfg))
    grouped = result.params if parametrization is None else parametrization(result.params)
    grouped = jax.tree_util.tree_map(lambda x: jnp.asarray(x, cfg.jnp_dtype), grouped)
    return cfg, grouped, result

