"""``convert_to_gqa``: one entry point for every MHA -> GQA grouping strategy.

The driver validates everything first, expresses the source as per-query-head
K/V projections (``common.layer_heads``, the same thing
:func:`~optgqa_jax.grouping.common.expand_to_mha` writes out), collects
calibration statistics when windows are given, lets the strategy convert each
layer, assembles the converted model in the layout it was given, and measures
each layer's attention-output error on the calibration windows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import numpy as np

from optgqa_jax.config import ModelConfig
from optgqa_jax.evaluate import check_windows
from optgqa_jax.fused import fuse_layers
from optgqa_jax.grouping import (activation, aligned, key_norm, learned_weights, mean_pool,
                                 random_groups, weight_error)
from optgqa_jax.grouping.common import (LayerContext, LayerConversion, Strategy, as_unfused,
                                        build_converted, calibration_stats, check_float_params,
                                        check_positive_int, layer_errors, layer_heads)

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    mean_pool.STRATEGY, activation.STRATEGY, weight_error.STRATEGY, aligned.STRATEGY,
    learned_weights.STRATEGY, key_norm.STRATEGY, random_groups.STRATEGY)}


@dataclasses.dataclass
class GroupingReport:
    """What a conversion did, per layer.

    Attributes:
      strategy: strategy name.
      n_kv_heads: K of the converted model.
      equal_groups: whether groups were restricted to N / K heads.
      options: the strategy options used (defaults filled in).
      groups: per layer, the converted ``kv_head_map`` (new KV head of every query head).
      objective_name: what ``objective`` measures (strategy-specific).
      objective: per layer, the strategy's objective value.
      layer_error: per layer, ``‖attn_new(x) − attn(x)‖_F / ‖attn(x)‖_F`` on the
        calibration windows (x: the layer's input in the source model), or None
        without calibration or with ``compute_layer_error=False``.
      kv_bytes_per_token_before: KV-cache bytes per token of the source model.
      kv_bytes_per_token_after: the same for the converted model.
      seconds: wall time of the conversion.
      parametrization: trainable parametrization (``learned_weights``), else None.
    """

    strategy: str
    n_kv_heads: int
    equal_groups: bool
    options: dict
    groups: list
    objective_name: str
    objective: list
    layer_error: Optional[list]
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    seconds: float
    parametrization: Any = None

    def to_dict(self) -> dict:
        """JSON-ready dict (the parametrization appears by type name)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["groups"] = [list(g) for g in self.groups]
        d["parametrization"] = (None if self.parametrization is None
                                else type(self.parametrization).__name__)
        return d


def _check_conversion(conv: LayerConversion, n_heads: int, n_kv_heads: int,
                      equal_groups: bool, layer: int) -> None:
    """Internal invariants every strategy must keep (a failure here is a bug)."""
    counts = np.bincount(conv.labels, minlength=n_kv_heads)
    ok = (conv.labels.shape == (n_heads,) and len(counts) == n_kv_heads and counts.min() >= 1
          and (not equal_groups or counts.max() == counts.min())
          and conv.labels.tolist() == _first_seen(conv.labels.tolist()))
    if not ok:
        raise RuntimeError(f"layer {layer}: strategy produced invalid groups {conv.labels}")


def _first_seen(labels: list) -> list:
    order = {}
    return [order.setdefault(g, len(order)) for g in labels]


def convert_to_gqa(cfg: ModelConfig, params: dict, n_kv_heads: int, strategy: str = "mean_pool",
                   calibration=None, *, equal_groups: bool = True, seed: int = 0,
                   batch_size: int = 8, compute_layer_error: bool = True, **strategy_options
                   ) -> tuple[ModelConfig, dict, GroupingReport]:
    """Convert a model's attention to grouped-query attention with K = `n_kv_heads` KV heads.

    Every layer's N query heads are partitioned into K groups by `strategy`,
    and each group's per-query-head K/V projections become one KV head. Query
    heads are never reordered, so ALiBi slopes stay with their heads; q/o
    projections change only where the strategy transforms them (``aligned``).

    Args:
      cfg: source configuration (MHA, or GQA with any ``kv_head_map``).
      params: its float params, unfused or fused layout (the result has the same).
      n_kv_heads: K, 1 <= K <= n_heads, the same for every layer.
      strategy: one of ``STRATEGIES``: ``"mean_pool"``, ``"activation"``,
        ``"weight_error"``, ``"aligned"``, ``"learned_weights"``, ``"key_norm"``,
        ``"random"`` (see each module's docstring for its objective).
      calibration: int token windows [n, T], T >= 2. Needed by ``activation``
        and ``key_norm``; when given, also used by ``aligned`` (Procrustes on
        activations) and for the report's per-layer error.
      equal_groups: restrict groups to N / K heads (requires K | N).
      seed: seeds random restarts and the ``random`` strategy.
      batch_size: calibration windows per forward pass.
      compute_layer_error: measure the report's per-layer error (one more pass
        over the calibration windows) when calibration is given.
      **strategy_options: the strategy's own options (module docstrings).

    Returns:
      (cfg2 with ``n_kv_heads = K`` and an explicit per-layer ``kv_head_map``
      whose groups are numbered by their smallest query head, params2,
      :class:`GroupingReport`).

    Raises:
      ValueError (naming the argument): K outside [1, N], unknown strategy or
        option, equal_groups with N % K != 0, unequal groups asked of a strategy
        that makes equal ones only, missing or bad calibration where needed,
        params that do not match `cfg` or hold quantized kernels.
    """
    start = time.perf_counter()
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    N = cfg.n_heads
    if (isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, (int, np.integer))
            or not 1 <= n_kv_heads <= N):
        raise ValueError(f"n_kv_heads must be an integer in [1, n_heads={N}], got {n_kv_heads!r}")
    n_kv_heads = int(n_kv_heads)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    strat = STRATEGIES[strategy]
    for name, flag in (("equal_groups", equal_groups), ("compute_layer_error", compute_layer_error)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if equal_groups and N % n_kv_heads:
        raise ValueError(f"equal_groups=True needs n_heads={N} to be a multiple of "
                         f"n_kv_heads={n_kv_heads}; pass equal_groups=False for unequal groups")
    unknown = sorted(set(strategy_options) - set(strat.options))
    if unknown:
        raise ValueError(f"strategy {strategy!r} takes no option(s) {unknown}; its options are "
                         f"{sorted(strat.options)}")
    options = {**strat.options, **strategy_options}
    if strat.check_options is not None:
        strat.check_options(options)
    grouping, group_options = strat, options
    groups_from = options.get("groups_from")
    if groups_from is not None:
        if groups_from not in STRATEGIES or groups_from == strategy:
            raise ValueError(f"groups_from must be None or another strategy, one of "
                             f"{sorted(set(STRATEGIES) - {strategy})}; got {groups_from!r}")
        grouping = STRATEGIES[groups_from]
        # Options both strategies know (the partition search's) carry over.
        group_options = {**grouping.options, **{k: v for k, v in options.items()
                                                if k in grouping.options and k != "groups_from"}}
    if not equal_groups and not grouping.unequal_groups:
        raise ValueError(f"strategy {grouping.name!r} makes equal groups only; "
                         "equal_groups=False is not supported by it")
    if calibration is None and (strat.needs_calibration or grouping.needs_calibration):
        raise ValueError(f"strategy {grouping.name!r} needs calibration token windows "
                         "(calibration=int [n, T])")
    windows = None if calibration is None else check_windows(cfg, calibration, "calibration")
    check_positive_int("batch_size", batch_size)
    check_positive_int("seed", seed, minimum=0)
    check_float_params(cfg, params)

    source, fused = as_unfused(cfg, params)
    stats = None if windows is None else calibration_stats(cfg, source, windows, batch_size)
    conversions = []
    for i in range(cfg.n_layers):
        ctx = LayerContext(cfg=cfg, layer=i, heads=layer_heads(cfg, source, i),
                           n_kv_heads=n_kv_heads, equal_groups=equal_groups,
                           rng=np.random.default_rng([seed, i]),
                           covariance=None if stats is None else stats.covariance[i],
                           key_norm=None if stats is None else stats.key_norm[i])
        if groups_from is not None:
            ctx = dataclasses.replace(ctx, given_labels=grouping.group(ctx, group_options))
        conv = strat.convert(ctx, options)
        _check_conversion(conv, N, n_kv_heads, equal_groups, i)
        conversions.append(conv)
    cfg2, converted = build_converted(cfg, source, conversions, n_kv_heads)
    errors = (None if windows is None or not compute_layer_error
              else layer_errors(cfg, source, cfg2, converted, windows, batch_size))
    report = GroupingReport(
        strategy=strategy, n_kv_heads=n_kv_heads, equal_groups=equal_groups, options=options,
        groups=list(cfg2.kv_head_map), objective_name=strat.objective_name,
        objective=[c.objective for c in conversions], layer_error=errors,
        kv_bytes_per_token_before=cfg.kv_bytes_per_token,
        kv_bytes_per_token_after=cfg2.kv_bytes_per_token,
        seconds=time.perf_counter() - start,
        parametrization=(None if strat.parametrization is None
                         else strat.parametrization(cfg, cfg2, fused)))
    return cfg2, (fuse_layers(cfg2, converted) if fused else converted), report
