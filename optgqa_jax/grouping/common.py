"""Shared machinery of the MHA -> GQA conversions.

Every strategy works on per-query-head key/value projections: a source model
(MHA, or GQA with any ``kv_head_map``) is first written exactly as MHA, query
head h owning a copy of the K/V projection columns of the KV head it reads
(:func:`expand_to_mha`). A strategy then partitions the N query heads into K
groups and builds each new KV head from the projections of its group. This
module holds what all strategies share: the layout conversions, per-head
projections in float64, merging by group mean, assembling the converted
config and parameters, the two calibration passes (statistics for the
strategies, attention-output error for the report) and the strategy record.

Axis legend: N query heads, K new KV heads, D model dim, H head dim,
B calibration windows in a batch, T tokens per window.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.config import ModelConfig
from optgqa_jax.fused import fuse_layers, is_fused
from optgqa_jax.model import Attention, Transformer, check_params_match
from optgqa_jax.quant.linear import is_quantized


# ----------------------------------------------------------------------------- layouts
def unfuse_layers(cfg: ModelConfig, params: dict) -> dict:
    """The unfused layout of a fused float tree (inverse of ``fused.fuse_layers``).

    Leaves other than the fused projections are shared, not copied.
    """
    N, K, H, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    out = dict(params)
    for i in range(cfg.n_layers):
        layer = dict(params[f"layer_{i}"])
        attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
        q, k, v = jnp.split(attn.pop("qkv_proj")["kernel"], [N * H, (N + K) * H], axis=1)
        gate, up = jnp.split(mlp.pop("gate_up_proj")["kernel"], [F], axis=1)
        attn.update(q_proj={"kernel": q}, k_proj={"kernel": k}, v_proj={"kernel": v})
        mlp.update(gate_proj={"kernel": gate}, up_proj={"kernel": up})
        layer["attn"], layer["mlp"] = attn, mlp
        out[f"layer_{i}"] = layer
    return out


def check_float_params(cfg: ModelConfig, params: dict, what: str = "params") -> None:
    """Raise ValueError for quantized leaves or a tree that does not match `cfg`."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_quantized)
    if any(is_quantized(leaf) for leaf in leaves):
        raise ValueError(f"{what} hold quantized kernels; MHA -> GQA conversion works on float "
                         "weights: convert first, then quantize")
    check_params_match(cfg, params, what)


def as_unfused(cfg: ModelConfig, params: dict) -> tuple[dict, bool]:
    """(unfused params, whether the input was fused)."""
    fused = is_fused(params)
    return (unfuse_layers(cfg, params) if fused else params), fused


