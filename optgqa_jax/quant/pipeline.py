"""Whole-model quantization: block by block, true-sequential, with a progress bar.

:func:`quantize` walks the decoder blocks in order. Every block sees the calibration
activations produced by the blocks already quantized before it, and inside a block the
linear layers are quantized in true-sequential order (GPTQ's ``--true-sequential``):

    [q, k, v] (or the fused qkv)  ->  [o]  ->  [gate, up] (or the fused gate_up)  ->  [down]

each stage calibrated on inputs produced by the stages already quantized. Memory holds
one block's calibration activations (``[n, T, D]`` plus one batch of its sub-layer
inputs) and one Hessian per layer of the current stage. The token embedding and the LM
head stay float unless ``QuantConfig.quantize_embedding`` (the table is rounded first, by
RTN, so the blocks calibrate on its quantized outputs) or ``QuantConfig.quantize_lm_head``
(quantized last, calibrated on the final norm's outputs).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from optgqa_jax.config import ModelConfig
from optgqa_jax.quant.calibration import learn_scales, token_gradient_weights
from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.gptq import HessianAccumulator, gptq
from optgqa_jax.quant.grid import rtn
from optgqa_jax.quant.linear import dequantize, is_quantized, lookup_columns

METHODS = ("gptq", "rtn")
_HI = jax.lax.Precision.HIGHEST


def _stages(fused: bool) -> list[list[str]]:
    if fused:
        return [["attn/qkv_proj"], ["attn/o_proj"], ["mlp/gate_up_proj"], ["mlp/down_proj"]]
    return [["attn/q_proj", "attn/k_proj", "attn/v_proj"], ["attn/o_proj"],
            ["mlp/gate_proj", "mlp/up_proj"], ["mlp/down_proj"]]


@dataclasses.dataclass
class QuantReport:
    """What :func:`quantize` did, layer by layer.

    Attributes:
      qc: the settings.
      method: ``"gptq"`` or ``"rtn"``.
      layers: one dict per quantized layer: ``name``, ``shape``, ``error`` (relative
        layer-output error ``tr(D^T H D) / tr(W^T H W)`` on the calibration inputs, with
        the plain Hessian), ``damp``, ``tries``, ``seconds`` and, with learned scales,
        ``error_before_learn``. A quantized token table (``embed/embedding``, first, with
        ``method: "rtn"``) reports ``||D||^2 / ||W||^2``, the identity Hessian's error.
      seconds: total wall time.
      calibration_shape: (windows, tokens per window).
    """

    qc: QuantConfig
    method: str
    layers: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    calibration_shape: tuple = ()

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict."""
        return {"qc": self.qc.to_dict(), "method": self.method, "layers": self.layers,
                "seconds": self.seconds, "calibration_shape": list(self.calibration_shape)}

    def mean_error(self) -> float:
        """The mean of the layers' errors (NaN with no layers)."""
        return float(np.mean([l["error"] for l in self.layers])) if self.layers else float("nan")


def _get(tree: dict, name: str):
    for part in name.split("/"):
        tree = tree[part]
    return tree


def _set(tree: dict, name: str, value) -> dict:
    """Copy of `tree` with the leaf at `name` replaced (inner dicts copied, leaves shared)."""
    head, *rest = name.split("/")
    out = dict(tree)
    out[head] = _set(tree[head], "/".join(rest), value) if rest else value
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _block_apply(cfg: ModelConfig, layer: int, block_params, x, impl: str):
    """One block on x [B, T, D]: (output [B, T, D], {linear name: its input [B, T, D_in]})."""
    from optgqa_jax.model import Block

    B, T, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    (out, _), state = Block(cfg, layer, impl).apply({"params": block_params}, x, positions,
                                                   mutable=["linear_inputs"])
    inputs = {}
    for group, mods in state["linear_inputs"].items():
        for mod, value in mods.items():
            inputs[f"{group}/{mod}"] = value["x"][0]
    return out, inputs


