"""GQSA's two-stage sparsity-aware calibration: BQPO, then E2E-OQP.

Both stages start from a pruned and GPTQ-quantized model (``optgqa_jax.quantize(...,
sparsity=...)``: dense ``QuantizedLinear`` kernels whose pruned groups are exact zeros) and
keep the pruning mask ``M`` fixed. Notation per linear layer (kernel layout ``[K, N]``):
codes ``q``, per-group scales ``s`` and integer zero points ``z`` ([G, N], expanded over the
group's rows where they multiply a weight), the group mask ``M`` [G, N], and the fake-quantizer

    Q(W; s) = M * s * (clamp(round_ste(W / s) + z, 0, 2^b - 1) - z),
    round_ste(u) = u + stop_gradient(round(u) - u)      (straight-through rounding).

**BQPO** (block-wise quantization-pruning optimisation). Block ``l`` of the compressed model,
``F_l(X; {W_hat})``, is fitted to the float block's output on the float model's activations:

    min_{delta, theta}  || F_l(X_l^q; {Q(W0 + s0 delta; s0 exp(theta))}) - F_l(X_l^fp; {W^fp}) ||^2
                        / || F_l(X_l^fp; {W^fp}) ||^2

over the calibration windows, where ``X_l^q`` are the inputs produced by the already
calibrated blocks ``< l``, ``W0 = s0 (q0 - z)`` the GPTQ solution (so ``delta = theta = 0``
reproduces it exactly), ``delta`` [K, N] moves the kept weights in units of their grid step and
``theta`` [G, N] rescales each group. Adam (optax) on both, the mask fixed; the result is kept
only if it lowers the block objective on calibration windows held out of the training
(``CalibrationConfig.val_fraction``; else the GPTQ block stays).

**E2E-OQP** (end-to-end optimisation of quantization parameters). Codes frozen; only the
scales are trained, ``s = s0 exp(theta)``, on the model's next-token cross-entropy over the
calibration windows:

    min_theta  - 1/|T| sum_t log p(x_{t+1} | x_{<=t}; {M * s0 exp(theta) * (q - z)})

with Adam; the iterate with the lowest loss on the held-out calibration windows is kept (the
GPTQ scales if none is lower). Zero points stay the stored integers (symmetric grids fix them
at ``2^(b-1)``), and pruned groups keep scale 0. Without held-out windows a few thousand
tokens are memorised: on SmolLM2-135M, 40 steps over 16 windows of 256 tokens took the
calibration loss from 4.05 to 0.93 and the held-out perplexity from 49 to 123.

Each stage is switched by :class:`CalibrationConfig`; :func:`calibrate` runs the enabled ones
and reports both objectives before and after.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from optgqa_jax.config import ModelConfig
from optgqa_jax.quant.linear import QuantizedLinear, is_quantized
from optgqa_jax.quant.pipeline import _get, _set


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Settings of :func:`calibrate`.

    Attributes:
      bqpo, e2e: run the block-wise stage / the end-to-end stage.
      bqpo_steps: Adam steps per block; bqpo_lr: step size for ``delta`` (grid units) and
        ``theta`` (log scale).
      e2e_steps, e2e_lr: the same for the end-to-end stage.
      batch_size: calibration windows per step.
      val_fraction: share of the calibration windows held out of training; each stage's
        result (each block's, for BQPO) is kept only if it lowers the objective on them, and
        E2E-OQP keeps its best iterate on them. 0 judges on the training windows (which
        a few thousand scale parameters can memorise).
      eval_every: E2E-OQP steps between two evaluations on the held-out windows.
    """

    bqpo: bool = True
    bqpo_steps: int = 100
    bqpo_lr: float = 5e-3
    e2e: bool = True
    e2e_steps: int = 100
    e2e_lr: float = 5e-4
    batch_size: int = 4
    val_fraction: float = 0.25
    eval_every: int = 10

    def __post_init__(self):
        for name in ("bqpo_steps", "e2e_steps", "batch_size"):
            v = getattr(self, name)
            low = 1 if name == "batch_size" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}={v!r} must be an int >= {low}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction!r} must lie in [0, 1)")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or \
                self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every!r} must be an int >= 1")
        for name in ("bqpo_lr", "e2e_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")


def _round_ste(u):
    return u + jax.lax.stop_gradient(jnp.round(u) - u)


