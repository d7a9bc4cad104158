"""The weights-left W4 kernel (``pallas_kernels.quant_matmul_wl``) against the bfloat16
product and the route ``optgqa_jax.quant.matmul`` takes today, timed (one NVIDIA GPU).

For each Llama-3-8B linear shape and row count: the bfloat16 product, ``quant.matmul`` (its
tuning table's tiles, or the dequantize route above 16 rows where the table says so) and a
small grid of the new kernel's tiles (block_n, block_m, split_k, warps, stages), each timed
with ``timeit_rotating`` over weight copies that overflow the L2 cache; the fastest tiles
are checked on the device against a float32 reference (relative error, NaN). Reported: µs,
the ratio to bfloat16, and the share of the copy bandwidth measured in the same run at which
the kernel reads its bytes.

Usage::

    python experiments/quant_wl_probe.py [--rows 1,16,64,256] [--shapes gate_up,down,qkv,o]
        [--budget-s 420] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import quant  # noqa: E402
from optgqa_jax import timing as B  # noqa: E402
from pallas_kernels import compiler_options  # noqa: E402
from pallas_kernels.quant_matmul_wl import (WeightsLeftConfig, quant_matmul_wl,  # noqa: E402
                                            quant_matmul_wl_reference, transpose_words)
from bench_quant import arg_sets, io_bytes  # noqa: E402

SHAPES = {"gate_up": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144),
          "o": (4096, 4096)}


def candidates(M: int, K: int, N: int, quick: bool = False) -> list[WeightsLeftConfig]:
    """The tiles tried at M rows: enough programs to fill ~132 SMs about twice. ``quick``:
    the rules' tiles (``WeightsLeftConfig.for_shape``) with and without ``pairs``, 64- and
    256-wide N tiles."""
    if quick:
        base = WeightsLeftConfig.for_shape("cuda", M, K, N)
        return [base, dataclasses.replace(base, pairs=False),
                dataclasses.replace(base, block_n=64, num_warps=4),
                dataclasses.replace(base, block_n=256, num_warps=8)]
    Mp = max(16, 1 << (M - 1).bit_length())
    out = []
    for (bn, warps), stages in itertools.product(((64, 4), (128, 4), (128, 8), (256, 8)), (2, 3)):
        for bm in ([Mp] if Mp <= 64 else [128, 256]):
            if bn * bm // (32 * warps) > 128:       # float32 accumulator registers per thread
                continue
            progs = -(-N // bn) * (Mp // bm)
            split = 1
            while progs * split < 264 and split < 16 and (K // 128) % (split * 2) == 0:
                split *= 2
            for pairs in ((True, False) if (bn, warps) == (128, 4) else (True,)):
                out.append(WeightsLeftConfig(block_n=bn, block_m=bm, split_k=split,
                                             num_warps=warps, num_stages=stages, pairs=pairs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="16,1,64,256")
    ap.add_argument("--shapes", default="gate_up,down,qkv,o")
    ap.add_argument("--format", default="w4g128")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--quick", action="store_true", help="four tiles per case (candidates)")
    ap.add_argument("--out", default="experiments/results/latest/quant_wl")
    a = ap.parse_args()
    if jax.devices()[0].platform != "gpu":
        raise SystemExit(f"this probe needs a GPU; jax sees {jax.devices()[0].platform}")
    os.makedirs(a.out, exist_ok=True)
    t_end = time.time() + a.budget_s
    qc = quant.parse_spec(a.format)
    ceiling = max(B.copy_bandwidths().values())
    opts = compiler_options()
    T = lambda fn, sets: B.timeit_rotating(fn, sets, compiler_options=opts)  # noqa: E731
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=B.source_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                copy_gbps=ceiling / 1e9, format=a.format)
    rows = []
    for name, M in itertools.product(a.shapes.split(","), [int(r) for r in a.rows.split(",")]):
        if time.time() > t_end:
            print("budget spent; stopping", flush=True)
            break
        K, N = SHAPES[name]
        key = jax.random.PRNGKey(M * 7 + K)
        bf = arg_sets(key, M, K, N, lambda k: (0.02 * jax.random.normal(
            jax.random.fold_in(k, 1), (K, N))).astype(jnp.bfloat16))
        t_bf = T(lambda x, w: x @ w, bf)
        del bf
        qs = arg_sets(key, M, K, N, lambda k: quant.synthetic.random_quantized_linear(
            jax.random.fold_in(k, 2), K, N, qc, "bfloat16"))
        nbytes = io_bytes(M, K, N, qs[0][1])
        t_cur = T(lambda x, ql: quant.matmul(x, ql), qs)
        wl = [(x, (transpose_words(ql.qweight), ql.scales, ql.zeros)) for x, ql in qs]
        best = None
        for cfg in candidates(M, K, N, a.quick):
            if time.time() > t_end:
                break
            try:
                t = T(lambda x, w, c=cfg: quant_matmul_wl(
                    x, *w, bits=qc.bits, group_size=qc.group_size, config=c), wl)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile: skip it)
                print(f"  {name} M={M} {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is None:
            continue
        x, w = wl[0]
        y = quant_matmul_wl(x, *w, bits=qc.bits, group_size=qc.group_size, config=best[1])
        r = quant_matmul_wl_reference(x.astype(jnp.float32).astype(x.dtype), *w, bits=qc.bits,
                                      group_size=qc.group_size).astype(jnp.float32)
        yf = np.asarray(y, np.float32)
        err = float(np.abs(yf - np.asarray(r)).max() / max(np.abs(np.asarray(r)).max(), 1e-30))
        row = dict(shape=name, M=M, K=K, N=N, bf16_us=t_bf * 1e6, current_us=t_cur * 1e6,
                   wl_us=best[0] * 1e6, wl_vs_bf16=t_bf / best[0], current_vs_bf16=t_bf / t_cur,
                   wl_copy_pct=100 * nbytes / best[0] / ceiling, rel_err=err,
                   nan=bool(np.isnan(yf).any()), config=best[1].__dict__)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del qs, wl
    with open(os.path.join(a.out, "quant_wl_probe.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = ["# Weights-left W4 kernel against bfloat16 and `quant.matmul`", "",
          f"{meta['device']}, jax {meta['jax']}, commit {meta['commit']}, {meta['date']}; "
          f"{a.format}; copy ceiling {meta['copy_gbps']:.0f} GB/s; µs per call "
          "(`timeit_rotating`, weights rotating past the L2 cache).", "",
          "| shape | M | bf16 µs | quant.matmul µs (× bf16) | weights-left µs (× bf16) "
          "| % of copy | rel. err | tiles (bn, bm, split, warps, stages, pairs) |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        c = r["config"]
        md.append(f"| {r['shape']} | {r['M']} | {r['bf16_us']:.1f} | {r['current_us']:.1f} "
                  f"({r['current_vs_bf16']:.2f}×) | {r['wl_us']:.1f} ({r['wl_vs_bf16']:.2f}×) | "
                  f"{r['wl_copy_pct']:.0f}% | {r['rel_err']:.1e}{' NaN' if r['nan'] else ''} | "
                  f"{c['block_n']}, {c['block_m']}, {c['split_k']}, {c['num_warps']}, "
                  f"{c['num_stages']}, {c['pairs']} |")
    with open(os.path.join(a.out, "quant_wl_probe.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