@functools.partial(jax.jit, static_argnums=0)
def _embed(cfg: ModelConfig, embedding, tokens):
    """Token rows [B, T, D] of a float table [V, D] or a quantized one (stored [D, V])."""
    if is_quantized(embedding):
        return lookup_columns(embedding, tokens, cfg.jnp_dtype)
    return embedding[tokens].astype(cfg.jnp_dtype)


@jax.jit
def _rel_error_identity(w_hat, w):
    """``||W_hat - W||^2 / ||W||^2``: :func:`_rel_error` with the identity Hessian."""
    w, w_hat = w.astype(jnp.float32), w_hat.astype(jnp.float32)
    return jnp.sum((w_hat - w) ** 2) / jnp.maximum(jnp.sum(w * w), 1e-30)


@functools.partial(jax.jit, static_argnums=0)
def _final_norm(cfg: ModelConfig, scale, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return scale * normed.astype(cfg.jnp_dtype)


@jax.jit
def _rel_error(w_hat, w, H):
    w, w_hat = w.astype(jnp.float32), w_hat.astype(jnp.float32)
    D = w_hat - w
    num = jnp.sum(D * jnp.dot(H, D, precision=_HI))
    return num / jnp.maximum(jnp.sum(w * jnp.dot(H, w, precision=_HI)), 1e-30)


def _canonical_layer(cfg: ModelConfig, layer: int) -> int:
    """First layer with the same KV-head map: blocks that compute alike share one compile."""
    target = cfg.layer_kv_head_map(layer)
    return next(j for j in range(cfg.n_layers) if cfg.layer_kv_head_map(j) == target)


def check_calibration(cfg: ModelConfig, calibration, nsamples: Optional[int] = None,
                      seqlen: Optional[int] = None) -> np.ndarray:
    """Validate calibration windows; returns int32 [n, T]. Raises ValueError naming the problem."""
    from optgqa_jax.evaluate import check_windows  # evaluate imports the model, which imports us

    windows = check_windows(cfg, calibration, "calibration")
    if nsamples is not None and windows.shape[0] < nsamples:
        raise ValueError(f"calibration has {windows.shape[0]} windows, {nsamples} were asked for")
    if seqlen is not None and windows.shape[1] < seqlen:
        raise ValueError(f"calibration windows have {windows.shape[1]} tokens, {seqlen} were asked for")
    return windows.astype(np.int32)


def _fitting_group_sizes(cfg: ModelConfig, qc: QuantConfig) -> list[int]:
    """Powers of two >= 32 that divide every linear layer's input dimension."""
    dims = (cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ffn_dim)
    return [g for g in (32, 64, 128, 256, 512) if all(d % g == 0 for d in dims)]


def _check_model(cfg: ModelConfig, params: dict, qc: QuantConfig) -> list[str]:
    from optgqa_jax.fused import is_fused
    from optgqa_jax.model import check_params_match

    check_params_match(cfg, params)
    names = []
    for i in range(cfg.n_layers):
        for stage in _stages(is_fused(params)):
            for name in stage:
                full = f"layer_{i}/{name}"
                kernel = _get(params, full + "/kernel")
                if is_quantized(kernel):
                    raise ValueError(f"{full} is already quantized")
                try:
                    qc.check_layer(kernel.shape[0], full)
                except ValueError as e:
                    raise ValueError(f"{e}; group sizes that fit every layer of this model: "
                                     f"{_fitting_group_sizes(cfg, qc)} or -1") from None
                names.append(full)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not bool(jnp.isfinite(leaf).all()):
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} contains NaN or inf")
    if qc.quantize_lm_head:
        if cfg.tie_embeddings:
            raise ValueError("quantize_lm_head needs an untied LM head; this model ties it to "
                             "the embeddings (quantize_embedding quantizes the shared table)")
        qc.check_layer(cfg.d_model, "lm_head")
    if is_quantized(params["embed"]["embedding"]):
        raise ValueError("embed/embedding is already quantized")
    if qc.quantize_embedding:
        qc.check_layer(cfg.d_model, "embed/embedding")
    return names


