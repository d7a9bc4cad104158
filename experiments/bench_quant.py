"""Quantized matmul kernels and quantized serving on one NVIDIA GPU.

Part ``kernels``, in one process: the copy-bandwidth ceiling (best of several copy methods);
then for the Llama-3-8B linear shapes (fused q/k/v 4096×6144, o 4096×4096, fused gate/up
4096×28672, down 14336×4096) at M = 1, 16, 64, 256 and 2048 rows:

* ``bf16``: the plain bfloat16 product (XLA, cuBLAS);
* ``xla-dequant``: XLA's own path for packed weights, ``x @ dequantize(ql)`` in one jit
  (unpack, scale and multiply fused or not as XLA decides);
* ``dequant-once``: the float weight dequantized once (as an engine could per prefill step)
  plus the bfloat16 product: the two timed separately and added;
* ``dequant-kernel`` (64 rows and more): ``pallas_kernels.dequant`` writes the float weight
  (each word read once), then the bfloat16 product, in one jit (``quant.matmul(...,
  "dequantize_kernel")``, what ``quant.matmul`` runs above ``KERNEL_MAX_ROWS`` rows);
* ``ours``: ``pallas_kernels.quant_matmul`` at 4 and 8 bits, groups of 128 and per channel.

Each row: µs per product, GB/s of the bytes it must read (packed codes, scales, zeros, x) and
write (y), % of the copy ceiling, speed-up over ``bf16``, and the relative error against
``x @ dequantize(ql)`` in float32. Timing: one jitted program calls the product on several
independent (x, weight) pairs whose weights add up to 256 MiB (``timeit_rotating``: no L2 reuse
between calls, as between a model's layers; Python's dispatch amortised), median of 5 batches.
The tiles are those of ``QuantMatmulConfig.for_shape``; ``tune_quant.py`` is the search behind
them.

Part ``engine`` (one subprocess per run, as ``optgqa bench``): the Llama-3-8B shape with random
weights in bfloat16, W4 g128 (linear layers; and with the LM head and token table too,
``w4g128+head+emb``) and W8 (per channel): batch-1 decode (one request, 256 prompt +
256 generated tokens; tokens/s = 1 / mean time per output token) and the 1000-request 256/256
throughput with the settings of ``bench_engine.py`` (256 sequences, KV pool capped at 48 GiB,
fused projections); peak memory and parameter bytes of each. The engine runs go first, before
this process allocates any device memory of its own.

Usage::

    python experiments/bench_quant.py [--only kernels|engine] [--quick] [--rows 1,16,64]
        [--formats w4g128,w4,w8g128,w8]
        [--engine-formats bf16,w4g128,w4g128+head+emb,w8] [--engine-workloads batch1,throughput]
        [--out experiments/results/quant]

Writes ``bench_quant.{json,md}`` and ``bench_quant.png`` (kernel speed-up over bfloat16 against
M) under ``--out``; the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import quant  # noqa: E402
from optgqa_jax.engine.runner import parse_xla_options  # noqa: E402
from pallas_kernels import compiler_options  # noqa: E402
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul  # noqa: E402

SHAPES = {"qkv 4096x6144": (4096, 6144), "o 4096x4096": (4096, 4096),
          "gate_up 4096x28672": (4096, 28672), "down 14336x4096": (14336, 4096)}
ROWS = (1, 16, 64, 256, 2048)
FORMATS = ("w4g128", "w4", "w8g128", "w8")
# Engine runs: bfloat16, then quantized linears; "+head+emb" also the LM head and token table.
ENGINE_FORMATS = (None, "w4g128", "w4g128+head+emb", "w8")


def io_bytes(M: int, K: int, N: int, ql=None) -> int:
    """Bytes a product must move: x [M, K] and y [M, N] in bfloat16, plus the weight (packed
    codes, scales, zeros; g_idx is not read by the contiguous-group kernel)."""
    w = 2 * K * N if ql is None else ql.nbytes - ql.g_idx.size * 4
    return 2 * M * K + 2 * M * N + w


L2_ROTATION_BYTES = 256 << 20   # rotate over weight copies adding up to >= 4x the L2 cache
# ... and over at least this many: one program must run long enough to hide its own dispatch
# (experiments/timing_gaps.py, H200: the bfloat16 gate/up product timed at 94 µs with 2 copies
# and 3 programs per batch, 57.5 µs with 16 copies and 20, against 55.9 µs in a device trace)
MIN_COPIES = 8


def arg_sets(key, M, K, N, make_weight):
    """Independent (x, weight) pairs whose weights add up to L2_ROTATION_BYTES (at least
    MIN_COPIES pairs)."""
    x0, w0 = jax.random.normal(key, (M, K)).astype(jnp.bfloat16), make_weight(key)
    nbytes = sum(l.nbytes for l in jax.tree_util.tree_leaves(w0))
    sets = [(x0, w0)]
    for i in range(1, max(MIN_COPIES, -(-L2_ROTATION_BYTES // nbytes))):
        k = jax.random.fold_in(key, i)
        sets.append((jax.random.normal(k, (M, K)).astype(jnp.bfloat16), make_weight(k)))
    return sets


def kernel_rows(ceiling: float, rows, out: list, save, formats=FORMATS) -> None:
    opts = compiler_options()
    T = lambda fn, sets: B.timeit_rotating(fn, sets, compiler_options=opts)
    for (name, (K, N)), M in itertools.product(SHAPES.items(), rows):
        key = jax.random.PRNGKey(M * 7 + K)
        bf_sets = arg_sets(key, M, K, N, lambda k: (0.02 * jax.random.normal(
            jax.random.fold_in(k, 1), (K, N))).astype(jnp.bfloat16))
        bf16 = lambda x, w: x @ w
        t_bf16 = T(bf16, bf_sets)
        x = bf_sets[0][0]
        base = dict(shape=name, M=M, K=K, N=N, copies_bf16=len(bf_sets))
        del bf_sets

        def add(impl, fmt, t, nbytes, err=None, **extra):
            row = dict(base, impl=impl, format=fmt, us=t * 1e6, gb_per_s=nbytes / t / 1e9,
                       pct_ceiling=100 * nbytes / t / ceiling, speedup_vs_bf16=t_bf16 / t,
                       rel_error=err, **extra)
            out.append(row)
            print(f"{name} M={M} {impl} {fmt}: {row['us']:.1f} us, {row['gb_per_s']:.0f} GB/s "
                  f"({row['pct_ceiling']:.0f}%), {row['speedup_vs_bf16']:.2f}x bf16"
                  + ("" if err is None else f", rel err {err:.1e}"), flush=True)

        add("bf16", "bf16", t_bf16, io_bytes(M, K, N))
        for fmt in formats:
            qc = quant.parse_spec(fmt)
            sets = arg_sets(key, M, K, N, lambda k: quant.synthetic.random_quantized_linear(
                jax.random.fold_in(k, 2), K, N, qc, "bfloat16"))
            x, ql = sets[0]
            want = jax.jit(lambda x, ql: jnp.dot(x.astype(jnp.float32),
                                                 quant.dequantize(ql, jnp.float32)))(x, ql)
            scale = float(jnp.abs(want).max())

            def err(y):
                y = np.asarray(y, np.float32)
                if not np.isfinite(y).all():
                    return float("inf")
                return float(np.abs(y - np.asarray(want)).max() / scale)

            nbytes = io_bytes(M, K, N, ql)
            xla = lambda x, ql: quant.matmul(x, ql, "dequantize")
            add("xla-dequant", fmt, T(xla, sets), nbytes, err(jax.jit(xla)(x, ql)),
                copies=len(sets))
            if M >= 256:
                t_deq = T(lambda x, ql: quant.dequantize(ql, jnp.bfloat16), sets)
                add("dequant-once", fmt, t_deq + t_bf16, nbytes, None,
                    dequantize_us=t_deq * 1e6, copies=len(sets))
            if M >= 64:   # the streaming dequantize kernel, then the bfloat16 product
                dqk = lambda x, ql: quant.matmul(x, ql, "dequantize_kernel")  # noqa: E731
                add("dequant-kernel", fmt, T(dqk, sets), nbytes, err(jax.jit(dqk)(x, ql)),
                    copies=len(sets))
            ours = lambda x, ql: quant.matmul(x, ql, "pallas")
            # the tiles quant_matmul takes on this device: a tuning-table entry or the rules
            cfg = QuantMatmulConfig.for_shape("cuda", M, K, N, ql.group_size, bits=ql.bits,
                                              device=jax.devices()[0].device_kind)
            tuned = cfg != QuantMatmulConfig.for_shape("cuda", M, K, N, ql.group_size)
            try:
                add("ours", fmt, T(ours, sets), nbytes, err(jax.jit(ours)(x, ql)),
                    copies=len(sets), config=dataclasses.asdict(cfg), tuned=tuned)
            except Exception as e:  # a failing config is a result, not the end of the run
                out.append(dict(base, impl="ours", format=fmt, error=repr(e)[-400:]))
                print(f"{name} M={M} ours {fmt}: FAILED {e!r}"[:300], flush=True)
            del sets
            save()


ENGINE_WORKLOADS = ("batch1", "throughput")


STACK_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def engine_runs(out: list, save, requests: int, formats=ENGINE_FORMATS,
                workloads=ENGINE_WORKLOADS, xla_options=None, stack=(False,)) -> None:
    """The engine on the Llama-3-8B shape per format and workload, each in its own process;
    ``xla_options`` replace the engine's XLA compiler options (None keeps its defaults);
    ``stack``: the ``EngineConfig.stack_layers`` settings to run each format with, in order
    (a stacked run's format reads ``"<format> stacked"``)."""
    common = dict(model="llama3-8b", max_num_seqs=256, kv_memory_bytes=48 * 2 ** 30,
                  fuse_projections=True, xla_compiler_options=xla_options)
    for spec in formats:
        for name, kind, extra in (
                # one 256-token prompt: one prefill bucket of its size, one decode bucket
                ("batch1", "batch-1 decode", dict(num_requests=1, max_num_seqs=1,
                                                  seq_buckets=(1,), max_num_batched_tokens=256,
                                                  token_buckets=(256,))),
                ("throughput", f"{requests} x 256/256", dict(num_requests=requests))):
            if name not in workloads:
                continue
            for stacked in stack:
                bc = B.BenchConfig(**{**common, **extra}, quantize=spec, stack_layers=stacked)
                fmt = (spec or "bf16") + (" stacked" if stacked else "")
                print(f"engine {fmt} {kind} ...", flush=True)
                r = B.run_in_subprocess("engine", bc)
                r.update(workload=kind, format=fmt)
                if "tpot_s" in r and r["tpot_s"]:
                    r["decode_tokens_per_s_per_sequence"] = 1.0 / r["tpot_s"]["mean"]
                out.append(r)
                save()


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# Quantized matmul and serving", "",
             f"Device {m['device']}, jax {m['jax']}, commit {m['commit']}."
             + (f" Copy ceiling {m['ceiling'] / 1e9:,.0f} GB/s (best of "
                f"{', '.join(m['ceilings'])})." if "ceiling" in m else "")
             + (f" Engine XLA options: {m['xla_options']}." if m.get("xla_options") else ""),
             ""]
    rows = [r for r in res["kernels"] if "us" in r]
    if rows:
        lines += ["## Kernels (µs; GB/s of bytes moved, % of the copy ceiling; × bfloat16)", "",
                  "`ours (tuned)`: tiles from a tuning-table entry for this device "
                  "(`pallas_kernels.tuning`); `ours`: the rules of `QuantMatmulConfig.for_shape`.",
                  "",
                  "| shape | M | impl | format | µs | GB/s | % ceiling | × bf16 | rel err |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            err = "" if r.get("rel_error") is None else f"{r['rel_error']:.1e}"
            impl = r["impl"] + (" (tuned)" if r.get("tuned") else "")
            lines.append(f"| {r['shape']} | {r['M']} | {impl} | {r['format']} | "
                         f"{r['us']:.1f} | {r['gb_per_s']:,.0f} | {r['pct_ceiling']:.0f}% | "
                         f"{r['speedup_vs_bf16']:.2f} | {err} |")
        failed = [r for r in res["kernels"] if "error" in r]
        if failed:
            lines += ["", f"{len(failed)} kernel rows failed: "
                      + "; ".join(f"{r['shape']} M={r['M']} {r['format']}: {r['error'][:120]}"
                                  for r in failed)]
        lines.append("")
    if res["engine"]:
        lines += ["## Engine, Llama-3-8B shape (random weights)", "",
                  "`stacked`: `EngineConfig.stack_layers` (quantized layers and norm scales "
                  "stacked across layers); weight buffers: the step's argument buffers for "
                  "the weights.", "",
                  "| format | workload | output tok/s | tok/s per sequence (1 / TPOT) | "
                  "param GiB | % of bf16 params | peak GiB | weight buffers |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        bf16 = next((r["param_bytes"] for r in res["engine"]
                     if r.get("format") == "bf16" and "param_bytes" in r), None)
        for r in res["engine"]:
            if "error" in r:
                lines.append(f"| {r['format']} | {r['workload']} | fails: "
                             f"{r['error'][-120:]!r} | | | | | |")
                continue
            share = "" if bf16 is None else f"{100 * r['param_bytes'] / bf16:.1f}%"
            per_seq = r.get("decode_tokens_per_s_per_sequence")
            lines.append(f"| {r['format']} | {r['workload']} | {r['output_tokens_per_s']:,.0f} | "
                         f"{'' if per_seq is None else f'{per_seq:,.1f}'} | "
                         f"{r['param_bytes'] / 2 ** 30:.2f} | {share} | "
                         f"{r['peak_memory_bytes'] / 2 ** 30:.1f} | "
                         f"{r.get('param_buffers', '')} |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["kernels"] if "us" in r
            and r["impl"] in ("ours", "xla-dequant", "dequant-kernel")]
    if not rows:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for impl, fmt in dict.fromkeys((r["impl"], r["format"]) for r in rows
                                       if r["shape"] == shape):
            rs = sorted((r for r in rows if r["shape"] == shape and r["impl"] == impl
                         and r["format"] == fmt), key=lambda r: r["M"])
            ax.plot([r["M"] for r in rs], [r["speedup_vs_bf16"] for r in rs],
                    "o-" if impl == "ours" else "x--", label=f"{impl} {fmt}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", title=shape, xlabel="M (rows)", ylabel="speed-up over bfloat16")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("kernels", "engine"), default=None)
    p.add_argument("--quick", action="store_true", help="M = 1, 16 and 2048 only")
    p.add_argument("--rows", default=None, help="kernels: comma-separated row counts M "
                   f"(default {','.join(map(str, ROWS))})")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help="kernels: comma-separated weight formats")
    p.add_argument("--engine-requests", type=int, default=1000)
    p.add_argument("--engine-formats", default=",".join(f or "bf16" for f in ENGINE_FORMATS),
                   help="engine: comma-separated formats (bf16 is the unquantized model)")
    p.add_argument("--engine-workloads", default=",".join(ENGINE_WORKLOADS),
                   help=f"engine: comma-separated subset of {','.join(ENGINE_WORKLOADS)}")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="engine: repeatable; an XLA compiler option of the engine's steps, "
                        "replacing the engine's defaults (e.g. command buffers)")
    p.add_argument("--stack-layers", choices=tuple(STACK_MODES), default="off",
                   help="engine: run each format with EngineConfig.stack_layers off, on, or "
                        "both (off first; default: off)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quant"))
    a = p.parse_args(argv)
    try:
        xla_options = parse_xla_options(a.xla_option) or None
    except ValueError as e:
        p.error(f"--xla-option: {e}")
    kformats = [f for f in a.formats.split(",") if f]
    for f in kformats:
        quant.parse_spec(f)
    rows = ((1, 16, 2048) if a.quick else ROWS) if a.rows is None else tuple(
        int(m) for m in a.rows.split(","))
    formats = [None if f == "bf16" else f for f in a.engine_formats.split(",") if f]
    workloads = [w for w in a.engine_workloads.split(",") if w]
    for f in formats:
        if f is not None:
            quant.parse_spec(f.split("+")[0])   # a bad format fails here, before any run
    if not set(workloads) <= set(ENGINE_WORKLOADS):
        p.error(f"--engine-workloads {a.engine_workloads!r}: expected a subset of "
                f"{','.join(ENGINE_WORKLOADS)}")
    os.makedirs(a.out, exist_ok=True)
    res = {"meta": dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                        commit=B.source_commit(), xla_options=xla_options),
           "kernels": [], "engine": []}

    def save():
        with open(os.path.join(a.out, "bench_quant.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, "bench_quant.md"), "w") as f:
            f.write(markdown(res))
        plot(res, os.path.join(a.out, "bench_quant.png"))

    # The engine's subprocesses run first, while this process holds no device memory: with
    # XLA_PYTHON_CLIENT_MEM_FRACTION set, its first allocation (the copy ceiling) would
    # reserve that fraction of the GPU and leave the engines too little.
    if a.only in (None, "engine"):
        engine_runs(res["engine"], save, a.engine_requests, formats, workloads, xla_options,
                    STACK_MODES[a.stack_layers])
    ceilings = B.copy_bandwidths()
    res["meta"].update(ceiling=max(ceilings.values()), ceilings=sorted(ceilings),
                       ceiling_methods=ceilings)
    if a.only in (None, "kernels"):
        kernel_rows(res["meta"]["ceiling"], rows, res["kernels"], save, kformats)
    save()
    print(markdown(res))


if __name__ == "__main__":
    main()