# ----------------------------------------------------------------------------- per-head weights
class LayerHeads(NamedTuple):
    """One layer's attention projections split per query head, float64.

    Attributes:
      q: [N, D, H] query projection of each head.
      k: [N, D, H] key projection each query head reads (a copy per head for GQA sources).
      v: [N, D, H] value projection each query head reads.
      o: [N, H, D] rows of the output projection that take each head's output.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray


def _to_f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def layer_heads(cfg: ModelConfig, params: dict, layer: int) -> LayerHeads:
    """Per-query-head projections of one layer of unfused `params`."""
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    attn = params[f"layer_{layer}"]["attn"]
    kv_map = np.asarray(cfg.layer_kv_head_map(layer))
    q = _to_f64(attn["q_proj"]["kernel"]).reshape(D, N, H).transpose(1, 0, 2)  # [N, D, H]
    k = _to_f64(attn["k_proj"]["kernel"]).reshape(D, K, H).transpose(1, 0, 2)  # [K, D, H]
    v = _to_f64(attn["v_proj"]["kernel"]).reshape(D, K, H).transpose(1, 0, 2)  # [K, D, H]
    o = _to_f64(attn["o_proj"]["kernel"]).reshape(N, H, D)  # [N, H, D]
    return LayerHeads(q=q, k=k[kv_map], v=v[kv_map], o=o)


def heads_to_kernel(heads: np.ndarray, dtype) -> jax.Array:
    """[n, D, H] per-head projections -> [D, n*H] kernel (head-major column blocks) in `dtype`."""
    n, D, H = heads.shape
    return jnp.asarray(heads.transpose(1, 0, 2).reshape(D, n * H).astype(np.float32), dtype)


def expand_to_mha(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """Write a GQA model (any ``kv_head_map``) exactly as MHA.

    Query head h gets its own copy of the K/V projection columns of the KV
    head it reads, so the MHA model computes the same function bit for bit
    (the columns are copied, not recomputed). An MHA source with the default
    map comes back with the same values.

    Args:
      cfg: the source configuration.
      params: float parameters of `cfg`, unfused or fused layout.

    Returns:
      (cfg with ``n_kv_heads = n_heads`` and the default map, params in the
      layout of the input: k/v kernels [D, N*H]).

    Raises:
      ValueError: params do not match `cfg`, or hold quantized kernels.
    """
    check_float_params(cfg, params)
    cfg_mha = cfg.replace(n_kv_heads=cfg.n_heads, kv_head_map=None)
    unfused, fused = as_unfused(cfg, params)
    out = dict(unfused)
    for i in range(cfg.n_layers):
        kv_map = np.asarray(cfg.layer_kv_head_map(i))
        # Column index of every (query head, dim) pair in the source kernel: a pure gather.
        cols = (kv_map[:, None] * cfg.head_dim + np.arange(cfg.head_dim)).reshape(-1)  # [N*H]
        layer = dict(unfused[f"layer_{i}"])
        attn = dict(layer["attn"])
        for name in ("k_proj", "v_proj"):
            attn[name] = {"kernel": jnp.take(attn[name]["kernel"], cols, axis=1)}
        layer["attn"] = attn
        out[f"layer_{i}"] = layer
    return cfg_mha, (fuse_layers(cfg_mha, out) if fused else out)


# ----------------------------------------------------------------------------- groups
def canonical_labels(labels) -> np.ndarray:
    """Relabel a partition so that groups are numbered by their smallest member.

    ``[2, 2, 0, 1, 0] -> [0, 0, 1, 2, 1]``: two labelings of the same
    partition give the same array.
    """
    labels = np.asarray(labels)
    order = {}
    for g in labels.tolist():
        order.setdefault(g, len(order))
    return np.array([order[g] for g in labels.tolist()], dtype=np.int64)


def membership(labels: np.ndarray, n_groups: int) -> np.ndarray:
    """One-hot group membership, float64 [N, K]."""
    return np.eye(n_groups)[np.asarray(labels)]


def merge_mean(heads: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of the per-head projections of each group: [N, ...] -> [K, ...]."""
    M = membership(labels, n_groups)  # [N, K]
    sums = np.tensordot(M.T, heads, axes=1)  # [K, ...]
    return sums / M.sum(0).reshape((-1,) + (1,) * (heads.ndim - 1))


def weight_sharing_error(heads: LayerHeads, labels: np.ndarray, n_groups: int,
                         covariance: Optional[np.ndarray] = None) -> float:
    """Relative weight-sharing error of a partition.

    ``Σ_g Σ_{h∈g} ‖W^K_h − W̄^K_g‖² + ‖W^V_h − W̄^V_g‖²`` divided by
    ``Σ_h ‖W^K_h‖² + ‖W^V_h‖²``, with W̄_g the group mean. With a calibration
    covariance C = XᵀX the norms are ``‖X W‖²`` (the error of the keys and
    values themselves on the calibration tokens).
    """
    err = total = 0.0
    for W in (heads.k, heads.v):
        diff = W - merge_mean(W, labels, n_groups)[labels]  # [N, D, H]
        err += _sq_norm(diff, covariance)
        total += _sq_norm(W, covariance)
    return float(err / max(total, 1e-300))


def _sq_norm(W: np.ndarray, covariance: Optional[np.ndarray]) -> float:
    """Σ_h ‖W_h‖² (or Σ_h ‖X W_h‖² = Σ_h tr(W_hᵀ C W_h)) of [N, D, H] projections."""
    if covariance is None:
        return float(np.sum(W * W))
    return float(np.sum(W * np.matmul(covariance, W)))


