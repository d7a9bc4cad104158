"""Group sizes driven by key norms, after KDGQA.

Khan et al., 2024, "Beyond Uniform Query Distribution: Key-Driven Grouped
Query Attention" (arXiv:2408.08454) stop giving every KV head the same
number of queries: KDGQA measures the L2 norms n_g of the key heads and
allocates query heads to KV head g in proportion to them,

    Q_g ∝ n_g,   Σ_g Q_g = N,

so a KV head with larger keys serves more queries (their DGQA tracks the
norms during training instead). They allocate within a GQA model whose KV
heads already exist; converting from MHA, every query head h starts with its
own key, so we adapt the rule to form the groups:

1. ν_h = mean over calibration tokens of ‖k_{h,t}‖₂ (RoPE keeps norms, so
   before and after RoPE alike).
2. Heads are sorted by ν, largest first; groups are contiguous runs of this
   order, so each group holds heads of similar key norm.
3. Equal groups: runs of N / K heads. Unequal groups: the sorted heads are
   cut into K nearly equal chunks, whose mean norms n_g stand for the KV
   heads' norms; sizes Q_g ∝ n_g (``larger_norms="more_queries"``, the
   paper's direction) or Q_g ∝ 1/n_g (``"fewer_queries"``: heads with larger
   keys, whose logits move most when their key is averaged, share with fewer
   others), rounded by largest remainders with every Q_g >= 1. We use the
   plain ratio of norms; with the min-max scaled norms of some descriptions
   of KDGQA the smallest group would always shrink to one head.

The merge is the group mean (as in the paper's GQA). The reported objective
is the share of the key-norm variance left within groups,
``Σ_g Σ_{h∈g} (ν_h − ν̄_g)² / Σ_h (ν_h − ν̄)²`` (0: every group's norms equal).
Needs calibration windows.
"""

from __future__ import annotations

import numpy as np

from optgqa_jax.grouping.common import (LayerContext, LayerConversion, Strategy,
                                        canonical_labels, mean_merge, merge_mean)

DIRECTIONS = ("more_queries", "fewer_queries")


def group_sizes(anchor_norms: np.ndarray, n_heads: int, larger_norms: str) -> np.ndarray:
    """Sizes Q_g >= 1 summing to N, proportional to the norms (or their inverses), [K]."""
    w = anchor_norms if larger_norms == "more_queries" else 1.0 / np.maximum(anchor_norms, 1e-300)
    quota = n_heads * w / w.sum()
    sizes = np.maximum(np.floor(quota), 1).astype(np.int64)
    while sizes.sum() < n_heads:  # largest remainder first (first index on ties)
        sizes[int(np.argmax(quota - sizes))] += 1
    while sizes.sum() > n_heads:  # only when the floor of 1 overshot: trim the most over quota
        excess = np.where(sizes > 1, sizes - quota, -np.inf)
        sizes[int(np.argmax(excess))] -= 1
    return sizes


def _group(ctx: LayerContext, options) -> np.ndarray:
    nu = ctx.key_norm  # [N]
    N, K = nu.shape[0], ctx.n_kv_heads
    order = np.argsort(-nu, kind="stable")  # largest norm first
    if ctx.equal_groups:
        sizes = np.full(K, N // K)
    else:
        anchors = np.array([nu[chunk].mean() for chunk in np.array_split(order, K)])
        sizes = group_sizes(anchors, N, options["larger_norms"])
    labels = np.empty(N, dtype=np.int64)
    labels[order] = np.repeat(np.arange(K), sizes)
    return canonical_labels(labels)


def _convert(ctx: LayerContext, options) -> LayerConversion:
    labels = _group(ctx, options)
    nu = ctx.key_norm
    within = np.sum((nu - merge_mean(nu, labels, ctx.n_kv_heads)[labels]) ** 2)
    total = np.sum((nu - nu.mean()) ** 2)
    return mean_merge(ctx, labels, float(within / total) if total > 0 else 0.0)


def _check(options) -> None:
    if options["larger_norms"] not in DIRECTIONS:
        raise ValueError(f"larger_norms must be one of {DIRECTIONS}, "
                         f"got {options['larger_norms']!r}")


STRATEGY = Strategy(name="key_norm", convert=_convert, group=_group,
                    objective_name="share of key-norm variance within groups",
                    needs_calibration=True, options={"larger_norms": "more_queries"},
                    check_options=_check)
