"""Training and fine-tuning: next-token loss, AdamW, mixed precision, exact resume.

A run in brief::

    tc = TrainConfig(steps=2000, batch_size=32, grad_accum=4, peak_lr=3e-4)
    result = train(cfg, params, train_windows, tc, eval_windows=val_windows, out_dir="runs/a")
    result.params                                  # trained, float32

``train_windows`` are int token windows [n, T] (``optgqa_jax.data.corpus_windows``). Each
optimizer step takes ``batch_size`` windows, split into ``grad_accum`` micro-batches whose
gradients are averaged (a ``lax.scan``, so only one micro-batch of activations is alive).

Mixed precision. The optimizer keeps float32 master weights and float32 Adam moments. Every
step casts the weights to ``compute_dtype`` (bfloat16 by default) and runs the model with
``cfg.replace(dtype=compute_dtype)``; the gradient flows back through the cast and arrives in
float32. Norms, softmax and logits are float32 inside the model whatever the compute dtype.
No loss scaling, which is why float16 is not offered.

Schedule. Linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine decay to
``peak_lr * min_lr_ratio`` at the last step; step s (0-based) runs at the schedule's value at
s + 1, so the first step already moves the weights and the last runs at the floor. Gradients
are clipped to a global norm, then AdamW (decoupled weight decay, on matrices only).

Batches are a function of ``(seed, step)`` alone: the windows are visited in a fresh
permutation per epoch, drawn from ``np.random.default_rng([seed, epoch])``. With ``out_dir``
the whole train state is checkpointed (orbax, ``optgqa_jax.train_log``), and a run restarted
with ``resume=True`` continues from its latest checkpoint with exactly the batches, and so
exactly the losses, of an uninterrupted run. Bitwise so on CPU; on GPUs XLA's reductions with
atomics make any two runs differ in the last bits unless
``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` is set before JAX starts.

Training other parameters. ``to_model_params`` maps the trainable pytree (and, if given,
an ``aux`` pytree that is an input of every step but never trained) to the model's params
(default: identity), so a caller can train, say, the merge weights of grouped KV heads from
which the K/V projections are built, with the original projections frozen in ``aux``. Arrays
go through ``aux``, not a closure: a closure would bake them into the compiled program as
constants, and a new grouping would compile a new program.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax
from tqdm.auto import tqdm

from optgqa_jax import sharding, train_log
from optgqa_jax.config import ModelConfig
from optgqa_jax.evaluate import check_windows, windows_perplexity
from optgqa_jax.model import check_params_match, forward

COMPUTE_DTYPES = ("bfloat16", "float32")
TRAIN_IMPLS = ("xla", "reference")  # attention with a backward pass (the Pallas kernels have none)
# TrainConfig fields that change what is logged, not what is trained: may differ on resume.
_BOOKKEEPING = ("log_every", "eval_every", "eval_windows_max", "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (hashable: a static argument of the jitted step).

    Attributes:
      steps: optimizer steps of the whole run.
      batch_size: windows per optimizer step.
      grad_accum: micro-batches per step (must divide batch_size).
      peak_lr: learning rate after warmup.
      warmup_steps: linear warmup steps (< steps).
      min_lr_ratio: the cosine decays to ``peak_lr * min_lr_ratio``.
      weight_decay: AdamW decoupled weight decay, applied to matrices (ndim >= 2) only.
      b1, b2, eps: Adam moment decays and denominator epsilon.
      grad_clip: global gradient-norm bound.
      compute_dtype: ``"bfloat16"`` or ``"float32"`` (see the module docstring).
      attention_impl: ``"xla"`` (cuDNN flash attention on NVIDIA GPUs) or ``"reference"``.
      eval_every: evaluate every this many steps (0: only at the end).
      eval_windows_max: evaluate on at most this many of the eval windows (the first ones).
      checkpoint_every: checkpoint every this many steps (0: only at the end).
      seed: seeds the batch order.
      log_every: log (and write ``train_log.json``) every this many steps.
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    peak_lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    compute_dtype: str = "bfloat16"
    attention_impl: str = "xla"
    eval_every: int = 0
    eval_windows_max: int = 256
    checkpoint_every: int = 0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {lo}, got {v!r}")
            object.__setattr__(self, name, int(v))  # numpy ints would not serialize to JSON

        def number(name, lo, hi, lo_open=False, hi_open=False):
            v = getattr(self, name)
            ok = (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                  and math.isfinite(v) and (v > lo if lo_open else v >= lo)
                  and (v < hi if hi_open else v <= hi))
            if not ok:
                span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                raise ValueError(f"TrainConfig.{name} must be a number in {span}, got {v!r}")
            object.__setattr__(self, name, float(v))

        for name, lo in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0),
                         ("eval_every", 0), ("eval_windows_max", 1), ("checkpoint_every", 0),
                         ("seed", 0), ("log_every", 1)):
            integer(name, lo)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be a multiple of "
                             f"grad_accum={self.grad_accum}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} must be smaller "
                             f"than steps={self.steps}")
        number("peak_lr", 0, math.inf, lo_open=True, hi_open=True)
        number("min_lr_ratio", 0, 1)
        number("weight_decay", 0, math.inf, hi_open=True)
        number("b1", 0, 1, hi_open=True)
        number("b2", 0, 1, hi_open=True)
        number("eps", 0, math.inf, lo_open=True, hi_open=True)
        number("grad_clip", 0, math.inf, lo_open=True, hi_open=True)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"TrainConfig.compute_dtype must be one of {COMPUTE_DTYPES}, got "
                             f"{self.compute_dtype!r} (float16 would need loss scaling)")
        if self.attention_impl not in TRAIN_IMPLS:
            raise ValueError(f"TrainConfig.attention_impl must be one of {TRAIN_IMPLS}, got "
                             f"{self.attention_impl!r} (the Pallas kernels have no gradient)")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per gradient-accumulation step (``batch_size // grad_accum``)."""
        return self.batch_size // self.grad_accum

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)