def quantize(cfg: ModelConfig, params: dict, calibration, qc: QuantConfig, *,
             method: str = "gptq", batch_size: int = 8, attention_impl: str = "reference",
             progress: bool = True, sparsity=None) -> tuple[ModelConfig, dict, QuantReport]:
    """Quantize every linear layer of a model (see the module docstring).

    Args:
      cfg: the model's configuration.
      params: float parameters, unfused or fused (``optgqa_jax.fused``) layout.
      calibration: int [n, T] token windows (``optgqa_jax.data``).
      qc: the quantization settings (GPTQ options and the calibration parts).
      method: ``"gptq"`` or ``"rtn"`` (round-to-nearest: no calibration needed, but the
        same report of layer-output errors on the calibration data).
      batch_size: windows per forward pass of a block.
      attention_impl: attention used on the calibration windows.
      progress: show a tqdm bar over blocks.
      sparsity: optional ``optgqa_jax.sparse.SparsityConfig``: prune whole quantization
        groups of every layer (GQSA) before quantizing it; GPTQ then runs on the pruned
        layer (``optgqa_jax.sparse.gptq_pruned``), RTN prunes its rounded layer. Pruned
        groups are stored as exact zeros (``optgqa_jax.sparse.to_bsr_params`` drops them).
        Or ``optgqa_jax.sparse.NMSparsity`` (2:4 by magnitude of the float weights): GPTQ
        with that fixed mask, pruned weights stored as their zero point (exact zeros).

    Returns:
      (cfg, quantized params — each linear ``kernel`` replaced by a ``QuantizedLinear`` —, report).

    Raises:
      ValueError: before any work, for empty or malformed calibration data, params that do
        not match `cfg` or contain NaN/inf, layers whose input dimension the group size
        does not divide; during the work, naming the layer, for a Hessian that stays not
        positive definite.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {METHODS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    windows = check_calibration(cfg, calibration)
    _check_model(cfg, params, qc)
    if sparsity is not None:
        from optgqa_jax.sparse.config import NMSparsity, SparsityConfig
        if not isinstance(sparsity, (SparsityConfig, NMSparsity)):
            raise ValueError(f"sparsity must be an optgqa_jax.sparse.SparsityConfig or "
                             f"NMSparsity, got {type(sparsity).__name__}")
        if isinstance(sparsity, NMSparsity):
            if qc.act_order:
                raise ValueError("N:M sparsity with GPTQ needs act_order=False")
        elif qc.group_size == -1 or qc.act_order:
            raise ValueError("sparsity prunes whole quantization groups: it needs a group size "
                             "(not -1) and act_order=False")
        if qc.learn_scales:
            raise ValueError("learn_scales does not apply to pruned layers; use the GQSA "
                             "calibration stages (optgqa_jax.sparse.calibrate) instead")
    t0 = time.perf_counter()
    from optgqa_jax.fused import is_fused  # the model imports this package

    report = QuantReport(qc, method, calibration_shape=tuple(windows.shape))
    fused = is_fused(params)
    token_w = None
    if qc.grad_hessian and method == "gptq":
        token_w = token_gradient_weights(cfg, params, windows, batch_size=batch_size,
                                         attention_impl=attention_impl)
    batches = [slice(b, b + batch_size) for b in range(0, windows.shape[0], batch_size)]
    qparams = dict(params)
    table = params["embed"]["embedding"]                          # [V, D]
    if qc.quantize_embedding:
        t1 = time.perf_counter()
        w = table.T                                                # [D, V], the LM head's layout
        table = rtn(w, dataclasses.replace(qc, act_order=False, static_groups=False))
        report.layers.append({"name": "embed/embedding", "shape": list(w.shape), "method": "rtn",
                              "error": float(_rel_error_identity(dequantize(table, jnp.float32),
                                                                 w)),
                              "seconds": time.perf_counter() - t1})
        qparams["embed"] = {**params["embed"], "embedding": table}
    x = [_embed(cfg, table, jnp.asarray(windows[b])) for b in batches]
    bar = tqdm(range(cfg.n_layers), desc=f"{method} {qc.tag}", disable=not progress,
               unit="block")
    for i in bar:
        layer = _canonical_layer(cfg, i)
        bp = params[f"layer_{i}"]
        for stage in _stages(fused):
            # the layers of a stage read the same input: one plain Hessian per stage
            acc = HessianAccumulator(_get(bp, stage[0])["kernel"].shape[0],
                                     name=f"the inputs of layer_{i}/{stage[0]}")
            weighted = {name: HessianAccumulator(acc.d_in, name=acc.name) for name in stage} \
                if token_w is not None else {}
            for b, xb in zip(batches, x):
                inp = _block_apply(cfg, layer, bp, xb, attention_impl)[1][stage[0]]
                acc.add(inp)
                for name in weighted:
                    weighted[name].add(inp, token_w[f"layer_{i}/{name}"][b])
            for name in stage:
                full = f"layer_{i}/{name}"
                w = _get(bp, name)["kernel"]
                H = acc.H
                Hq = weighted[name].H if weighted else H
                entry = {"name": full, "shape": list(w.shape)}
                t1 = time.perf_counter()
                if sparsity is not None and not hasattr(sparsity, "sparsity"):   # N:M
                    from optgqa_jax import sparse
                    keep = sparse.nm_mask(w, sparsity)
                    if method == "rtn":
                        ql = rtn(jnp.where(keep, w, 0), qc)   # a zero rounds to its zero point
                    else:
                        ql, info = gptq(w, Hq, qc, keep=keep, name=full, return_info=True)
                        entry.update(damp=info["damp"], tries=info["tries"])
                    entry["sparsity"] = 1.0 - float(np.asarray(keep).mean())
                elif sparsity is not None:
                    from optgqa_jax import sparse
                    if method == "rtn":
                        keep = sparse.group_mask(sparse.group_scores(
                            w, H, group_size=qc.group_size, score=sparsity.score,
                            damp=sparsity.damp), sparsity)
                        ql = sparse.canonical_pruned(rtn(w, qc), keep)
                    else:
                        ql, keep, info = sparse.gptq_pruned(w, Hq, qc, sparsity, name=full,
                                                            return_info=True)
                        entry.update(damp=info["damp"], tries=info["tries"])
                    entry["sparsity"] = 1.0 - float(np.asarray(keep).mean())
                elif method == "rtn":
                    ql = rtn(w, qc)
                else:
                    ql, info = gptq(w, Hq, qc, name=full, return_info=True)
                    entry.update(damp=info["damp"], tries=info["tries"])
                    if qc.learn_scales:
                        ql, entry["learn"] = learn_scales(ql, w, Hq, qc)
                entry["error"] = float(_rel_error(dequantize(ql, jnp.float32), w, H))
                entry["seconds"] = time.perf_counter() - t1
                report.layers.append(entry)
                bp = _set(bp, name + "/kernel", ql)
        x = [_block_apply(cfg, layer, bp, xb, attention_impl)[0] for xb in x]
        qparams[f"layer_{i}"] = bp
        per_block = sum(len(stage) for stage in _stages(fused))
        bar.set_postfix(err=f"{np.mean([l['error'] for l in report.layers[-per_block:]]):.2e}")
    if qc.quantize_lm_head:
        acc = HessianAccumulator(cfg.d_model, name="the inputs of lm_head")
        for xb in x:
            acc.add(_final_norm(cfg, params["final_norm"]["scale"], xb))
        w = params["lm_head"]
        t1 = time.perf_counter()
        ql = rtn(w, qc) if method == "rtn" else gptq(w, acc.H, qc, name="lm_head")
        report.layers.append({"name": "lm_head", "shape": list(w.shape),
                              "error": float(_rel_error(dequantize(ql, jnp.float32), w, acc.H)),
                              "seconds": time.perf_counter() - t1})
        qparams["lm_head"] = ql
    report.seconds = time.perf_counter() - t0
    return cfg, qparams, report
