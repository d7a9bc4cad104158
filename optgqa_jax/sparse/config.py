"""SparsityConfig: how GQSA prunes whole quantization groups."""

from __future__ import annotations

import dataclasses

SCORES = ("hessian", "magnitude")
SCOPES = ("row", "layer")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """Settings of group pruning (``optgqa_jax.sparse.prune``).

    A *group* is ``group_size`` consecutive input weights of one output feature: exactly a
    quantization group of ``QuantConfig(group_size=...)``, so a pruned group is a group whose
    codes and scale need not be stored (GQSA's "group sparsity").

    Attributes:
      sparsity: fraction of groups removed, in [0, 1). With ``scope="row"`` every output
        feature keeps ``G - round(sparsity * G)`` of its G groups; with ``"layer"`` the layer
        keeps ``G N - round(sparsity * G N)`` groups, spread over the features by score.
      score: ``"hessian"`` (the optimal-brain-surgeon cost of removing the group,
        ``w_g^T [(H^-1)_gg]^-1 w_g``, with the calibration Hessian) or ``"magnitude"``
        (``||w_g||^2``).
      scope: ``"row"`` (the same count per output feature: balanced rows) or ``"layer"``.
      damp: relative dampening of H before inversion, ``damp * mean(diag H)`` (as GPTQ).
      row_block: output features that share one mask (1: each feature its own, GQSA's
        pattern). With ``row_block = b`` the features ``[j b, (j + 1) b)`` keep the same
        groups, chosen by the sum of their scores (the last block may be narrower): the
        pattern a kernel can multiply as dense ``[group_size, b]`` tiles, each sharing one
        slice of x, where per-feature masks make every kept group gather its own slice.
        ``scope="row"`` keeps the same count in every block, so in every feature. Such
        layers serve as ``sparse.RowBlockQuantizedLinear`` (``sparse.to_row_block_params``),
        multiplied by the dense W4 kernel over each block's kept groups;
        ``sparse.reorder_mlp_for_row_blocks`` first puts MLP features that want the same
        groups into one block.
    """

    sparsity: float = 0.5
    score: str = "hessian"
    scope: str = "row"
    damp: float = 0.01
    row_block: int = 1

    def __post_init__(self):
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity={s!r} must be a fraction in [0, 1) (1 would remove every "
                             "group)")
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} must be one of {SCORES}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r} must be one of {SCOPES}")
        if not self.damp >= 0:
            raise ValueError(f"damp={self.damp!r} must be >= 0")
        rb = self.row_block
        if isinstance(rb, bool) or not isinstance(rb, int) or rb < 1:
            raise ValueError(f"row_block={rb!r} must be a positive int")

    def pruned_count(self, groups: int) -> int:
        """How many of `groups` groups are removed: ``round(sparsity * groups)``."""
        return int(round(self.sparsity * groups))

    def tag(self) -> str:
        """A short name for file names and tables, e.g. ``"s50"`` or ``"s50rb16"``."""
        rb = f"rb{self.row_block}" if self.row_block > 1 else ""
        return f"s{round(100 * self.sparsity)}{rb}"


@dataclasses.dataclass(frozen=True)
class NMSparsity:
    """Semi-structured N:M sparsity (the 2:4 pattern of sparse tensor cores): of every M
    consecutive input weights of an output feature, the N of largest magnitude are kept.

    The baseline GQSA is compared with; pruned weights are stored as exact zeros in dense
    layouts (JAX has no sparse-tensor-core product).
    """

    n: int = 2
    m: int = 4

    def __post_init__(self):
        for name in ("n", "m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be smaller than m={self.m}")

    def tag(self) -> str:
        """A short name for file names and tables, e.g. ``"2:4"``."""
        return f"{self.n}:{self.m}"