def _layer_state(ql: QuantizedLinear) -> dict:
    """Fixed per-layer arrays: s0, z, keep [G, N] float32 and W0 [K, N]."""
    from optgqa_jax.quant.linear import dequantize
    keep = (ql.scales != 0).astype(jnp.float32)
    return dict(s0=ql.scales.astype(jnp.float32), z=ql.zeros.astype(jnp.float32), keep=keep,
                W0=dequantize(ql, jnp.float32))


def _fake_quant(delta, theta, st, gs: int, maxq: int):
    """Q(W0 + s0 delta; s0 exp(theta)) [K, N] (module docstring)."""
    rep = lambda a: jnp.repeat(a, gs, axis=0)
    keep = rep(st["keep"])
    s = rep(jnp.where(st["keep"] > 0, st["s0"] * jnp.exp(theta), 1.0))
    z = rep(st["z"])
    W = st["W0"] + rep(st["s0"]) * delta
    q = jnp.clip(_round_ste(W / s) + z, 0, maxq)
    return keep * s * (q - z)


def _quantized_names(block: dict) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(block, is_leaf=is_quantized)[0]
    name = lambda p: "/".join(str(getattr(k, "key", k)) for k in p)
    return [name(p) for p, l in flat if is_quantized(l)]


def _block_forward(cfg: ModelConfig, layer: int, block, x):
    from optgqa_jax.model import Block
    B, T, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out, _ = Block(cfg, layer, "reference").apply({"params": block}, x, positions)
    return out


def _rel_mse(y, target):
    y, target = y.astype(jnp.float32), target.astype(jnp.float32)
    return jnp.sum(jnp.square(y - target)) / jnp.maximum(jnp.sum(jnp.square(target)), 1e-30)


def _block_with(block, names, weights, dtype):
    for n in names:
        block = _set(block, n, weights[n].astype(dtype))
    return block


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _bqpo_step(cfg, layer, names, gs_maxq, opt, vars_, opt_state, states, block, x, y):
    def loss(v):
        w = {n: _fake_quant(*v[n], states[n], *gs_maxq[n]) for n in names}
        return _rel_mse(_block_forward(cfg, layer, _block_with(block, names, w, cfg.jnp_dtype),
                                       x), y)
    value, grad = jax.value_and_grad(loss)(vars_)
    updates, opt_state = opt.update(grad, opt_state, vars_)
    return optax.apply_updates(vars_, updates), opt_state, value


def _to_quantized(ql: QuantizedLinear, delta, theta, st) -> QuantizedLinear:
    """Hard-quantized layer of the trained (delta, theta): codes from the stored (rounded)
    scales, pruned groups canonical (codes, zero and scale 0)."""
    from optgqa_jax.quant.linear import from_codes
    from optgqa_jax.quant.config import QuantConfig
    from optgqa_jax.quant.grid import round_scale
    gs, maxq = ql.group_size, (1 << ql.bits) - 1
    qc = QuantConfig(bits=ql.bits, group_size=gs, sym=ql.sym,
                     scale_dtype=jnp.dtype(ql.scales.dtype).name)
    keep = st["keep"] > 0
    s = jnp.where(keep, round_scale(st["s0"] * jnp.exp(theta), qc), 0.0)       # [G, N]
    rep = lambda a: jnp.repeat(a, gs, axis=0)
    W = st["W0"] + rep(st["s0"]) * delta
    codes = jnp.clip(jnp.round(W / rep(jnp.where(keep, s, 1.0))) + rep(st["z"]), 0, maxq)
    codes = jnp.where(rep(keep), codes, 0)
    zeros = jnp.where(keep, st["z"], 0)
    return from_codes(codes, s, zeros, ql.g_idx, qc, ql.dtype)


def _split(windows, batch_size: int):
    return [jnp.asarray(windows[b:b + batch_size]) for b in range(0, len(windows), batch_size)]


