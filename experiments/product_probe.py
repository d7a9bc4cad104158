"""The layer's bfloat16 products at the engine's step sizes, by weight layout (one NVIDIA GPU).

Two traces of the engine's steps on an H100 put the o projection well below the other products
of the layer: at 482 rows (a decode step, ``results/h100/profile_decode_b482_d29eac9.md``) its
cuBLAS kernel ran 32 calls in 1.12 ms, about 460 TFLOP/s, while q/k/v and down ran at about
790 and gate/up at 710; at 4,096 rows (a mixed step, ``profile_mixed_fixed_aee3517.md``) about
490 against 750-830, on a kernel of another layout (``..._NNN`` where the others were
``..._NNT``). Brought to the others' rate it would take about 0.2 s from each of the two kinds
of step in the 1000 x 256/256 run, most of the 0.55 s that 30,000 tokens/s still needed. (Run
at 5b427eb, ``results/h100/step_gemms_5b427eb/``: alone, o runs at the others' rate; the
decode step's o did too, and the mixed step's slow o is cuBLAS's algorithm choice in that
compile, see ``o_proj_f32_probe.py``.)

This script times each product of the Llama-3-8B layer -- q/k/v ``[4096, 6144]``, o
``[4096, 4096]``, gate/up ``[4096, 28672]``, down ``[14336, 4096]`` -- at each ``--rows`` count
M, as:

* ``kn``: ``x @ W`` with a bfloat16 result, W stored ``[K, N]`` (the model's product);
* ``kn/f32``: the same product asked for in float32 and rounded to bfloat16 after it (XLA
  may then fuse it as a Triton GEMM where it calls cuBLAS for ``kn``);
* ``nk``: ``x @ W_t.T``, W stored transposed ``[N, K]``;
* ``kn+res`` / ``nk+res``: ``r + x @ W`` (the residual add that follows o and down);
* ``kn/pad``: x padded to a multiple of 128 rows (M not a multiple of 128 only).

Every variant accumulates in float32 (cuBLAS and XLA's Triton GEMMs both do for bfloat16
inputs) and returns bfloat16. Up to 5b427eb ``kn``, ``nk`` and ``kn/pad`` were the float32
forms (``kn/f32``'s), so ``results/h100/step_gemms_5b427eb/product_probe_5b427eb.md`` shows
those under the plain names.

With ``--xla-option NAME=VALUE`` (repeatable) the ``kn`` variant is timed a second time
compiled with those options, e.g. ``xla_gpu_triton_gemm_any=true`` (XLA may then pick, by autotuning,
a Triton GEMM over cuBLAS for a plain dot).

Every variant's product is checked against a float32 reference; each is timed with
``timing.timeit_rotating`` over weight sets that overflow the L2 cache, and its GEMM kernel's
name is read from a device trace of the same program. Reported: µs per product, TFLOP/s, and
the rate over gate/up ``kn``'s at the same M.

Usage::

    python experiments/product_probe.py [--rows 482,512,4096] [--sets 4]
        [--xla-option NAME=VALUE ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import timing  # noqa: E402
from optgqa_jax.engine.runner import parse_xla_options  # noqa: E402
sys.path.insert(0, os.path.dirname(__file__))
import step_trace  # noqa: E402  (the trace reader)

# name -> (K, N): the Llama-3-8B layer's products with fused q/k/v and gate/up
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
VARIANTS = ("kn", "kn/f32", "nk", "kn+res", "nk+res", "kn/pad")


def product(variant: str, x, w, r=None):
    """``x @ W`` (plus ``r`` for the ``+res`` variants) in x's dtype.

    x [M, K]; w [K, N] for the ``kn`` variants, [N, K] (W transposed) for the ``nk`` ones;
    r [M, N] or None."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant.endswith("+res") and r is None:
        raise ValueError(f"variant {variant!r} needs the residual r")
    M = x.shape[0]
    if variant == "kn/pad":
        y = jnp.dot(jnp.pad(x, ((0, -M % 128), (0, 0))), w)[:M]
    elif variant == "kn/f32":
        y = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    elif variant.startswith("nk"):
        y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
    else:
        y = jnp.dot(x, w)
    return r + y if variant.endswith("+res") else y


def variants_for(rows: int) -> tuple:
    """The variants timed at `rows` rows: padding only where it changes the shape."""
    return tuple(v for v in VARIANTS if v != "kn/pad" or rows % 128)


