"""MHA -> GQA conversion: group the query heads, share one K/V head per group.

Every strategy sees the source model as MHA (:func:`expand_to_mha`: query
head h owns the K/V projection of the KV head it reads), partitions the N
query heads of each layer into K groups and builds each new KV head from its
group's projections; :func:`convert_to_gqa` runs any of them::

    cfg2, params2, report = convert_to_gqa(cfg, params, 2, "activation", windows)

Strategies (one module each, objective and paper in its docstring):
``mean_pool`` (contiguous, Ainslie et al. 2023), ``activation`` (activation
similarity, Opt-GQA / AsymGQA), ``weight_error`` (weight-sharing error,
QCQA), ``aligned`` (Procrustes alignment before merging, Jin et al. 2024),
``learned_weights`` (WGQA weights, trainable), ``key_norm`` (KDGQA key norms)
and ``random`` (control).
"""

from optgqa_jax.grouping.common import expand_to_mha
from optgqa_jax.grouping.convert import STRATEGIES, GroupingReport, convert_to_gqa
from optgqa_jax.grouping.learned_weights import WeightedGroups

__all__ = ["STRATEGIES", "GroupingReport", "WeightedGroups", "convert_to_gqa", "expand_to_mha"]