# ----------------------------------------------------------------------------- strategies
@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a strategy sees of one layer.

    Attributes:
      cfg: the source configuration.
      layer: layer index.
      heads: the layer's per-query-head projections (float64).
      n_kv_heads: K, the number of groups to form.
      equal_groups: whether every group must hold N / K query heads.
      rng: numpy Generator seeded from (seed, layer).
      covariance: [D, D] float64 XᵀX of the layer's attention input over the
        calibration tokens, or None without calibration.
      key_norm: [N] mean L2 norm of each query head's keys over the calibration
        tokens (RoPE keeps norms, so before and after RoPE alike), or None.
      given_labels: [N] canonical groups from another strategy (``groups_from``)
        or None.
    """

    cfg: ModelConfig
    layer: int
    heads: LayerHeads
    n_kv_heads: int
    equal_groups: bool
    rng: np.random.Generator
    covariance: Optional[np.ndarray] = None
    key_norm: Optional[np.ndarray] = None
    given_labels: Optional[np.ndarray] = None


@dataclasses.dataclass
class LayerConversion:
    """A strategy's result for one layer.

    Attributes:
      labels: [N] canonical group (new KV head) of every query head.
      k: [K, D, H] new key projections; v: [K, D, H] new value projections.
      q: [N, D, H] transformed query projections, or None (unchanged).
      o: [N, H, D] transformed output-projection rows, or None (unchanged).
      objective: the strategy's objective value for this layer.
    """

    labels: np.ndarray
    k: np.ndarray
    v: np.ndarray
    q: Optional[np.ndarray] = None
    o: Optional[np.ndarray] = None
    objective: float = float("nan")


def mean_merge(ctx: LayerContext, labels: np.ndarray, objective: float) -> LayerConversion:
    """The conversion that shares the group mean of the K/V projections."""
    K = ctx.n_kv_heads
    return LayerConversion(labels=labels, k=merge_mean(ctx.heads.k, labels, K),
                           v=merge_mean(ctx.heads.v, labels, K), objective=objective)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One grouping strategy.

    Attributes:
      name: registry name.
      convert: ``(ctx, options) -> LayerConversion``.
      group: ``(ctx, options) -> [N] canonical labels``, the grouping alone
        (what ``groups_from`` of another strategy uses).
      objective_name: what ``LayerConversion.objective`` measures.
      needs_calibration: whether the strategy needs calibration windows.
      unequal_groups: whether groups of unequal size are supported.
      options: accepted options and their defaults.
      check_options: raises ValueError for bad option values (before any work).
      parametrization: ``(source_cfg, cfg, fused) -> object`` for strategies with
        trainable parts, or None.
    """

    name: str
    convert: Callable[[LayerContext, Mapping[str, Any]], LayerConversion]
    group: Callable[[LayerContext, Mapping[str, Any]], np.ndarray]
    objective_name: str
    needs_calibration: bool = False
    unequal_groups: bool = True
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    check_options: Optional[Callable[[Mapping[str, Any]], None]] = None
    parametrization: Optional[Callable[..., Any]] = None


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------- build the result
def build_converted(cfg: ModelConfig, params: dict, conversions: list[LayerConversion],
                    n_kv_heads: int) -> tuple[ModelConfig, dict]:
    """Assemble the converted config and unfused params from per-layer conversions.

    Args:
      cfg: the source configuration.
      params: the source's unfused params; everything but the attention
        projections is shared with the result.
      conversions: one per layer.
      n_kv_heads: K.

    Returns:
      (cfg with K KV heads and an explicit per-layer ``kv_head_map``, params).
    """
    kv_map = tuple(tuple(int(g) for g in c.labels) for c in conversions)
    cfg2 = cfg.replace(n_kv_heads=n_kv_heads, kv_head_map=kv_map)
    dt = cfg.jnp_dtype
    out = dict(params)
    for i, conv in enumerate(conversions):
        layer = dict(params[f"layer_{i}"])
        attn = dict(layer["attn"])
        attn["k_proj"] = {"kernel": heads_to_kernel(conv.k, dt)}
        attn["v_proj"] = {"kernel": heads_to_kernel(conv.v, dt)}
        if conv.q is not None:
            attn["q_proj"] = {"kernel": heads_to_kernel(conv.q, dt)}
        if conv.o is not None:
            N, H, D = conv.o.shape
            attn["o_proj"] = {"kernel": jnp.asarray(conv.o.reshape(N * H, D).astype(np.float32),
                                                    dt)}
        layer["attn"] = attn
        out[f"layer_{i}"] = layer
    return cfg2, out


# ----------------------------------------------------------------------------- calibration
class CalibrationStats(NamedTuple):
    """Per-layer statistics of the source model's attention inputs on calibration windows.

    Attributes:
      covariance: per layer, [D, D] float64 Σ_t x_t x_tᵀ over all calibration tokens.
      key_norm: per layer, [N] float64 mean over tokens of ‖k_{h,t}‖₂ for each query head.
      n_tokens: number of calibration tokens.
    """

    covariance: list
    key_norm: list
    n_tokens: int


def _batches(windows: np.ndarray, batch_size: int):
    """(tokens [b, T], weight [b]) batches; the last is padded with weight-0 rows so that
    every batch has one compiled shape."""
    n = windows.shape[0]
    b = min(batch_size, n)
    for start in range(0, n, b):
        chunk = windows[start:start + b]
        weight = np.ones(b, np.float32)
        if chunk.shape[0] < b:
            weight[chunk.shape[0]:] = 0.0
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - chunk.shape[0], 0)])
        yield jnp.asarray(chunk), jnp.asarray(weight)


