"""GQSA evaluation: group-sparse 4-bit weights (BSR) against dense quantization, on one GPU.

Part ``speed``: per-layer decode time on the Llama-3-8B linear shapes (fused q/k/v
4096×6144, o 4096×4096, fused gate/up 4096×28672, down 14336×4096), random weights, at
M = 1 and 16 rows of x:

* ``bf16``: the bfloat16 product (XLA/cuBLAS);
* ``w4g128`` and ``w2g128``: dense GPTQ-layout weights, ``pallas_kernels.quant_matmul``;
* ``w4g128s30`` / ``w4g128s50``: 30% / 50% of the groups of every row removed, the rest in
  BSR form, ``pallas_kernels.bsr_quant_matmul`` (default tiles, and the best of a small
  search over blocks per program and warps).

Each row: µs per product, bytes stored, GB/s of the bytes read, % of the copy ceiling,
speed-up over bf16 and time relative to dense W4 (the issue's target: W4S50 at most 0.65×),
and the relative error against the float32 product with the dequantized weight. Timing as in
``bench_quant.py`` (``timeit_rotating``: weights rotated past the L2 cache).

Usage::

    python experiments/gqsa_eval.py --part speed [--rows 1,16] [--out DIR]

Writes ``gqsa_speed.{json,md}`` under ``--out`` (rewritten after every row).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import quant, sparse  # noqa: E402
from pallas_kernels import compiler_options  # noqa: E402
from pallas_kernels.bsr_quant_matmul import BSRMatmulConfig, bsr_quant_matmul  # noqa: E402
from bench_quant import arg_sets  # noqa: E402  (the same L2 rotation)

SHAPES = {"gate_up 4096x28672": (4096, 28672), "down 14336x4096": (14336, 4096),
          "qkv 4096x6144": (4096, 6144), "o 4096x4096": (4096, 4096)}


def random_bsr(key, K: int, N: int, bits: int, gs: int, sparsity: float):
    """A random BSR layer with ``round(sparsity * G)`` groups removed from every row."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
    G, W = K // gs, gs * bits // 32
    kept = G - int(round(sparsity * G))
    cols = np.sort(np.argsort(rng.random((N, G)), axis=1)[:, :kept], axis=1)   # [N, kept]
    nnz = N * kept
    codes = rng.integers(-2 ** 31, 2 ** 31, (nnz, W), dtype=np.int64).astype(np.int32)
    return sparse.from_arrays(
        codes, (rng.uniform(0.5, 1.5, nnz) * 0.01).astype(np.float16),
        rng.integers(0, 2 ** bits, nnz).astype(np.uint8), cols.reshape(-1).astype(np.int32),
        np.arange(N + 1, dtype=np.int32) * kept, in_features=K, bits=bits, group_size=gs,
        dtype="bfloat16")



