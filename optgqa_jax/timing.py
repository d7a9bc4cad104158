"""Measurement helpers of the benchmarks: the copy-bandwidth ceiling, wall-clock timing of
jitted functions (also rotating over argument sets that overflow the L2 cache), percentiles, and
the commit being measured. Used by ``optgqa_jax.benchmark`` and the scripts in
``experiments/``.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np


def source_commit() -> str:
    """Short commit of the code being measured: ``$OPTGQA_COMMIT`` when set (for checkouts
    whose .git is absent or stale, as on a device machine), else ``git rev-parse``, else
    ``"unknown"``."""
    if os.environ.get("OPTGQA_COMMIT"):
        return os.environ["OPTGQA_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

def start_gpu_rounds(parser) -> tuple:
    """The start shared by the interleaved-round GPU comparisons (``experiments/alibi_ab.py``,
    ``group_tiles_ab.py``): parse `parser`'s arguments (it has ``--rounds`` and ``--out``),
    refuse ``--rounds`` below 1, exit unless jax sees a GPU, make ``--out``, measure the copy
    ceiling. Returns (args, ceiling in bytes/s, the run's metadata: device, jax, commit, date,
    copy_gbps, rounds)."""
    import jax

    a = parser.parse_args()
    if a.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {a.rounds}")
    if jax.devices()[0].platform != "gpu":
        raise SystemExit(f"this benchmark needs a GPU; jax sees {jax.devices()[0].platform}")
    os.makedirs(a.out, exist_ok=True)
    ceiling = max(copy_bandwidths().values())
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=source_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                copy_gbps=ceiling / 1e9, rounds=a.rounds)
    return a, ceiling, meta


def copy_bandwidths(nbytes: int = 2 << 30) -> dict:
    """Device-to-device copy bandwidth in bytes/s by several methods (read + written bytes).

    The ceiling for memory-bound kernels is the best of these, so that a slow
    copy method can never flatter a kernel's "% of copy":

    * ``xla-scale-bf16``: an XLA elementwise kernel ``y = 2 x`` over bfloat16;
    * ``xla-scale-f32``: the same over float32 (wider elements per thread);
    * ``torch-copy``: ``Tensor.copy_`` (cudaMemcpy) when PyTorch with CUDA is
      importable — a cross-check against a second runtime.
    """
    import jax
    import jax.numpy as jnp

    def best_of(fn, x, trials: int = 5, iters: int = 10) -> float:
        jax.block_until_ready(fn(x))
        best = float("inf")
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(iters):
                y = fn(x)
            jax.block_until_ready(y)
            best = min(best, (time.perf_counter() - t0) / iters)
        return 2 * nbytes / best

    out = {}
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    out["xla-scale-bf16"] = best_of(jax.jit(lambda x: x * 2), x)
    del x
    x = jnp.ones((nbytes // 4,), jnp.float32)
    out["xla-scale-f32"] = best_of(jax.jit(lambda x: x * 2), x)
    del x
    try:
        import torch

        if torch.cuda.is_available():
            a = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
            b = torch.empty_like(a)
            b.copy_(a)
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(10):
                    b.copy_(a)
                torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - t0) / 10)
            out["torch-copy"] = 2 * nbytes / best
            del a, b
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return out


def timeit(fn, *args, iters: int = 20, trials: int = 5) -> float:
    """Median seconds per call of ``fn(*args)`` over `trials` batches of `iters` calls, after
    a warm-up call (compilation); waits for the device at the end of each batch."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def timeit_rotating(fn, arg_sets, iters: int = 20, trials: int = 3,
                    compiler_options=None) -> float:
    """Median seconds per call of ``fn`` over several independent argument sets, all called in
    one jitted program (``len(arg_sets)`` calls per launch).

    For kernels of a few microseconds: one launch amortises Python's dispatch over many calls,
    and rotating over arguments whose bytes add up to several times the L2 cache makes every
    call read its weights from memory, as consecutive layers of a model do. Each timed batch
    runs `iters` programs back to back, so only the first program's dispatch and the last wait
    are exposed; with few programs per batch or few argument sets per program those inflate
    short kernels by tens of µs (``experiments/timing_gaps.py``): pass 8 or more sets.
    """
    import jax

    many = jax.jit(lambda sets: [fn(*args) for args in sets], compiler_options=compiler_options)
    return timeit(many, list(arg_sets), iters=iters, trials=trials) / len(arg_sets)


def interleaved_rounds(timers: dict, rounds: int) -> dict:
    """Call every timer of `timers` (key -> zero-argument callable returning seconds) once
    per round, in the dict's order, for `rounds` rounds; returns key -> the list of its
    times. Interleaving spreads a drifting device (clocks, a neighbour's load) over every
    key alike, so medians of these lists compare fairly where single timings of the same
    setting moved by 2x between calls (``experiments/results/h100/gqsa/``)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    times = {k: [] for k in timers}
    for _ in range(rounds):
        for k, timer in timers.items():
            times[k].append(float(timer()))
    return times


def confirm_finalists(tried: list, config_cls, extra, time_config, peer, rounds: int,
                      finalists: int = 3):
    """Time a tile search's finalists again, interleaved with a peer.

    The `finalists` fastest distinct configs of `tried` (records with ``config``, a dict of
    ``config_cls`` fields, and ``us``; failed records have no ``us``), then `extra` (the rules'
    config; None for none) unless already among them, are timed with ``time_config(cfg)``
    after ``peer()`` in each of `rounds` rounds (:func:`interleaved_rounds`). Returns (the
    configs, config -> its seconds per round, the peer's seconds per round, config -> its
    median seconds)."""
    ok = sorted((r for r in tried if r.get("us") is not None), key=lambda r: r["us"])
    cfgs = []
    for r in ok:
        cfg = config_cls(**r["config"])
        if cfg not in cfgs and len(cfgs) < finalists:
            cfgs.append(cfg)
    if extra is not None and extra not in cfgs:
        cfgs.append(extra)
    timers = {"peer": peer}
    timers.update({c: (lambda c=c: time_config(c)) for c in cfgs})
    times = interleaved_rounds(timers, rounds)
    peer_times = times.pop("peer")
    return cfgs, times, peer_times, {c: float(np.median(v)) for c, v in times.items()}


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """The memory ceiling in bytes/s: the best of :func:`copy_bandwidths`."""
    return max(copy_bandwidths(nbytes).values())


def _percentiles(xs) -> dict:
    xs = np.asarray(xs, np.float64)
    return dict(mean=float(xs.mean()), p50=float(np.percentile(xs, 50)),
                p99=float(np.percentile(xs, 99)))