def arg_sets(rows: int, K: int, N: int, variant: str, sets: int, seed: int) -> list:
    """`sets` argument tuples (x, w[, r]) of fresh normal values, w in the variant's layout."""
    key = jax.random.PRNGKey(seed)
    out = []
    for i in range(sets):
        kx, kw, kr = jax.random.split(jax.random.fold_in(key, i), 3)
        x = jax.random.normal(kx, (rows, K), jnp.bfloat16)
        shape = (N, K) if variant.startswith("nk") else (K, N)
        w = (jax.random.normal(kw, shape, jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
        r = jax.random.normal(kr, (rows, N), jnp.bfloat16)
        out.append((x, w, r) if variant.endswith("+res") else (x, w))
    return out


def check(variant: str, args, tol: float = 2e-2, rows: int = 64) -> float:
    """Relative error of `variant`'s product against a float32 numpy ``x @ W`` (+ r), on its
    first `rows` rows (the reference runs on the host)."""
    x = np.asarray(args[0][:rows], np.float32)
    w = np.asarray(args[1], np.float32)
    w = w.T if variant.startswith("nk") else w
    want = x @ w + (np.asarray(args[2][:rows], np.float32) if variant.endswith("+res") else 0)
    got = np.asarray(jax.jit(lambda *a: product(variant, *a))(*args)[:rows], np.float32)
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    if not np.isfinite(err) or err > tol:
        raise AssertionError(f"{variant}: relative error {err:.3g} > {tol}")
    return err


def gemm_kernel(variant: str, sets: list, options=None) -> str:
    """Name of the longest-running kernel in a device trace of `variant` over `sets`."""
    many = jax.jit(lambda s: [product(variant, *a) for a in s], compiler_options=options)
    jax.block_until_ready(many(sets))
    tables, _ = step_trace.traced_ops(lambda: many(sets), steps=2)
    ops = [op for rows in tables.values() for op in rows if not op[0].startswith("Memcpy")]
    return max(ops, key=lambda op: op[1])[0] if ops else "?"


def write(results: list, meta: dict, out: str) -> str:
    """Write the rows timed so far as JSON + markdown under `out`; returns the markdown."""
    for r in results:
        ref = next((q for q in results if q["rows"] == r["rows"] and q["shape"] == "gate_up"
                    and q["variant"] == "kn"), None)
        r["vs_gate_up"] = r["tflops"] / ref["tflops"] if ref else float("nan")
    with open(os.path.join(out, "product_probe.json"), "w") as f:
        json.dump(dict(meta=meta, rows=results), f, indent=1)
    extra = meta["xla_options"]
    lines = ["# The layer's bfloat16 products by weight layout\n",
             f"Device {meta['device']}, jax {meta['jax']}, commit {meta['commit']}, "
             f"{meta['date']}; `timeit_rotating` over {meta['sets']} weight sets; rate over "
             "gate/up `kn`'s at the same rows" + (f"; `[options]`: compiled with {extra}"
                                                  if extra else "") + ".\n",
             "| rows | product | K × N | variant | µs | TFLOP/s | × gate/up rate | kernel |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['rows']} | {r['shape']} | {r['K']} × {r['N']} | {r['variant']} | "
              f"{r['us']:.1f} | {r['tflops']:.0f} | {r['vs_gate_up']:.2f} | "
              f"`{r['kernel'][:60]}` |" for r in results]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "product_probe.md"), "w") as f:
        f.write(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="482,512,4096", help="comma-separated row counts M")
    p.add_argument("--sets", type=int, default=4, help="weight sets rotated per timed program")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="also time the kn variant compiled with these XLA options")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args()
    try:
        extra = parse_xla_options(a.xla_option)
    except ValueError as e:
        p.error(f"--xla-option: {e}")
    option_sets = [None] + ([extra] if extra else [])
    try:
        rows_list = [int(v) for v in a.rows.split(",")]
    except ValueError:
        p.error(f"--rows must be comma-separated integers, got {a.rows!r}")
    if any(m < 1 for m in rows_list):
        p.error(f"--rows must be positive, got {a.rows!r}")
    if a.sets < 1:
        p.error(f"--sets must be >= 1, got {a.sets}")
    if jax.devices()[0].platform != "gpu":
        raise SystemExit(f"this benchmark needs a GPU; jax sees {jax.devices()[0].platform}")
    os.makedirs(a.out, exist_ok=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=timing.source_commit(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), sets=a.sets,
                xla_options=extra)
    results = []
    for M in rows_list:
        for name, (K, N) in SHAPES.items():
            for variant in variants_for(M):
                sets = arg_sets(M, K, N, variant, a.sets, seed=len(results))
                err = check(variant, sets[0])
                # the options (slow to compile when they widen XLA's autotuning) on kn only
                for opts in option_sets if variant == "kn" else option_sets[:1]:
                    label = variant + (" [options]" if opts else "")
                    try:
                        t = timing.timeit_rotating(lambda *args: product(variant, *args), sets,
                                                   compiler_options=opts)
                        kernel = gemm_kernel(variant, sets, opts)
                    except Exception as e:  # an option this XLA does not know: say so, go on
                        if not opts:
                            raise
                        print(f"M={M} {name} {label}: failed: {e}", flush=True)
                        t, kernel = float("nan"), f"failed: {type(e).__name__}"
                    row = dict(rows=M, shape=name, K=K, N=N, variant=label, us=t * 1e6,
                               tflops=2 * M * K * N / t / 1e12, rel_err=err, kernel=kernel)
                    results.append(row)
                    print(f"M={M} {name} {label}: {row['us']:.1f} us, {row['tflops']:.0f} "
                          f"TFLOP/s ({kernel})", flush=True)
                del sets
        write(results, meta, a.out)  # what is timed so far survives a time limit
    print(write(results, meta, a.out))


if __name__ == "__main__":
    main()