def speed_rows(ceiling: float, rows, out: list, save) -> None:
    opts = compiler_options()
    T = lambda fn, sets: B.timeit_rotating(fn, sets, compiler_options=opts)
    for (name, (K, N)), M in ((s, m) for s in SHAPES.items() for m in rows):
        key = jax.random.PRNGKey(M * 7 + K + N)
        base = dict(shape=name, M=M, K=K, N=N)
        dense_w4 = None

        def add(fmt, t, wbytes, err, **extra):
            nonlocal dense_w4
            nbytes = wbytes + 2 * M * (K + N)
            row = dict(base, format=fmt, us=t * 1e6, weight_bytes=wbytes,
                       gb_per_s=nbytes / t / 1e9, pct_ceiling=100 * nbytes / t / ceiling,
                       speedup_vs_bf16=t_bf16 / t, rel_error=err, **extra)
            if fmt == "w4g128":
                dense_w4 = t
            row["time_vs_dense_w4"] = None if dense_w4 is None else t / dense_w4
            out.append(row)
            print(f"{name} M={M} {fmt}: {row['us']:.1f} us ({row['pct_ceiling']:.0f}% of copy, "
                  f"{row['speedup_vs_bf16']:.2f}x bf16"
                  + ("" if row["time_vs_dense_w4"] is None
                     else f", {row['time_vs_dense_w4']:.2f}x dense w4 time")
                  + ("" if err is None else f", rel err {err:.1e}") + ")", flush=True)
            save()

        def rel_err(y, want):
            y = np.asarray(y, np.float32)
            if not np.isfinite(y).all():
                return float("inf")
            return float(np.abs(y - want).max() / np.abs(want).max())

        sets = arg_sets(key, M, K, N, lambda k: (0.02 * jax.random.normal(
            jax.random.fold_in(k, 1), (K, N))).astype(jnp.bfloat16))
        t_bf16 = T(lambda x, w: x @ w, sets)
        del sets
        add("bf16", t_bf16, 2 * K * N, None)
        for fmt in ("w4g128", "w2g128"):
            qc = quant.parse_spec(fmt)
            sets = arg_sets(key, M, K, N, lambda k: quant.synthetic.random_quantized_linear(
                jax.random.fold_in(k, 2), K, N, qc, "bfloat16"))
            x, ql = sets[0]
            want = np.asarray(jnp.dot(x.astype(jnp.float32), quant.dequantize(ql, jnp.float32)))
            f = lambda x, ql: quant.matmul(x, ql, "pallas")
            add(fmt, T(f, sets), ql.nbytes - ql.g_idx.size * 4, rel_err(jax.jit(f)(x, ql), want))
            del sets
        for s in (0.3, 0.5):
            sets = arg_sets(key, M, K, N, lambda k: random_bsr(k, K, N, 4, 128, s))
            x, b = sets[0]
            want = np.asarray(jnp.dot(x.astype(jnp.float32), sparse.dequantize_bsr(b, jnp.float32)))
            best = None
            default = BSRMatmulConfig.for_shape("cuda", M, b.nnz)
            tried = []
            for cfg in [default] + [BSRMatmulConfig(block_t=bt, block_m=default.block_m,
                                                    num_warps=nw, num_stages=ns)
                                    for bt in (32, 64, 128) for nw in (4, 8)
                                    for ns in (2,)]:
                f = lambda x, b, cfg=cfg: bsr_quant_matmul(
                    x, b.codes, b.scales, b.zeros, b.col_idx, b.row_ids, out_features=N,
                    bits=4, group_size=128, config=cfg)
                try:
                    t = T(f, sets)
                except Exception as e:  # noqa: BLE001 - a failing config is a result
                    tried.append(dict(config=dataclasses.asdict(cfg), error=repr(e)[-200:]))
                    continue
                tried.append(dict(config=dataclasses.asdict(cfg), us=t * 1e6))
                if best is None or t < best[0]:
                    best = (t, cfg, f)
                if len(tried) == 1:
                    t_default = t
            t, cfg, f = best
            add(f"w4g128s{round(100 * s)}", t, b.nbytes, rel_err(jax.jit(f)(x, b), want),
                config=dataclasses.asdict(cfg), default_us=t_default * 1e6, tried=tried,
                density=b.density)
            del sets


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# GQSA: group-sparse W4 (BSR) against dense quantization", "",
             f"Device {m['device']}, jax {m['jax']}, commit {m['commit']}. Copy ceiling "
             f"{m['ceiling'] / 1e9:,.0f} GB/s. µs per product with weights rotated past the L2 "
             "cache; sNN = NN% of each row's groups removed, kept groups in BSR form; "
             "× dense W4 = time relative to dense W4 g128 (target for s50: ≤ 0.65).", "",
             "| shape | M | format | weight MiB | µs | % ceiling | × bf16 speed | × dense W4 "
             "time | rel err |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["speed"]:
        v = r["time_vs_dense_w4"]
        lines.append(f"| {r['shape']} | {r['M']} | {r['format']} | "
                     f"{r['weight_bytes'] / 2 ** 20:.1f} | {r['us']:.1f} | "
                     f"{r['pct_ceiling']:.0f}% | {r['speedup_vs_bf16']:.2f} | "
                     f"{'' if v is None else format(v, '.2f')} | "
                     f"{'' if r['rel_error'] is None else format(r['rel_error'], '.1e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("speed",), default="speed")
    p.add_argument("--rows", default="1,16", help="comma-separated row counts M")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gqsa"))
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    res = dict(meta=dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                         commit=B.source_commit(), ceiling=B.copy_bandwidth()), speed=[])

    def save():
        with open(os.path.join(a.out, "gqsa_speed.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, "gqsa_speed.md"), "w") as f:
            f.write(markdown(res))

    speed_rows(res["meta"]["ceiling"], [int(r) for r in a.rows.split(",")], res["speed"], save)
    print(f"wrote {a.out}/gqsa_speed.{{json,md}}")


if __name__ == "__main__":
    main()