def bqpo(cfg: ModelConfig, float_params: dict, qparams: dict, calibration,
         cc: CalibrationConfig, *, val_windows=None,
         progress: bool = True) -> tuple[dict, list[dict]]:
    """Stage 1 (module docstring): every block's kept weights and scales fitted to the float
    block's outputs on `calibration`; a block's result is kept if it lowers the block objective
    on `val_windows` (default: on `calibration`). Returns (params, one report dict per block:
    ``loss_before``/``loss_after`` on the judging windows, ``kept``)."""
    from optgqa_jax.quant.pipeline import _canonical_layer, _embed
    emb = float_params["embed"]["embedding"]
    train = [_embed(cfg, emb, t) for t in _split(np.asarray(calibration), cc.batch_size)]
    held = (train if val_windows is None or len(val_windows) == 0 else
            [_embed(cfg, emb, t) for t in _split(np.asarray(val_windows), cc.batch_size)])
    n_train = len(train)
    # one list: training batches, then (when separate) the judging batches
    xq = train + ([] if held is train else held)
    judge = slice(0, n_train) if held is train else slice(n_train, len(xq))
    xf = list(xq)
    out, report = dict(qparams), []
    opt = optax.adam(cc.bqpo_lr)
    for li in tqdm(range(cfg.n_layers), desc="BQPO", unit="block", disable=not progress):
        fb, qb = float_params[f"layer_{li}"], qparams[f"layer_{li}"]
        i = _canonical_layer(cfg, li)     # blocks that compute alike share one compile
        names = tuple(_quantized_names(qb))
        yf = [_block_forward_jit(cfg, i, fb, x) for x in xf]
        if not names:
            xq = [_block_forward_jit(cfg, i, qb, x) for x in xq]
            xf = yf
            continue
        qls = {n: _get(qb, n) for n in names}
        states = {n: _layer_state(qls[n]) for n in names}
        gs_maxq = tuple((n, (qls[n].group_size, (1 << qls[n].bits) - 1)) for n in names)
        gm_key = _Hashable(dict(gs_maxq))
        vars_ = {n: (jnp.zeros(qls[n].shape, jnp.float32), jnp.zeros(qls[n].scales.shape,
                                                                      jnp.float32)) for n in names}
        energy = max(sum(float(jnp.sum(jnp.square(y.astype(jnp.float32))))
                         for y in yf[judge]), 1e-30)
        before = _hard_loss(cfg, i, qb, xq[judge], yf[judge]) / energy
        opt_state = opt.init(vars_)
        for step in range(cc.bqpo_steps):
            b = step % n_train
            vars_, opt_state, _ = _bqpo_step(cfg, i, names, gm_key, opt, vars_, opt_state,
                                              states, qb, xq[b], yf[b])
        new_qb = qb
        for n in names:
            new_qb = _set(new_qb, n, _to_quantized(qls[n], *vars_[n], states[n]))
        after = _hard_loss(cfg, i, new_qb, xq[judge], yf[judge]) / energy
        kept = after < before
        report.append(dict(block=li, loss_before=before, loss_after=after, kept=bool(kept)))
        if kept:
            qb = new_qb
        out[f"layer_{li}"] = qb
        xq = [_block_forward_jit(cfg, i, qb, x) for x in xq]
        xf = yf
    return out, report


class _Hashable:
    """A dict made hashable by the value of its sorted items (a static jit argument)."""

    def __init__(self, d: dict):
        self.d = d
        self.key = tuple(sorted(d.items()))

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self.key == other.key

    def __getitem__(self, k):
        return self.d[k]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block_forward_jit(cfg, layer, block, x):
    return _block_forward(cfg, layer, block, x)