class TrainState(NamedTuple):
    """Everything a step updates: int32 step count, float32 trainable params, optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      params: the final trainable pytree, float32.
      history: ``{"train": {"step", "loss", "lr", "grad_norm", "tokens_per_s"}, "eval":
        {"step", "nll", "perplexity"}}``, lists over logged steps and evaluations (a resumed run
        includes the entries logged before the interruption). ``loss`` is the logged step's
        own batch loss, ``grad_norm`` its gradient's global norm before clipping, and
        ``tokens_per_s`` the throughput since the previous log (None for the first step of a
        call, which compiles).
      tokens_per_s: training throughput of this call, compilation and evaluation excluded
        (None when it ran fewer than two steps).
    """

    params: Any
    history: dict
    tokens_per_s: Optional[float]


# ----------------------------------------------------------------------------- pieces
def learning_rate(tc: TrainConfig) -> optax.Schedule:
    """The learning rate of 0-based step s (see the module docstring)."""
    cosine = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.peak_lr, warmup_steps=tc.warmup_steps,
        decay_steps=tc.steps, end_value=tc.peak_lr * tc.min_lr_ratio)
    return lambda step: cosine(step + 1)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on :func:`learning_rate`.

    Weight decay applies to leaves with ndim >= 2 (the projection matrices, embedding and LM
    head), not to RMSNorm scales or other vectors and scalars: a norm scale sets the size of
    its layer's input, and decaying it shrinks activations instead of regularizing weights.
    """
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(learning_rate(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                    weight_decay=tc.weight_decay,
                    mask=lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)))


def next_token_loss(cfg: ModelConfig, params: dict, tokens: jax.Array,
                    attention_impl: str = "xla") -> jax.Array:
    """Mean next-token NLL (nats, float32 scalar) of ``tokens[:, 1:]`` given their prefixes.

    Args:
      cfg: the model's configuration (its dtype is the compute dtype).
      params: model params matching `cfg`.
      tokens: int [B, T] windows, T >= 2.
      attention_impl: as for :func:`optgqa_jax.forward`.
    """
    logits = forward(cfg, params, tokens, attention_impl=attention_impl)[:, :-1]  # [B, T-1, V]
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(logz - target)


def _cast_floats(tree, dtype):
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree_util.tree_map(cast, tree)


def _global_norm(tree) -> jax.Array:
    # Written out: optax renamed its helper (global_norm -> tree.norm) across versions.
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def _identity(tree):
    return tree


def _model_params(to_model_params: Callable, trainable, aux):
    return to_model_params(trainable) if aux is None else to_model_params(trainable, aux)


@functools.partial(jax.jit, static_argnames=("tc", "to_model_params"))
def _compute_params(trainable, aux, *, tc: TrainConfig, to_model_params: Callable):
    return _cast_floats(_model_params(to_model_params, trainable, aux),
                        jnp.dtype(tc.compute_dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "tc", "to_model_params"), donate_argnums=0)
def _train_step(state: TrainState, micro_batches: jax.Array, aux, *, cfg: ModelConfig,
                tc: TrainConfig, to_model_params: Callable):
    """One optimizer step on micro_batches int32 [A, B/A, T]; the input state is donated."""
    compute_cfg = cfg.replace(dtype=tc.compute_dtype)

    def loss_fn(trainable, tokens):
        params = _cast_floats(_model_params(to_model_params, trainable, aux),
                              compute_cfg.jnp_dtype)
        return next_token_loss(compute_cfg, params, tokens, tc.attention_impl)

    def accumulate(carry, tokens):  # tokens [B/A, T]
        loss_sum, grad_sum = carry
        loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens)
        return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.float32(0), zeros), micro_batches)
    A = micro_batches.shape[0]
    grads = jax.tree_util.tree_map(lambda g: g / A, grad_sum)  # equal tokens per micro-batch
    updates, opt_state = make_optimizer(tc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / A, "grad_norm": _global_norm(grads),
               "lr": learning_rate(tc)(state.step)}
    return TrainState(state.step + 1, params, opt_state), metrics


def _place(cfg: ModelConfig, master, mesh, fsdp: bool, sharded: bool):
    """Master weights on `mesh`: by the partition rules, or replicated (trainable trees that
    are not model params)."""
    if sharded:
        return sharding.shard_params(cfg, master, mesh, fsdp)
    if fsdp:
        raise ValueError("fsdp=True needs the trainable params to be model params "
                         "(to_model_params=None)")
    return jax.device_put(master, sharding.replicated(mesh))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Window indices [batch_size] of 0-based `step`: positions ``step*batch_size ..`` of the
    stream of per-epoch permutations of ``range(n)`` (a batch may straddle two epochs)."""
    pos = step * batch_size + np.arange(batch_size)
    return np.array([_epoch_order(n, seed, int(p // n))[p % n] for p in pos])


def model_flops_per_token(cfg: ModelConfig, seqlen: int) -> int:
    """Training FLOPs per token (forward + backward), the PaLM paper's appendix B count.

    ``6 * P + 12 * L * N * H * T``: P counts the weights of every matrix product (the
    projections, MLP and LM head; the embedding lookup and norm scales do none), 2 FLOPs per
    multiply-add, times 3 for the backward pass; the second term is the attention scores and
    their weighted values over the full T x T, as PaLM counts it: causal masking, which lets
    flash attention skip about half of it, is not subtracted, so MFU from it is comparable
    with the published figures.
    """
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    per_layer = 2 * D * N * H + 2 * D * K * H + 3 * D * cfg.ffn_dim  # q, o; k, v; MLP
    matmul_params = cfg.n_layers * per_layer + D * cfg.vocab_size  # + LM head (tied or not)
    return 6 * matmul_params + 12 * cfg.n_layers * N * H * seqlen


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware's peak FLOP/s."""
    return tokens_per_s * flops_per_token / peak_flops


def _evaluate(cfg, tc, trainable, aux, to_model_params, windows) -> dict:
    params = _compute_params(trainable, aux, tc=tc, to_model_params=to_model_params)
    ppl = windows_perplexity(cfg.replace(dtype=tc.compute_dtype), params, windows,
                             batch_size=min(tc.micro_batch_size, len(windows)),
                             attention_impl=tc.attention_impl)
    return {"nll": float(np.log(ppl)), "perplexity": ppl}


# ----------------------------------------------------------------------------- the loop
def train(cfg: ModelConfig, params: Any, train_windows, tc: TrainConfig, *,
          eval_windows=None, out_dir: Optional[str] = None, resume: bool = True,
          progress: bool = True, to_model_params: Optional[Callable[..., dict]] = None,
          aux: Any = None, mesh=None, fsdp: bool = False) -> TrainResult:
    """Train `params` on next-token prediction over `train_windows`.

    Args:
      cfg: the model's configuration (its dtype is the storage dtype; the step computes in
        ``tc.compute_dtype``).
      params: the trainable pytree of float arrays: model params, or what `to_model_params`
        maps to them. It becomes float32 master weights (copies: the caller's arrays stay
        valid).
      train_windows: int [n, T] token windows, n >= batch_size, 2 <= T <= cfg.max_seq_len.
      tc: the run's settings.
      eval_windows: optional int [m, T'] held-out windows, scored (mean NLL and perplexity, in
        the compute dtype) every ``tc.eval_every`` steps and at the end.
      out_dir: where checkpoints, ``train_log.json`` and ``loss.png`` go (layout in
        ``optgqa_jax.train_log``); None keeps nothing on disk.
      resume: continue from the latest checkpoint in `out_dir`, if any. The stored TrainConfig
        (all but its logging cadences), ModelConfig and training data must equal this call's.
        False starts over, deleting the checkpoints of an earlier run in `out_dir`.
      progress: show a tqdm bar with the loss.
      to_model_params: maps the trainable pytree to model params matching `cfg` (any float
        dtype; they are cast). A static argument of the jitted step, so it must be hashable
        and should be the same object on every call: a module-level function or a
        ``functools.partial`` of one (a new object compiles the step anew). Default: identity.
        Called as ``to_model_params(params, aux)`` when `aux` is given.
      aux: optional pytree of arrays that `to_model_params` reads but that is not trained:
        frozen weights, index arrays such as a grouping (nor checkpointed: pass the same one
        to resume).
      mesh: optional ``(data, model)`` mesh (``optgqa_jax.sharding.make_mesh``): each batch is
        split over ``data`` (data parallel); model params are placed by
        ``optgqa_jax.sharding.partition_specs`` (tensor parallel over ``model``), other
        trainable trees are replicated. The optimizer state follows the params' placement.
      fsdp: with `mesh`, also split every parameter (and so its optimizer state) over
        ``data`` (fully sharded data parallel), for models that do not fit one device.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: bad windows (naming ``train_windows`` or ``eval_windows``), fewer windows
        than ``tc.batch_size``, params with non-float leaves or that do not match `cfg`, or a
        resume whose stored setup differs (the error names the differing fields).
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(tc, TrainConfig):
        raise TypeError(f"tc must be a TrainConfig, got {type(tc).__name__}")
    to_model = _identity if to_model_params is None else to_model_params
    windows = check_windows(cfg, train_windows, "train_windows")
    n, T = windows.shape
    if n < tc.batch_size:
        raise ValueError(f"train_windows holds {n} windows, fewer than "
                         f"TrainConfig.batch_size={tc.batch_size}")
    if eval_windows is not None:
        eval_windows = check_windows(cfg, eval_windows, "eval_windows")[:tc.eval_windows_max]
    not_float = [jax.tree_util.keystr(path) for path, x in
                 jax.tree_util.tree_leaves_with_path(params)
                 if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    if not_float:
        raise ValueError(f"params must hold only float arrays (all of them are trained); "
                         f"{not_float[:4]} are not: pass constants through aux instead")
    # Copies, so that donating the train state never invalidates the caller's arrays.
    master = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), params)
    if aux is not None and to_model_params is None:
        raise ValueError("aux is given but to_model_params is not: nothing would read it")
    check_params_match(cfg, jax.eval_shape(
        lambda p, f: _cast_floats(_model_params(to_model, p, f), cfg.jnp_dtype), master, aux),
                       what="params" if to_model_params is None else "to_model_params(params)")

    if mesh is not None:
        master = _place(cfg, master, mesh, fsdp, sharded=to_model_params is None)
        if tc.micro_batch_size % mesh.shape["data"]:
            raise ValueError(f"micro-batches of {tc.micro_batch_size} windows do not split over "
                             f"the mesh's data axis of {mesh.shape['data']} devices")
    elif fsdp:
        raise ValueError("fsdp=True needs a mesh")
    step0 = jnp.int32(0) if mesh is None else jax.device_put(jnp.int32(0),
                                                             sharding.replicated(mesh))
    opt_state = jax.jit(make_optimizer(tc).init)(master)
    if mesh is not None:  # scalars (step counts) the init left on one device: replicate them
        opt_state = jax.tree_util.tree_map(
            lambda a: a if len(a.sharding.device_set) == mesh.size
            else jax.device_put(a, sharding.replicated(mesh)), opt_state)
    state = TrainState(step0, master, opt_state)
    template = state
    history = {"train": {k: [] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s")},
               "eval": {k: [] for k in ("step", "nll", "perplexity")}}
    record = {"train_config": tc.to_dict(), "model_config": cfg.to_dict(),
              "train_data": {"shape": [n, T],
                             "sha256": hashlib.sha256(windows.tobytes()).hexdigest()}}
    earlier_wall_s = 0.0
    if out_dir is not None:
        state, earlier, earlier_wall_s = train_log.start_run(
            out_dir, record, state, resume=resume,
            may_differ=tuple(f"train_config.{f}" for f in _BOOKKEEPING))
        for part, columns in history.items():
            columns.update({k: earlier.get(part, {}).get(k, []) for k in columns})
        if mesh is not None:  # a restored state comes back unsharded: place it as the new one
            state = jax.tree_util.tree_map(lambda a, t: jax.device_put(a, t.sharding), state,
                                           template)

    start = int(state.step)
    A, M = tc.grad_accum, tc.micro_batch_size
    tokens_per_step = tc.batch_size * T
    t_start = time.perf_counter()
    step_fn = functools.partial(_train_step, aux=aux, cfg=cfg, tc=tc,
                                to_model_params=to_model)
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not progress)
    # The throughput clock runs only while steps run: it starts after this call's first step
    # (compilation) and pauses for evaluation, checkpoints and file writes.
    clock = None  # (time, step) at which it last started
    run_s, run_steps, log_s, log_steps = 0.0, 0, 0.0, 0

    def write_files(plot: bool):
        if out_dir is None:
            return
        wall = earlier_wall_s + time.perf_counter() - t_start
        train_log.write_log(out_dir, {**record, "history": history, "wall_time_s": wall,
                                      "flops_per_token": model_flops_per_token(cfg, T)})
        if plot:
            train_log.plot_losses(os.path.join(out_dir, train_log.PLOT_FILE), history,
                                  title=f"{n} windows of {T} tokens, {tc.steps} steps")

    for step in range(start, tc.steps):
        tokens = windows[batch_indices(n, tc.batch_size, tc.seed, step)].reshape(A, M, T)
        tokens = (jnp.asarray(tokens) if mesh is None else jax.device_put(
            tokens, NamedSharding(mesh, PartitionSpec(None, "data", None))))
        state, metrics = step_fn(state, tokens)
        done = step + 1
        bar.update(1)
        log_now = done % tc.log_every == 0 or done == tc.steps
        eval_now = eval_windows is not None and (
            done == tc.steps or (tc.eval_every > 0 and done % tc.eval_every == 0))
        ckpt_now = out_dir is not None and (
            done == tc.steps or (tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0))
        if not (clock is None or log_now or eval_now or ckpt_now):
            continue  # steps queue up on the device; the host does not wait
        jax.block_until_ready(state.step)
        if clock is not None:
            elapsed, steps_run = time.perf_counter() - clock[0], done - clock[1]
            run_s, run_steps = run_s + elapsed, run_steps + steps_run
            log_s, log_steps = log_s + elapsed, log_steps + steps_run
        if log_now:
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            row.update(step=done, tokens_per_s=log_steps * tokens_per_step / log_s
                       if log_steps else None)
            for key, value in row.items():
                history["train"][key].append(value)
            log_s, log_steps = 0.0, 0
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if eval_now:
            result = dict(_evaluate(cfg, tc, state.params, aux, to_model, eval_windows),
                          step=done)
            for key, value in result.items():
                history["eval"][key].append(value)
            if progress:
                bar.write(f"step {done}: eval loss {result['nll']:.4f}, "
                          f"perplexity {result['perplexity']:.3f}")
        if ckpt_now:
            train_log.save_state(out_dir, done, state)
        if log_now or eval_now:
            write_files(plot=eval_now or done == tc.steps)
        clock = (time.perf_counter(), done)
    bar.close()
    if start == tc.steps:  # resumed a finished run: nothing ran, refresh the files
        write_files(plot=True)
    return TrainResult(params=state.params, history=history,
                       tokens_per_s=run_steps * tokens_per_step / run_s if run_steps else None)
