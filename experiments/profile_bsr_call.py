"""Where one batch-1 product's time goes: dense W4 against W4S50 (BSR, four arrays and packed).

Per call, the per-layer benchmark (``gqsa_eval.py --part speed``) puts W4S50 at 0.80× dense
W4's time on gate/up but above it on q/k/v and o. A least-squares fit of those times
(H100, b360e76) gives about 10.4 µs plus 0.73 µs per MiB for W4S50 and 8.3 µs plus 0.56 µs
per MiB for dense W4: a fixed part that weighs most on the small layers. This script splits
each call, on the Llama-3-8B shapes at one row of x, into:

* ``µs``: the call, timed as the per-layer benchmark times it (``timeit_rotating``, weights
  rotated past the L2 cache);
* ``kernel µs``: the main Pallas kernel's device time in a trace of the same program;
* ``other µs``: every other op in that trace (the wrapper's fusions: x's reorder and scaling,
  x's group sums, slices);
* ``idle µs``: the GPU's idle time in that trace, per call. It includes the gaps between the
  traced program's launches (the host's dispatch), so it can exceed the timed call and only
  compares like with like;

for ``w4g128`` (``quant.matmul``), ``w4g128s50`` (``sparse.bsr_matmul``: the rules' or the
tuning table's tiles), ``w4g128s50pk`` (``sparse.packed_bsr_matmul``, ``code_zeros``) and
``w4g128s50pksm`` (packed with shift-major codes: x read as given, no wrapper op) and
``w4g128s50pksmf`` (the same with x handed to the kernel in float32; alone, as here, the casts
of x and of the product are launches of their own, where in a model XLA fuses them into the
neighbouring ops, so compare its kernel column).

Usage::

    python experiments/profile_bsr_call.py [--shapes o,qkv,down,gate_up] [--out DIR]
    python experiments/profile_bsr_call.py --interpret --shape 256x64   # CPU: builds and runs

Writes ``profile_bsr_call.{json,md}`` under ``--out``.
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
sys.path.insert(0, os.path.dirname(__file__))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import quant, sparse  # noqa: E402
from optgqa_jax.sparse.synthetic import random_bsr_linear  # noqa: E402
from pallas_kernels import compiler_options  # noqa: E402
from bench_quant import arg_sets  # noqa: E402
from gqsa_speed import SHAPES  # noqa: E402
from profile_quant import kernel_share  # noqa: E402

FORMATS = ("w4g128", "w4g128s50", "w4g128s50pk", "w4g128s50pksm", "w4g128s50pksmf")
KERNEL_NAMES = {"w4g128": "optgqa_quant_matmul", "w4g128s50": "optgqa_bsr",
                "w4g128s50pk": "optgqa_bsr", "w4g128s50pksm": "optgqa_bsr",
                "w4g128s50pksmf": "optgqa_bsr"}


PRODUCTS = {"w4g128": lambda x, w: quant.matmul(x, w, "pallas"),
            "w4g128s50": lambda x, w: sparse.bsr_matmul(x, w, "pallas"),
            "w4g128s50pk": lambda x, w: sparse.packed_bsr_matmul(x, w, "pallas"),
            "w4g128s50pksm": lambda x, w: sparse.packed_bsr_matmul(x, w, "pallas"),
            "w4g128s50pksmf": lambda x, w: sparse.packed_bsr_matmul(x, w, "pallas")}


def weights(fmt: str, key, K: int, N: int):
    """A random layer of `fmt` (K inputs, N outputs; W4S50: half of every row's groups)."""
    qc = quant.parse_spec("w4g128")
    if fmt == "w4g128":
        return quant.synthetic.random_quantized_linear(key, K, N, qc, "bfloat16")
    b = random_bsr_linear(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)), K, N, qc, 0.5,
                          "bfloat16")
    if fmt == "w4g128s50":
        return b
    return sparse.to_packed_bsr(b, code_order="stream" if fmt.endswith("pk") else "shift_major",
                                x_dtype="float32" if fmt.endswith("pksmf") else None)


def dense_weight(fmt: str, w) -> np.ndarray:
    """float64 [K, N]: the layer's dequantized weight (the reference)."""
    if fmt == "w4g128":
        return np.asarray(quant.dequantize(w, jnp.float32), np.float64)
    b = w if fmt == "w4g128s50" else sparse.unpack_bsr(w)
    return np.asarray(sparse.dequantize_bsr(b, jnp.float32), np.float64)


