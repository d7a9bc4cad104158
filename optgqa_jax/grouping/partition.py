"""Partition search: split N items into K groups maximising a size-normalised within-group sum.

Several strategies reduce to one combinatorial problem. Given a symmetric
N×N matrix S (a Gram matrix of per-head features, a similarity, or minus
half a squared distance) find labels maximising

    F(labels) = Σ_g (1/|g|) Σ_{h,h'∈g} S[h, h'].

When S is the Gram matrix of features z_h this is k-means:
``Σ_g Σ_{h∈g} ‖z_h − z̄_g‖² = tr S − F``, so maximising F minimises the
within-group dispersion around the group means. With S = −D/2 for squared
distances D it is the size-normalised sum of pairwise within-group distances
(again k-means when D is Euclidean).

Search: exact enumeration of all partitions when there are at most
``exhaustive_limit`` of them (restricted-growth strings, so each partition is
seen once), otherwise a seeded multi-restart steepest-ascent local search over
single-head moves (unequal groups) and pairwise swaps (both), started from a
deterministic constructive partition (Ward agglomeration, or greedy balanced
filling for equal groups) and from random partitions. Every result is the
canonical labeling (groups numbered by their smallest member).

Axis legend: N items (query heads), K groups, P candidate partitions.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from optgqa_jax.grouping.common import canonical_labels, membership

EXHAUSTIVE_LIMIT = 20_000


def objective(S: np.ndarray, labels: np.ndarray, n_groups: int) -> float:
    """F(labels) = Σ_g (1/|g|) Σ_{h,h'∈g} S[h, h']."""
    M = membership(labels, n_groups)  # [N, K]
    within = np.einsum("nk,nm,mk->k", M, S, M)  # [K]
    return float(np.sum(within / M.sum(0)))


def count_partitions(n_items: int, n_groups: int, equal_sizes: bool) -> int:
    """Number of partitions of n_items into n_groups non-empty (or equal-size) groups."""
    if equal_sizes:
        g = n_items // n_groups
        return math.factorial(n_items) // (math.factorial(g) ** n_groups
                                           * math.factorial(n_groups))
    # Stirling numbers of the second kind, S(n, k) = k S(n-1, k) + S(n-1, k-1).
    row = [1] + [0] * n_groups
    for _ in range(n_items):
        row = [0] + [j * row[j] + row[j - 1] for j in range(1, n_groups + 1)]
    return row[n_groups]


def enumerate_partitions(n_items: int, n_groups: int, equal_sizes: bool) -> np.ndarray:
    """All partitions as canonical labels, int [P, N], in lexicographic order."""
    cap = n_items // n_groups if equal_sizes else n_items
    out, labels, counts = [], [0] * n_items, [0] * n_groups

    def extend(i: int, used: int):
        if n_groups - used > n_items - i:  # not enough items left to open the other groups
            return
        if i == n_items:
            out.append(list(labels))
            return
        for g in range(min(used + 1, n_groups)):
            if counts[g] < cap:
                labels[i] = g
                counts[g] += 1
                extend(i + 1, max(used, g + 1))
                counts[g] -= 1

    extend(0, 0)
    return np.asarray(out, dtype=np.int64).reshape(-1, n_items)


def _best_of(S: np.ndarray, candidates: np.ndarray, n_groups: int) -> np.ndarray:
    """The candidate with the largest F (the first one on ties), vectorised in chunks."""
    best, best_value = None, -np.inf
    for start in range(0, len(candidates), 4096):
        chunk = candidates[start:start + 4096]  # [P, N]
        M = np.eye(n_groups)[chunk]  # [P, N, K]
        within = np.einsum("pnk,nm,pmk->pk", M, S, M)  # [P, K]
        values = np.sum(within / M.sum(1), axis=1)  # [P]
        j = int(np.argmax(values))
        if values[j] > best_value:
            best, best_value = chunk[j], values[j]
    return best


def local_search(S: np.ndarray, labels: np.ndarray, n_groups: int, equal_sizes: bool,
                 max_steps: Optional[int] = None) -> np.ndarray:
    """Steepest ascent on F from `labels` with pairwise swaps and (unequal sizes) moves.

    Every step takes the single best improving swap or move, so sizes stay
    equal under swaps and no group ever empties under moves. Stops at a local
    optimum (no change improves F by more than a rounding-level tolerance).
    """
    labels = np.array(labels, dtype=np.int64)
    N = labels.shape[0]
    d = np.diag(S)
    tol = 1e-12 * max(1.0, float(np.abs(S).sum()))
    rows = np.arange(N)
    for _ in range(max_steps or 4 * N * N):
        M = membership(labels, n_groups)  # [N, K]
        A = S @ M  # [N, K]: A[h, g] = Σ_{h'∈g} S[h, h']
        n = M.sum(0)  # [K]
        T = np.einsum("nk,nk->k", M, A)  # [K] within-group sums
        own = A[rows, labels]  # [N]
        size = n[labels]  # [N]
        # Swap h (group a) with h' (group b): the new within sums of a and b.
        cross = A[:, labels]  # cross[h, h'] = A[h, label of h']
        dT_a = -2 * own[:, None] + d[:, None] + 2 * cross.T - 2 * S + d[None, :]
        dT_b = -2 * own[None, :] + d[None, :] + 2 * cross - 2 * S + d[:, None]
        swap_gain = dT_a / size[:, None] + dT_b / size[None, :]
        swap_gain[labels[:, None] == labels[None, :]] = -np.inf
        h, h2 = np.unravel_index(int(np.argmax(swap_gain)), swap_gain.shape)
        gain, op = swap_gain[h, h2], ("swap", h, h2)
        if not equal_sizes:
            # Move h from its group a to group b.
            with np.errstate(divide="ignore", invalid="ignore"):
                leave = (T[labels] - 2 * own + d) / (size - 1) - T[labels] / size  # [N]
            join = (T[None, :] + 2 * A + d[:, None]) / (n[None, :] + 1) - T[None, :] / n  # [N, K]
            move_gain = leave[:, None] + join
            move_gain[rows, labels] = -np.inf
            move_gain[size == 1, :] = -np.inf
            m, g = np.unravel_index(int(np.argmax(move_gain)), move_gain.shape)
            if move_gain[m, g] > gain:
                gain, op = move_gain[m, g], ("move", m, g)
        if not gain > tol:
            break
        if op[0] == "swap":
            labels[op[1]], labels[op[2]] = labels[op[2]], labels[op[1]]
        else:
            labels[op[1]] = op[2]
    return canonical_labels(labels)


def agglomerate(S: np.ndarray, n_groups: int) -> np.ndarray:
    """Greedy merging from singletons, each time the pair of groups whose merge lowers F least.

    For a Gram matrix the cost of merging A and B is Ward's
    ``|A||B| / (|A|+|B|) · ‖z̄_A − z̄_B‖²``.
    """
    N = S.shape[0]
    groups = [[h] for h in range(N)]
    B = S.copy()  # B[a, b] = Σ_{h∈a, h'∈b} S[h, h'] between current groups
    size = np.ones(N)
    while len(groups) > n_groups:
        T = np.diag(B)
        merged = (T[:, None] + T[None, :] + 2 * B) / (size[:, None] + size[None, :])
        cost = (T / size)[:, None] + (T / size)[None, :] - merged
        np.fill_diagonal(cost, np.inf)
        a, b = sorted(np.unravel_index(int(np.argmin(cost)), cost.shape))
        groups[a] += groups.pop(b)
        B[a, :] += B[b, :]
        B[:, a] += B[:, b]
        B = np.delete(np.delete(B, b, 0), b, 1)
        size[a] += size[b]
        size = np.delete(size, b)
    labels = np.empty(N, dtype=np.int64)
    for g, members in enumerate(groups):
        labels[members] = g
    return canonical_labels(labels)


def greedy_balanced(S: np.ndarray, n_groups: int) -> np.ndarray:
    """Equal-size groups filled one at a time: seed with the first free item, then add the free
    item with the largest sum of S to the group so far."""
    N = S.shape[0]
    size = N // n_groups
    labels = np.full(N, -1, dtype=np.int64)
    for g in range(n_groups):
        members = [int(np.flatnonzero(labels < 0)[0])]
        labels[members[0]] = g
        while len(members) < size:
            free = np.flatnonzero(labels < 0)
            pick = int(free[np.argmax(S[np.ix_(free, members)].sum(1))])
            labels[pick] = g
            members.append(pick)
    return canonical_labels(labels)


def random_partition(n_items: int, n_groups: int, equal_sizes: bool,
                     rng: np.random.Generator) -> np.ndarray:
    """A random partition: equal sizes, or sizes from a uniformly drawn composition of n_items
    into n_groups positive parts; members drawn by a random permutation."""
    if equal_sizes:
        sizes = [n_items // n_groups] * n_groups
    else:
        cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_groups - 1, replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [n_items]])).tolist()
    labels = np.repeat(np.arange(n_groups), sizes)[rng.permutation(n_items)]
    return canonical_labels(labels)


def best_partition(S: np.ndarray, n_groups: int, *, equal_sizes: bool, rng: np.random.Generator,
                   restarts: int = 8, exhaustive_limit: int = EXHAUSTIVE_LIMIT) -> np.ndarray:
    """Canonical labels [N] maximising F (exactly when the partitions are few enough to list).

    Args:
      S: symmetric [N, N] float matrix.
      n_groups: K, 1 <= K <= N (K divides N when equal_sizes).
      equal_sizes: restrict to groups of N / K items.
      rng: seeds the random restarts.
      restarts: local-search starts (one constructive, the rest random).
      exhaustive_limit: enumerate every partition when there are at most this many.
    """
    S = np.asarray(S, dtype=np.float64)
    S = (S + S.T) / 2
    N = S.shape[0]
    if count_partitions(N, n_groups, equal_sizes) <= exhaustive_limit:
        return _best_of(S, enumerate_partitions(N, n_groups, equal_sizes), n_groups)
    first = greedy_balanced(S, n_groups) if equal_sizes else agglomerate(S, n_groups)
    starts = [first] + [random_partition(N, n_groups, equal_sizes, rng)
                        for _ in range(max(restarts, 1) - 1)]
    found = np.stack([local_search(S, s, n_groups, equal_sizes) for s in starts])
    return _best_of(S, found, n_groups)