def _hard_loss(cfg, layer, block, xs, ys) -> float:
    return sum(float(jnp.sum(jnp.square(_block_forward_jit(cfg, layer, block, x).astype(
        jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(xs, ys))


def _with_scales(params, thetas, states):
    def swap(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name not in thetas:
            return leaf
        st = states[name]
        s = jnp.where(st["keep"] > 0, st["s0"] * jnp.exp(thetas[name]), 0.0)
        return leaf.replace(scales=s.astype(leaf.scales.dtype))
    return jax.tree_util.tree_map_with_path(swap, params, is_leaf=is_quantized)


@functools.partial(jax.jit, static_argnums=0)
def _nll(cfg, params, tokens):
    from optgqa_jax.model import forward
    logits = forward(cfg, params, tokens, attention_impl="reference")
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _e2e_step(cfg, opt, thetas, opt_state, params, states, tokens):
    loss = lambda th: _nll(cfg, _with_scales(params, th, states), tokens)
    value, grad = jax.value_and_grad(loss)(thetas)
    updates, opt_state = opt.update(grad, opt_state, thetas)
    return optax.apply_updates(thetas, updates), opt_state, value


def e2e_oqp(cfg: ModelConfig, qparams: dict, calibration, cc: CalibrationConfig, *,
            val_windows=None, progress: bool = True) -> tuple[dict, dict]:
    """Stage 2 (module docstring): scales trained end to end on next-token loss over
    `calibration`, codes frozen; every ``cc.eval_every`` steps the mean loss on `val_windows`
    (default: on `calibration`) is measured and the best iterate kept, the GPTQ scales
    included. Returns (params, {loss_before, loss_after (on the judging windows), best_step,
    kept})."""
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_quantized)[0]
    name = lambda p: "/".join(str(getattr(k, "key", k)) for k in p)
    layers = {name(p): l for p, l in flat if is_quantized(l)}
    if not layers:
        raise ValueError("e2e_oqp: the params hold no quantized layers")
    states = {n: dict(s0=l.scales.astype(jnp.float32),
                      keep=(l.scales != 0).astype(jnp.float32)) for n, l in layers.items()}
    thetas = {n: jnp.zeros(l.scales.shape, jnp.float32) for n, l in layers.items()}
    batches = _split(np.asarray(calibration), cc.batch_size)
    held = (batches if val_windows is None or len(val_windows) == 0
            else _split(np.asarray(val_windows), cc.batch_size))
    mean_nll = lambda p: float(np.mean([float(_nll(cfg, p, t)) for t in held]))
    before = mean_nll(qparams)
    best, best_thetas, best_step = before, None, 0
    opt = optax.adam(cc.e2e_lr)
    opt_state = opt.init(thetas)
    for step in tqdm(range(1, cc.e2e_steps + 1), desc="E2E-OQP", unit="step",
                     disable=not progress):
        thetas, opt_state, _ = _e2e_step(cfg, opt, thetas, opt_state, qparams, states,
                                         batches[(step - 1) % len(batches)])
        if step % cc.eval_every == 0 or step == cc.e2e_steps:
            value = mean_nll(_with_scales(qparams, thetas, states))
            if value < best:
                best, best_thetas, best_step = value, thetas, step
    kept = best_thetas is not None
    out = _with_scales(qparams, best_thetas, states) if kept else qparams
    return out, dict(loss_before=before, loss_after=best, best_step=best_step, kept=kept)


def calibrate(cfg: ModelConfig, float_params: dict, qparams: dict, calibration,
              cc: CalibrationConfig = CalibrationConfig(), *,
              progress: bool = True) -> tuple[dict, dict]:
    """Run the enabled stages on pruned + quantized params (dense ``QuantizedLinear``
    kernels, as ``optgqa_jax.quantize(..., sparsity=...)`` returns them).

    Args:
      cfg: the model's configuration.
      float_params: the float model (BQPO's targets).
      qparams: the pruned, quantized params to refine (unfused layout).
      calibration: int [n, T] token windows.
      cc: which stages, steps and step sizes.
      progress: tqdm bars.

    The last ``round(cc.val_fraction * n)`` windows are held out of the training and judge
    each stage's result.

    Returns:
      (params, report ``{"train_windows", "val_windows", "bqpo": [per block], "e2e": {...},
      "seconds"}``).

    Raises:
      ValueError: malformed calibration data, params that do not match `cfg`, or no
        quantized layer — before any work.
    """
    from optgqa_jax.fused import is_fused
    from optgqa_jax.model import check_params_match
    from optgqa_jax.quant.pipeline import check_calibration
    windows = check_calibration(cfg, calibration)
    check_params_match(cfg, float_params, what="float_params")
    check_params_match(cfg, qparams, what="qparams")
    if is_fused(qparams) or is_fused(float_params):
        raise ValueError("calibrate expects the unfused layout (fuse after calibrating)")
    if not any(is_quantized(l) for l in jax.tree_util.tree_leaves(qparams,
                                                                   is_leaf=is_quantized)):
        raise ValueError("qparams hold no QuantizedLinear kernels (quantize first; convert to "
                         "BSR after calibrating)")
    t0 = time.perf_counter()
    n_val = int(round(cc.val_fraction * windows.shape[0])) if windows.shape[0] > 1 else 0
    n_val = min(n_val, windows.shape[0] - 1)
    train, val = windows[: windows.shape[0] - n_val], windows[windows.shape[0] - n_val:]
    report: dict = {"train_windows": int(train.shape[0]), "val_windows": int(val.shape[0])}
    params = qparams
    if cc.bqpo and cc.bqpo_steps:
        params, report["bqpo"] = bqpo(cfg, float_params, params, train, cc, val_windows=val,
                                      progress=progress)
    if cc.e2e and cc.e2e_steps:
        params, report["e2e"] = e2e_oqp(cfg, params, train, cc, val_windows=val,
                                        progress=progress)
    report["seconds"] = time.perf_counter() - t0
    return params, report