def profile_shape(name: str, K: int, N: int, interpret: bool) -> list:
    """One row per format: per-call µs and the trace's split of it."""
    opts = {} if interpret else compiler_options()
    key = jax.random.PRNGKey(K + N)
    rows = []
    for fmt in FORMATS:
        f = PRODUCTS[fmt]
        if interpret:      # a CPU check: two copies, no L2 rotation
            sets = [(jax.random.normal(jax.random.fold_in(key, 9 + i), (1, K)).astype(
                jnp.bfloat16), weights(fmt, jax.random.fold_in(key, i), K, N))
                for i in range(2)]
        else:
            sets = arg_sets(key, 1, K, N, lambda k: weights(fmt, k, K, N))
        x, w = sets[0]
        want = np.asarray(x.astype(jnp.float32), np.float64) @ dense_weight(fmt, w)
        got = np.asarray(jax.jit(f)(x, w), np.float64)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        if not err <= 1e-2:      # NaN fails too
            raise AssertionError(f"{name} {fmt}: relative error {err:.2e}")
        t = B.timeit_rotating(f, sets, compiler_options=opts)
        share = {} if interpret else kernel_share(f, sets, KERNEL_NAMES[fmt], opts)
        nbytes = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(w))
        if fmt == "w4g128":          # as gqsa_speed: the act-order indices are not read
            nbytes -= int(w.g_idx.nbytes)
        rows.append(dict(shape=name, K=K, N=N, format=fmt, us=t * 1e6, weight_bytes=nbytes,
                         copies=len(sets), rel_err=err, kernel_us=share.get("kernel_us"),
                         other_us=share.get("other_us"), idle_us=share.get("idle_us"),
                         ops=share.get("ops")))
        print(f"{name} {fmt}: {t * 1e6:.1f} us" + (
            "" if not share else f" (kernel {share['kernel_us']:.1f}, other "
            f"{share['other_us']:.1f}, idle {share['idle_us']:.1f})"), flush=True)
    return rows


def markdown(meta: dict, rows: list) -> str:
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["# One batch-1 product: dense W4 against W4S50, split by a device trace\n",
             f"Device {meta['device']}, jax {meta['jax']}, commit {meta['commit']}, "
             f"{meta['date']}. µs per call (`timeit_rotating`); kernel, other ops and idle "
             "time per call from a trace of the same program (idle includes the gaps between "
             "the traced program's launches, so it can exceed the call).\n",
             "| shape | format | weight MiB | µs | kernel µs | other ops µs | idle µs | "
             "× dense W4 |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    dense = {r["shape"]: r["us"] for r in rows if r["format"] == "w4g128"}
    for r in rows:
        lines.append(f"| {r['shape']} | {r['format']} | {r['weight_bytes'] / 2 ** 20:.1f} | "
                     f"{r['us']:.1f} | {fmt(r['kernel_us'])} | {fmt(r['other_us'])} | "
                     f"{fmt(r['idle_us'])} | {r['us'] / dense[r['shape']]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="o,qkv,down,gate_up")
    p.add_argument("--shape", default=None, metavar="KxN", help="one custom shape instead")
    p.add_argument("--interpret", action="store_true", help="CPU check: interpret mode")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    if a.shape:
        try:
            K, N = (int(v) for v in a.shape.lower().split("x"))
        except ValueError:
            p.error(f"--shape must be KxN, got {a.shape!r}")
        if K % 128 or K <= 0 or N <= 0:
            p.error(f"--shape {a.shape}: K must be a positive multiple of 128, N positive")
        shapes = {f"custom {K}x{N}": (K, N)}
    else:
        wanted = a.shapes.split(",")
        shapes = {n: kn for n, kn in SHAPES.items() if n.split()[0] in wanted}
        unknown = set(wanted) - {n.split()[0] for n in SHAPES}
        if unknown:
            p.error(f"--shapes: unknown {sorted(unknown)}; known {[n.split()[0] for n in SHAPES]}")
    if not a.interpret and jax.devices()[0].platform != "gpu":
        sys.exit("this profile needs a GPU (or --interpret for a CPU check)")
    os.makedirs(a.out, exist_ok=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=B.source_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    rows = []
    for name, (K, N) in shapes.items():
        rows += profile_shape(name, K, N, a.interpret)
        with open(os.path.join(a.out, "profile_bsr_call.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(a.out, "profile_bsr_call.md"), "w") as f:
            f.write(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