def _positions(tokens):
    B, T = tokens.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _attention_inputs(cfg: ModelConfig, params: dict, tokens) -> list:
    """Each layer's attention input (the normed hidden state q_proj reads), [B, T, D];
    either layout."""
    _, state = Transformer(cfg, "reference").apply({"params": params}, tokens,
                                                   _positions(tokens), mutable=["linear_inputs"])
    seen = state["linear_inputs"]
    name = "qkv_proj" if is_fused(params) else "q_proj"
    return [seen[f"layer_{i}"]["attn"][name]["x"][0] for i in range(cfg.n_layers)]


@functools.partial(jax.jit, static_argnums=0)
def _stats_batch(cfg: ModelConfig, params: dict, tokens, weight):
    covs, norms = [], []
    for i, x in enumerate(_attention_inputs(cfg, params, tokens)):
        x = x.astype(jnp.float32) * jnp.sqrt(weight)[:, None, None]  # [B, T, D]
        covs.append(jnp.einsum("BTD,BTE->DE", x, x))
        k = jnp.dot(x, params[f"layer_{i}"]["attn"]["k_proj"]["kernel"].astype(jnp.float32))
        k = k.reshape(*k.shape[:2], cfg.n_kv_heads, cfg.head_dim)  # [B, T, K_src, H]
        # sqrt(weight) scaled x; padding rows are 0 so they add nothing to the norm sum.
        norms.append(jnp.sum(jnp.linalg.norm(k, axis=-1), axis=(0, 1)))  # [K_src]
    return covs, norms


def calibration_stats(cfg: ModelConfig, params: dict, windows: np.ndarray,
                      batch_size: int) -> CalibrationStats:
    """Run the source model over calibration windows and reduce each layer's inputs.

    Only [D, D] and [N] statistics per layer are kept, so memory does not grow
    with the amount of calibration data.

    Args:
      cfg: source configuration; params: its unfused params.
      windows: int32 [n, T] token windows (already validated).
      batch_size: windows per forward pass.
    """
    L = cfg.n_layers
    covs = [np.zeros((cfg.d_model, cfg.d_model)) for _ in range(L)]
    sums = [np.zeros(cfg.n_kv_heads) for _ in range(L)]
    for tokens, weight in _batches(windows, batch_size):
        c, s = _stats_batch(cfg, params, tokens, weight)
        for i in range(L):
            covs[i] += np.asarray(c[i], np.float64)
            sums[i] += np.asarray(s[i], np.float64)
    n_tokens = int(windows.shape[0] * windows.shape[1])
    key_norm = [sums[i][np.asarray(cfg.layer_kv_head_map(i))] / n_tokens for i in range(L)]
    return CalibrationStats(covariance=covs, key_norm=key_norm, n_tokens=n_tokens)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _error_batch(cfg: ModelConfig, cfg_new: ModelConfig, params: dict, params_new: dict,
                 tokens, weight):
    positions = _positions(tokens)
    errs, refs = [], []
    for i, x in enumerate(_attention_inputs(cfg, params, tokens)):
        ref = Attention(cfg, i, "reference").apply(
            {"params": params[f"layer_{i}"]["attn"]}, x, positions)[0].astype(jnp.float32)
        new = Attention(cfg_new, i, "reference").apply(
            {"params": params_new[f"layer_{i}"]["attn"]}, x, positions)[0].astype(jnp.float32)
        w = weight[:, None, None]
        errs.append(jnp.sum(w * (new - ref) ** 2))
        refs.append(jnp.sum(w * ref ** 2))
    return errs, refs


def layer_errors(cfg: ModelConfig, params: dict, cfg_new: ModelConfig, params_new: dict,
                 windows: np.ndarray, batch_size: int) -> list[float]:
    """Relative attention-output error of every converted layer on calibration windows.

    ``‖attn_new(x) − attn(x)‖_F / ‖attn(x)‖_F`` with x the layer's input in the
    *source* model, through the model's own ``Attention`` module (o_proj
    included), so each layer's error is its own, not accumulated from earlier
    layers. Either layout, for both param trees.
    """
    L = cfg.n_layers
    err, ref = np.zeros(L), np.zeros(L)
    for tokens, weight in _batches(windows, batch_size):
        e, r = _error_batch(cfg, cfg_new, params, params_new, tokens, weight)
        err += np.asarray([float(v) for v in e])
        ref += np.asarray([float(v) for v in r])
    return [float(np.sqrt(e / max(r, 1e-300))) for e, r in zip(err, ref)]
