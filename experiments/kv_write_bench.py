"""Writing one step's K/V into the paged pool: XLA scatter variants, timed (one NVIDIA GPU).

``kv_layers.PagedLayerKV.attend`` writes each token's K and V rows into pool slots with
``.at[:, slots].set(..., mode="drop")``; padding tokens all point at one slot past the pool,
so the indices are not unique and XLA must assume collisions. A profile of the engine's mixed
step (``results/h100/profile_mixed_fixed_aee3517.md``) put 3.1 ms of a 102.7 ms step in these
scatters, far above the bytes they move. This script times, on the Llama-3-8B pool shape (8 KV
heads of 128, the 48 GiB pool's 786,432 slots per layer; ``--slots``), with the pool donated
as in the engine's step:

* ``current``: padding tokens at one shared slot past the pool, no index hints;
* ``unique``: each padding token at its own slot past the pool, ``unique_indices=True``;
* ``unique+sorted``: the same with the real tokens' slots in ascending order and
  ``indices_are_sorted=True`` (the engine's write since 6ec419d, ``EngineConfig.sorted_kv_writes``);
* ``pallas``: ``pallas_kernels.kv_write`` (one Triton launch writing the rows in place,
  ``EngineConfig.kv_write_kernel``), on the unique slots in token order;

for a decode step (482 tokens) and a mixed step (4096 tokens, 5% padding). Reported: µs per
write of K and V for one layer, and GB/s of the K/V bytes written.

Usage::

    python experiments/kv_write_bench.py [--slots 786432] [--variants current,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax.benchmark import source_commit  # noqa: E402

K, H = 8, 128


def write(pages_k, pages_v, slots, k, v, *, unique: bool, ordered: bool):
    """pages [K, S, H] with rows `slots` set to k/v [T, K, H] (out-of-range slots dropped)."""
    kw = dict(mode="drop", unique_indices=unique, indices_are_sorted=ordered)
    return (pages_k.at[:, slots].set(jnp.moveaxis(k, 1, 0), **kw),
            pages_v.at[:, slots].set(jnp.moveaxis(v, 1, 0), **kw))


def write_kernel(pages_k, pages_v, slots, k, v):
    """The same write by ``pallas_kernels.kv_write`` (slots past the pool dropped)."""
    from pallas_kernels.kv_write import kv_write
    return kv_write(k, v, slots, pages_k, pages_v)


VARIANTS = ("current", "unique", "unique+sorted", "pallas")


def step_slots(rng, S: int, T: int, real: int, variant: str) -> np.ndarray:
    """int32 [T]: `real` distinct pool slots, then padding per `variant`."""
    slots = rng.choice(S, real, replace=False).astype(np.int32)
    if variant == "unique+sorted":
        slots = np.sort(slots)
    pad = (np.full(T - real, S, np.int32) if variant == "current"
           else S + np.arange(T - real, dtype=np.int32))
    return np.concatenate([slots, pad])


def time_variant(S: int, T: int, real: int, variant: str, iters: int = 50) -> float:
    """Seconds per (K, V) write of one layer, the pool donated and rewritten `iters` times."""
    rng = np.random.default_rng(T)
    f = jax.jit(write_kernel if variant == "pallas" else
                functools.partial(write, unique=variant != "current",
                                  ordered=variant == "unique+sorted"), donate_argnums=(0, 1))
    pk = jnp.zeros((K, S, H), jnp.bfloat16)
    pv = jnp.zeros((K, S, H), jnp.bfloat16)
    slots = jnp.asarray(step_slots(rng, S, T, real, variant))
    k = jax.random.normal(jax.random.PRNGKey(T), (T, K, H), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(T + 1), (T, K, H), jnp.bfloat16)
    pk, pv = f(pk, pv, slots, k, v)                           # compile, warm up
    got = np.asarray(pk[:, np.asarray(slots[:real])].astype(jnp.float32))
    want = np.asarray(jnp.moveaxis(k[:real], 1, 0).astype(jnp.float32))
    if not np.array_equal(got, want):
        raise AssertionError(f"{variant}: the written rows differ from k")
    times = []
    for _ in range(5):
        jax.block_until_ready((pk, pv))
        t0 = time.perf_counter()
        for _ in range(iters):
            pk, pv = f(pk, pv, slots, k, v)
        jax.block_until_ready((pk, pv))
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=786432, help="pool slots per layer")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args()
    variants = a.variants.split(",")
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants must name some of {VARIANTS}, got {a.variants!r}")
    if a.slots < 4096:
        p.error(f"--slots must be >= 4096, got {a.slots}")
    os.makedirs(a.out, exist_ok=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=source_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                slots=a.slots, kv_heads=K, head_dim=H)
    rows = []
    for name, T, real in (("decode step", 512, 482), ("mixed step", 4096, 3890)):
        for variant in variants:
            t = time_variant(a.slots, T, real, variant)
            nbytes = 2 * real * K * H * 2
            rows.append(dict(step=name, tokens=T, real=real, variant=variant, us=t * 1e6,
                             gb_per_s=nbytes / t / 1e9))
            print(f"{name} ({real}/{T} tokens) {variant}: {t * 1e6:.1f} us, "
                  f"{nbytes / t / 1e9:.0f} GB/s", flush=True)
    with open(os.path.join(a.out, "kv_write_bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = ["# Writing a step's K/V into the paged pool (one layer)\n",
             f"Device {meta['device']}, jax {meta['jax']}, commit {meta['commit']}, "
             f"{meta['date']}; pool [8, {a.slots:,}, 128] bfloat16 per K and V, donated; median of "
             "5 batches of 50 writes.\n",
             "| step | tokens (real/padded) | variant | µs per layer | GB/s written |",
             "| --- | --- | --- | ---: | ---: |"]
    lines += [f"| {r['step']} | {r['real']}/{r['tokens']} | {r['variant']} | {r['us']:.1f} | "
              f"{r['gb_per_s']:.0f} |" for r in rows]
    with open(os.path.join(a.out, "kv_write_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
