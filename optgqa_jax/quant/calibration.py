"""jax.grad-based calibration: a gradient-weighted Hessian and learned scales.

Both parts are switched on by :class:`~optgqa_jax.quant.config.QuantConfig`
(``grad_hessian``, ``learn_scales``) so that an ablation can isolate each.

**Gradient-weighted Hessian** (in the spirit of GuidedQuant, Kim et al., 2025).
GPTQ minimises the layer-output error ``||X (W_hat - W)^T||_F^2 = sum_t ||(W_hat - W) x_t||^2``,
treating every token ``t`` and every output channel alike. The end loss ``L`` of the model
does not: to second order (Fisher approximation), a change ``delta y_t`` of the layer's
output ``y_t`` at token ``t`` costs ``sum_j g_tj^2 delta y_tj^2`` with ``g_t = dL/dy_t``.
GuidedQuant keeps one Hessian per group of output channels,
``H_J = sum_t (sum_{j in J} g_tj^2) x_t x_t^T``. We use a single group per layer (every
output channel shares one weighted Hessian):

    H_g = 2/n sum_t w_t x_t x_t^T,    w_t = ||g_t||^2 / mean_s ||g_s||^2

which keeps GPTQ's single Cholesky factor per layer and a single ``g_idx`` (so act-order
layers that read the same input can still be fused). ``g_t`` comes from one ``jax.grad``
of the mean next-token cross-entropy of the *unquantized* model on the calibration windows,
taken with respect to a zero "perturbation" added to every linear layer's output
(``flax.linen.Module.perturb``): one backward pass gives every layer's output gradients.
The last token of a window has no target, so its weight is 0.

**Learned scales** (in the spirit of OmniQuant, Shao et al., 2024, and AutoRound, Cheng et
al., 2024). After GPTQ has fixed codes ``q0``, scales ``s0`` and zeros ``z``, we learn a
per-group, per-channel log-factor ``theta`` (``s = s0 * exp(theta)``) that minimises the
relative layer-output reconstruction error on the calibration inputs,

    E(s) = tr(D^T H D) / tr(W^T H W),   D = W_hat(s) - W,
    W_hat(s) = s * (clamp(round_ste(W0 / s) + z, 0, maxq) - z),   W0 = s0 * (q0 - z),

with Adam (optax) and straight-through rounding (``round_ste(u) = u + stop_grad(round(u) - u)``).
Anchoring the codes at the GPTQ solution ``W0`` keeps GPTQ's error feedback: at ``theta = 0``
the codes are exactly ``q0``. ``H`` is the layer's (possibly gradient-weighted) Hessian, so
``E`` needs no stored activations. The zero points stay integers (the GPTQ format stores
integer zeros), and the best iterate by the exact ``E`` is kept, so the result is never
worse than GPTQ's on the calibration data.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optgqa_jax.config import ModelConfig
from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.grid import round_scale
from optgqa_jax.quant.linear import QuantizedLinear, dequantize

_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- gradient weights
@functools.partial(jax.jit, static_argnums=(0, 3))
def _grad_sq_norms(cfg: ModelConfig, params, tokens, impl: str):
    from optgqa_jax.model import Transformer  # the model imports the quant package

    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    model = Transformer(cfg, impl)
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, tokens, positions, mutable=["perturbations"])[1])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

    def loss(perturbations):
        logits, _ = model.apply({"params": params, "perturbations": perturbations}, tokens,
                                positions)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return ce.sum()

    grads = jax.grad(loss)(zeros)
    return jax.tree_util.tree_map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), -1), grads)


def token_gradient_weights(cfg: ModelConfig, params: dict, windows, *, batch_size: int = 8,
                           attention_impl: str = "reference") -> dict[str, np.ndarray]:
    """Per-token weights ``w_t = ||dL/dy_t||^2`` (normalised to mean 1) of every linear layer.

    Args:
      cfg, params: the unquantized model.
      windows: int [n, T] calibration token windows.
      batch_size: windows per backward pass.
      attention_impl: attention used in the backward pass (the jnp reference has a gradient
        everywhere).

    Returns:
      ``{"layer_0/attn/q_proj": float32 [n, T], ...}`` for every linear layer of the params'
      layout (fused names for fused params).
    """
    windows = np.asarray(windows, np.int32)
    parts: dict[str, list] = {}
    for b0 in range(0, windows.shape[0], batch_size):
        sq = _grad_sq_norms(cfg, params, jnp.asarray(windows[b0:b0 + batch_size]),
                            attention_impl)
        for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(sq)).items():
            # path: (layer_i, attn|mlp, <proj>, "out") -> "layer_i/attn/<proj>"
            name = "/".join(path[:-1])
            parts.setdefault(name, []).append(np.asarray(value[0] if isinstance(value, tuple)
                                                         else value))
    out = {}
    for name, chunks in parts.items():
        w = np.concatenate(chunks, axis=0).astype(np.float64)
        mean = w.mean()
        if not np.isfinite(mean) or mean <= 0:
            raise ValueError(f"{name}: the loss gradient is zero or not finite on the "
                             "calibration data; cannot weight its Hessian")
        out[name] = (w / mean).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- learned scales
def _round_ste(u):
    return u + jax.lax.stop_gradient(jnp.round(u) - u)


def _weights(theta, s0, W0, z, g_idx, maxq):
    """W_hat(s) [D_in, D_out] for s = s0 * exp(theta); s0, theta, z [G, D_out]."""
    s = (s0 * jnp.exp(theta))[g_idx]
    zz = z[g_idx]
    q = jnp.clip(_round_ste(W0 / s + zz), 0, maxq)
    return s * (q - zz)


def _rel_error(W_hat, W, H, denom):
    D = W_hat - W
    return jnp.sum(D * jnp.dot(H, D, precision=_HI)) / denom


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _learn(s0, z, W0, W, H, maxq: int, steps: int, lr: float, g_idx):
    denom = jnp.maximum(jnp.sum(W * jnp.dot(H, W, precision=_HI)), 1e-30)
    opt = optax.adam(lr)
    loss = lambda th: _rel_error(_weights(th, s0, W0, z, g_idx, maxq), W, H, denom)

    def step(carry, _):
        theta, state, best, best_theta = carry
        value, grad = jax.value_and_grad(loss)(theta)
        better = value < best
        best_theta = jnp.where(better, theta, best_theta)
        best = jnp.where(better, value, best)
        updates, state = opt.update(grad, state, theta)
        return (optax.apply_updates(theta, updates), state, best, best_theta), value

    theta0 = jnp.zeros_like(s0)
    init = (theta0, opt.init(theta0), jnp.float32(jnp.inf), theta0)
    (theta, _, best, best_theta), trace = jax.lax.scan(step, init, None, length=steps)
    last = loss(theta)
    best_theta = jnp.where(last < best, theta, best_theta)
    return best_theta, jnp.minimum(best, last), trace[0]


def learn_scales(ql: QuantizedLinear, w, H, qc: QuantConfig) -> tuple[QuantizedLinear, dict]:
    """Refine the scales of a GPTQ-quantized layer (see the module docstring).

    Args:
      ql: the layer as GPTQ quantized it.
      w: float [D_in, D_out], the unquantized weights.
      H: float32 [D_in, D_in], the Hessian GPTQ used.
      qc: ``learn_steps``, ``learn_lr`` and ``scale_dtype`` are used.

    Returns:
      (the layer with new scales and re-derived codes, ``{"error_before", "error_after"}``:
      relative layer-output errors on the calibration data).
    """
    from optgqa_jax.quant.linear import from_codes

    W = jnp.asarray(w, jnp.float32)
    s0 = ql.scales.astype(jnp.float32)
    z = ql.zeros.astype(jnp.float32)
    W0 = dequantize(ql, jnp.float32)
    theta, err_after, err_before = _learn(s0, z, W0, W, jnp.asarray(H, jnp.float32), qc.maxq,
                                          qc.learn_steps, qc.learn_lr, ql.g_idx)
    s = round_scale(s0 * jnp.exp(theta), qc)
    zz, ss = z[ql.g_idx], s[ql.g_idx]
    codes = jnp.clip(jnp.round(W0 / ss + zz), 0, qc.maxq)
    new = from_codes(codes, s, ql.zeros, ql.g_idx, qc, ql.dtype)
    denom = float(jnp.maximum(jnp.sum(W * jnp.dot(H, W, precision=_HI)), 1e-30))
    exact_after = float(_rel_error(dequantize(new, jnp.float32), W, H, denom))
    if exact_after > float(err_before):  # scale rounding lost the gain: keep GPTQ's layer
        return ql, {"error_before": float(err_before), "error_after": float(err_before)}
    return new, {"error_before": float(err_before), "error_after": exact_after}
