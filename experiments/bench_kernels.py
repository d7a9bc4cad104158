"""Benchmark the Pallas attention kernels against their peers, on an NVIDIA GPU.

Measured in one run:

(a) the ceiling: device-to-device copy bandwidth (bytes read + written per second);
(b) paged decode — ours vs JAX's Pallas ``paged_attention`` (float16: its
    bfloat16 path fails in jax 0.11) and an XLA gather + einsum reference — as
    GB/s of K/V read and % of the copy bandwidth;
(c) dense causal prefill — our ``flash_attention`` (jitted with XLA's default
    options, and with ``pallas_kernels.compiler_options()``) vs
    ``jax.nn.dot_product_attention`` (cuDNN and XLA) and JAX's Pallas ``mha``
    (K/V repeated to MHA for it) in TFLOP/s;

each with and without ALiBi where the peer supports it (ALiBi is passed to
cuDNN/XLA as a materialised bias). Every kernel output is checked against the
reference before it is timed.

Usage::

    python experiments/bench_kernels.py [--out experiments/results] [--quick] [--sweep]

Writes ``bench_kernels.json`` and ``bench_kernels.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax.benchmark import copy_bandwidths, source_commit as commit, timeit  # noqa: E402  (the ceiling: best method, best of 5)
from pallas_kernels import (FlashAttentionConfig, PagedAttentionConfig, alibi_slopes,  # noqa: E402
                            compiler_options, flash_attention, paged_attention,
                            paged_attention_reference)


def _log(row, t0) -> None:
    """Record the wall time a row took (compile, check and timing) and print the row, so a
    run cut by a time limit shows where the time went."""
    row["wall_s"] = time.perf_counter() - t0
    result = f"{row['ms']:.3f} ms" if "ms" in row else row.get("error", "")[:80]
    print(f"  {row['kernel']} {row['shape']} {row['impl']} alibi={row['alibi']} {row['note'][:30]}: "
          f"{result} ({row['wall_s']:.1f} s)", flush=True)


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# --------------------------------------------------------------------------- paged decode
@dataclasses.dataclass(frozen=True)
class DecodeShape:
    name: str
    batch: int
    context: int
    q_heads: int
    kv_heads: int
    head_dim: int = 128
    page: int = 16
    min_context: int = 0  # > 0: lengths drawn uniformly in [min_context, context] (engine-like)


ENGINE_SHAPE = DecodeShape("B=256 ctx=257-512 GQA 32/8 (engine decode)", 256, 512, 32, 8,
                           min_context=257)


def decode_shapes(quick: bool = False, sweep_engine: bool = False):
    """(the decode shapes of the kernel table, the engine's 32/8 shape among them): the
    headline B=64 ctx 4096 32/8 first; ``quick`` keeps it alone (with the engine's shape when
    ``sweep_engine``)."""
    shapes = [DecodeShape("B=64 ctx=4096 GQA 32/8", 64, 4096, 32, 8)]
    if sweep_engine or not quick:
        shapes.append(ENGINE_SHAPE)
    if not quick:
        shapes += [DecodeShape("B=8 ctx=16384 GQA 32/8", 8, 16384, 32, 8),
                   DecodeShape("B=64 ctx=4096 MHA 32/32", 64, 4096, 32, 32),
                   DecodeShape("B=64 ctx=4096 MQA 32/1", 64, 4096, 32, 1),
                   # a group that is not a power of two (7 query heads per KV head), at the
                   # headline and the engine's shape: compare with the 32/8 rows above
                   DecodeShape("B=64 ctx=4096 GQA 28/4", 64, 4096, 28, 4),
                   DecodeShape("B=256 ctx=257-512 GQA 28/4 (engine decode, group 7)", 256, 512,
                               28, 4, min_context=257),
                   # short contexts, where a fixed per-call cost (ALiBi's, a pad) weighs most
                   DecodeShape("B=32 ctx=2048 GQA 28/4 (short context)", 32, 2048, 28, 4)]
    return shapes, ENGINE_SHAPE


DECODE_SWEEP = [PagedAttentionConfig(keys_per_block=kpb, num_warps=w, num_stages=st, prefetch=pf)
                for pf in ("none", "tables", "tiles") for kpb in (32, 64, 128) for w in (4, 8)
                for st in (1, 2, 3)] + [
    PagedAttentionConfig(keys_per_block=64, prefetch=pf, target_programs=t)
    for pf in ("none", "tiles") for t in (1024, 2048)] + [
    PagedAttentionConfig(keys_per_block=kpb, replicate_queries=True) for kpb in (32, 64)]

FLASH_SWEEP = [
    # the q-blocks varying fastest in the launch order (one head's programs side by side)
    FlashAttentionConfig(block_q=256, block_k=64, num_warps=8, num_stages=3, heavy_first=True,
                         q_blocks_fastest=True),
    FlashAttentionConfig(block_q=128, block_k=128, num_warps=8, num_stages=3, heavy_first=True,
                         q_blocks_fastest=True)] + [
               FlashAttentionConfig(block_q=bq, block_k=bk, num_warps=w, num_stages=st,
                                    heavy_first=heavy, prefetch_scores=pf)
               for bq, bk, w, st, heavy, pf in [
                   # prefetch_scores: 8 warps and 128 queries, where Triton overlaps the
                   # score products with the exponentials (results/cpu/flash/)
                   (128, 64, 8, 3, True, True), (128, 128, 8, 2, True, True),
                   (128, 64, 8, 4, True, True), (128, 32, 8, 4, True, True),
                   (128, 64, 8, 2, True, True)] + [
                   c + (False,) for c in (
                   (128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 128, 8, 3, True),
                   (128, 128, 8, 4, False), (128, 128, 4, 3, False), (128, 64, 4, 3, False),
                   (128, 64, 4, 4, False), (128, 64, 8, 3, False), (128, 64, 8, 4, False),
                   (128, 32, 4, 4, False), (64, 64, 4, 3, False), (64, 128, 4, 3, False),
                   (256, 64, 8, 3, False), (256, 64, 8, 3, True), (256, 128, 8, 2, False),
                   (256, 32, 8, 4, False), (256, 64, 8, 2, False), (256, 64, 16, 3, False),
                   (256, 128, 16, 2, False), (128, 128, 16, 3, False), (128, 64, 8, 2, False))]]


def decode_inputs(s: DecodeShape, dtype, key):
    pages_per_seq = s.context // s.page
    num_pages = s.batch * pages_per_seq
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q = jax.random.normal(k1, (s.batch, s.q_heads, s.head_dim), dtype)
    kp = jax.random.normal(k2, (s.kv_heads, num_pages, s.page, s.head_dim), dtype)
    vp = jax.random.normal(k3, (s.kv_heads, num_pages, s.page, s.head_dim), dtype)
    tables = jax.random.permutation(k4, num_pages).reshape(s.batch, pages_per_seq).astype(jnp.int32)
    if s.min_context:
        lengths = jax.random.randint(jax.random.fold_in(key, 5), (s.batch,), s.min_context,
                                     s.context + 1, jnp.int32)
    else:
        lengths = jnp.full((s.batch,), s.context, jnp.int32)
    return q, kp, vp, tables, lengths


# ALiBi candidates, each timed with and without ALiBi on every decode shape: the padded
# 32-key tiles ALiBi used up to aee3517, the no-ALiBi default (32-key blocks, replicated
# queries), and three neighbours of it; then 64-key blocks with more programs (K split further),
# for groups that are not powers of two: 28/4 at the engine's shape runs half the programs of
# 32/8 and read K/V at 0.86x its rate (b4f2e9e).
ALIBI_SWEEP = [PagedAttentionConfig(keys_per_block=kpb, num_stages=st, prefetch=pf,
                                    replicate_queries=rq, target_programs=tp)
               for kpb, st, pf, rq, tp in ((32, 1, "none", False, 512), (32, 1, "none", True, 512),
                                           (32, 1, "tables", True, 512), (64, 1, "none", True, 512),
                                           (32, 2, "none", True, 512), (64, 1, "none", True, 2048),
                                           (64, 1, "none", True, 4096))]


# The engine's decode shape (256 short sequences): which knobs matter when programs are short?
ENGINE_SWEEP = [PagedAttentionConfig(keys_per_block=kpb, num_warps=w, num_stages=st, prefetch=pf,
                                     replicate_queries=rq)
                for kpb, w, st, pf in ((16, 4, 1, "none"), (32, 4, 1, "none"), (64, 4, 1, "none"),
                                       (128, 4, 1, "none"), (32, 2, 1, "none"), (64, 2, 1, "none"),
                                       (32, 4, 2, "none"), (64, 4, 2, "none"), (32, 4, 1, "tiles"),
                                       (64, 4, 1, "tiles"), (32, 4, 1, "tables"), (64, 8, 1, "none"))
                for rq in (False, True)]


def bench_decode(s: DecodeShape, ceiling: float, sweep: bool, sweep_alibi: bool = False,
                 sweep_configs=None, rows=None, on_row=None):
    """Time one decode shape; rows are appended to ``rows`` (returned) and ``on_row()`` is
    called after each, so a run cut by a time limit keeps what it measured."""
    rows = [] if rows is None else rows
    sweep_configs = sweep_configs or DECODE_SWEEP
    slopes = alibi_slopes(s.q_heads)

    def record(impl, dtype, alibi, fn, args, ref=None, note=""):
        row = dict(kernel="paged_decode", shape=s.name, impl=impl, dtype=jnp.dtype(dtype).name,
                   alibi=alibi, batch=s.batch, context=s.context, q_heads=s.q_heads,
                   kv_heads=s.kv_heads, head_dim=s.head_dim, page=s.page, note=note)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
            if ref is not None:
                row["rel_err"] = rel_err(out, ref)
            t = timeit(fn, *args)
            row.update(ms=t * 1e3, gbps=kv_bytes / t / 1e9, pct_ceiling=100 * kv_bytes / t / ceiling)
        except Exception as e:  # a failing peer is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        _log(row, t0)
        rows.append(row)
        if on_row is not None:
            on_row()
        return row

    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
    scale = 1.0 / math.sqrt(s.head_dim)
    jax_paged_fn = jax.jit(lambda q, k, v, t, l: jax_paged.paged_attention(q * scale, k, v, t, l))

    for dtype in (jnp.bfloat16, jnp.float16):
        args = decode_inputs(s, dtype, jax.random.PRNGKey(0))
        # K and V of every sequence's context, 2-byte dtypes
        kv_bytes = 2 * int(np.asarray(args[4]).sum()) * s.kv_heads * s.head_dim * 2
        for alibi in (False, True):
            sl = slopes if alibi else None
            ref_fn = jax.jit(lambda q, k, v, t, l, sl=sl: paged_attention_reference(
                q, k, v, t, l, alibi_slopes=sl))
            ref = ref_fn(*args)
            ours = jax.jit(lambda q, k, v, t, l, sl=sl: paged_attention(q, k, v, t, l, alibi_slopes=sl))
            record("optgqa", dtype, alibi, ours, args, ref)
            if sweep and not alibi and dtype == jnp.bfloat16:
                for cfg in sweep_configs:
                    fn = jax.jit(lambda q, k, v, t, l, cfg=cfg: paged_attention(
                        q, k, v, t, l, config=cfg))
                    record("optgqa-sweep", dtype, alibi, fn, args, ref,
                           note=f"kpb={cfg.keys_per_block} w={cfg.num_warps} st={cfg.num_stages} "
                                f"prefetch={cfg.prefetch} programs>={cfg.target_programs} "
                                f"replicate_queries={cfg.replicate_queries}")
            if sweep_alibi and dtype == jnp.bfloat16:  # each config with and without ALiBi
                for cfg in ALIBI_SWEEP:
                    fn = jax.jit(lambda q, k, v, t, l, cfg=cfg, sl=sl: paged_attention(
                        q, k, v, t, l, alibi_slopes=sl, config=cfg))
                    record("optgqa-sweep", dtype, alibi, fn, args, ref,
                           note=f"kpb={cfg.keys_per_block} w={cfg.num_warps} st={cfg.num_stages} "
                                f"prefetch={cfg.prefetch} "
                                f"replicate_queries={cfg.replicate_queries} alibi={alibi}"
                                + (f" programs>={cfg.target_programs}"
                                   if cfg.target_programs != 512 else ""))
            if not alibi:  # JAX's kernel has neither ALiBi nor a softmax scale: pre-scale q
                record("jax-pallas", dtype, alibi, jax_paged_fn, args, ref,
                       note="q pre-scaled by 1/sqrt(D)")
            if dtype == jnp.bfloat16:
                record("xla", dtype, alibi, ref_fn, args)
    return rows


# --------------------------------------------------------------------------- flash prefill
def alibi_bias(slopes, T, S):
    rel = jnp.arange(S)[None, :] - ((S - T) + jnp.arange(T))[:, None]
    return (slopes[:, None, None] * rel[None]).astype(jnp.bfloat16)[None]  # [1, N, T, S]


def flash_name(B, T, N, K, D) -> str:
    return f"B={B} T={T} N={N} K={K} D={D}"


def bench_flash(B, T, N, K, D, sweep: bool, rows=None, on_row=None):
    """Time one flash shape; ``rows`` and ``on_row`` as in :func:`bench_decode`."""
    rows = [] if rows is None else rows
    key = jax.random.PRNGKey(1)
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (B, T, N, D), jnp.bfloat16)
    k = jax.random.normal(k2, (B, T, K, D), jnp.bfloat16)
    v = jax.random.normal(k3, (B, T, K, D), jnp.bfloat16)
    flops = 4 * B * N * T * T * D / 2  # causal: half of QK^T and PV
    slopes = alibi_slopes(N)
    G = N // K
    kr, vr = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    name = flash_name(B, T, N, K, D)

    def record(impl, alibi, fn, args, ref=None, note=""):
        row = dict(kernel="flash_attention", shape=name, impl=impl, alibi=alibi, batch=B,
                   seq=T, q_heads=N, kv_heads=K, head_dim=D, dtype="bfloat16", note=note)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
            if ref is not None:
                row["rel_err"] = rel_err(out, ref)
            t = timeit(fn, *args, iters=10)
            row.update(ms=t * 1e3, tflops=flops / t / 1e12)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        _log(row, t0)
        rows.append(row)
        if on_row is not None:
            on_row()
        return row

    for alibi in (False, True):
        sl = slopes if alibi else None
        bias = alibi_bias(slopes, T, T) if alibi else None
        xla = jax.jit(lambda q, k, v, b=bias: jax.nn.dot_product_attention(
            q, k, v, bias=b, is_causal=True, implementation="xla"))
        ref = xla(q, k, v)
        ours = jax.jit(lambda q, k, v, sl=sl: flash_attention(q, k, v, causal=True, alibi_slopes=sl))
        record("optgqa", alibi, ours, (q, k, v), ref, note="XLA's default options")
        ours_ftz = jax.jit(lambda q, k, v, sl=sl: flash_attention(q, k, v, causal=True,
                                                                  alibi_slopes=sl),
                           compiler_options=compiler_options("cuda"))
        record("optgqa", alibi, ours_ftz, (q, k, v), ref,
               note="jit with pallas_kernels.compiler_options() (float32 denormals flushed)")
        lazy = dataclasses.replace(FlashAttentionConfig.for_backend("cuda", D, K),
                                   lazy_rescale=True)
        record("optgqa", alibi, jax.jit(lambda q, k, v, sl=sl: flash_attention(
            q, k, v, causal=True, alibi_slopes=sl, config=lazy),
            compiler_options=compiler_options("cuda")), (q, k, v), ref,
            note="lazy_rescale=True, jit with pallas_kernels.compiler_options()")
        if sweep and not alibi:
            for cfg in FLASH_SWEEP:  # each config jitted with XLA's defaults and with ours
                for options, label in (({}, ""), (compiler_options("cuda"), " +options")):
                    fn = jax.jit(lambda q, k, v, cfg=cfg: flash_attention(q, k, v, config=cfg),
                                 compiler_options=options)
                    record("optgqa-sweep", alibi, fn, (q, k, v), ref,
                           note=f"bq={cfg.block_q} bk={cfg.block_k} w={cfg.num_warps} "
                                f"st={cfg.num_stages}{' heavy' if cfg.heavy_first else ''}"
                                f"{' prefetch' if cfg.prefetch_scores else ''}"
                                f"{' qfast' if cfg.q_blocks_fastest else ''}{label}")
        record("cudnn", alibi, jax.jit(lambda q, k, v, b=bias: jax.nn.dot_product_attention(
            q, k, v, bias=b, is_causal=True, implementation="cudnn")), (q, k, v), ref)
        record("xla", alibi, xla, (q, k, v))
        if not alibi:
            from jax.experimental.pallas.ops.gpu import attention as jax_attention
            sm = 1.0 / math.sqrt(D)
            record("jax-pallas-mha", alibi, jax.jit(lambda q, k, v: jax_attention.mha(
                q, k, v, segment_ids=None, sm_scale=sm, causal=True)), (q, kr, vr), ref,
                note="K/V repeated to MHA")
    return rows


# --------------------------------------------------------------------------- report
def _err(row) -> str:
    """Relative error against the reference; the reference rows themselves say so."""
    return f"{row['rel_err']:.1e}" if "rel_err" in row else "(reference)"


def markdown(meta, rows) -> str:
    lines = ["# Kernel benchmark", "",
             f"- device: {meta['device']}", f"- jax: {meta['jax']}", f"- commit: {meta['commit']}",
             f"- copy bandwidth (ceiling, read + write; best of the methods): "
             f"{meta['copy_gbps']:.0f} GB/s",
             "- methods: " + ", ".join(f"{k} {v:.0f} GB/s"
                                       for k, v in meta.get("copy_methods_gbps", {}).items()), ""]
    has = {r["kernel"] for r in rows if r["impl"] != "optgqa-sweep"}
    if "paged_decode" in has:
        lines += ["## Paged decode (GB/s of K/V read)", "",
                  "| shape | impl | dtype | ALiBi | ms | GB/s | % of copy | rel. err | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kernel"] != "paged_decode" or r["impl"] == "optgqa-sweep":
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['dtype']} | {r['alibi']} | fails | | | | "
                         f"{r['error'][:90]} |")
        else:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['dtype']} | {r['alibi']} | {r['ms']:.3f} | "
                         f"{r['gbps']:.0f} | {r['pct_ceiling']:.0f}% | {_err(r)} "
                         f"| {r['note']} |")
    if "flash_attention" in has:  # a run cut short or `--only decode` has no flash rows
        lines += ["", "## Flash attention, causal prefill (TFLOP/s)", "",
                  "| shape | impl | ALiBi | ms | TFLOP/s | rel. err | note |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kernel"] != "flash_attention" or r["impl"] == "optgqa-sweep":
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['alibi']} | fails | | | {r['error'][:90]} |")
        else:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['alibi']} | {r['ms']:.3f} | "
                         f"{r['tflops']:.0f} | {_err(r)} | {r['note']} |")
    sweep = [r for r in rows if r["impl"] == "optgqa-sweep" and "error" not in r]
    if sweep:
        lines += ["", "## Tuning sweep (ours)", "", "| kernel | shape | config | ms | metric |",
                  "| --- | --- | --- | --- | --- |"]
        for r in sweep:
            metric = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r['tflops']:.0f} TFLOP/s"
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['note']} | {r['ms']:.3f} | {metric} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--quick", action="store_true", help="only the headline shapes")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep our tuning knobs (flash configs each jitted with XLA's "
                             "default options and with pallas_kernels.compiler_options())")
    parser.add_argument("--sweep-alibi", action="store_true",
                        help="time a few decode configs with and without ALiBi on every decode shape")
    parser.add_argument("--sweep-engine", action="store_true",
                        help="sweep decode configs on the engine's shape (B=256, contexts 257-512)")
    parser.add_argument("--only", choices=("decode", "flash"), help="run one kernel family only")
    parser.add_argument("--shape", default="", metavar="TEXT",
                        help="run only the shapes whose name contains TEXT (e.g. 'K=1 ' for the "
                             "MQA flash shape, 'MQA' for the MQA decode shape)")
    args = parser.parse_args()
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        sys.exit(f"this benchmark needs a GPU; jax sees {dev.platform}")
    meta = dict(device=dev.device_kind, jax=jax.__version__, commit=commit(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    methods = copy_bandwidths()
    meta["copy_methods_gbps"] = {k: v / 1e9 for k, v in methods.items()}
    meta["copy_gbps"] = max(methods.values()) / 1e9
    print(f"copy bandwidth {meta['copy_gbps']:.0f} GB/s {meta['copy_methods_gbps']}", flush=True)
    shapes, engine_shape = decode_shapes(args.quick, args.sweep_engine)
    rows = []
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
            f.write(markdown(meta, rows))

    shapes = [s for s in shapes if args.shape in s.name]
    for s in shapes if args.only != "flash" else []:
        try:
            if s is engine_shape:
                bench_decode(s, meta["copy_gbps"] * 1e9, args.sweep_engine, args.sweep_alibi,
                             sweep_configs=ENGINE_SWEEP, rows=rows, on_row=save)
            else:
                bench_decode(s, meta["copy_gbps"] * 1e9, args.sweep and s is shapes[0],
                             args.sweep_alibi, rows=rows, on_row=save)
        except Exception:
            traceback.print_exc()
        save()
        print(f"decode {s.name} done", flush=True)
    flash_shapes = [(4, 4096, 32, 8, 128)]
    if not args.quick:
        flash_shapes += [(4, 4096, 32, 32, 128), (4, 4096, 32, 1, 128)]
    flash_shapes = [fs for fs in flash_shapes if args.shape in flash_name(*fs)]
    for i, fs in enumerate(flash_shapes if args.only != "decode" else []):
        try:
            bench_flash(*fs, sweep=args.sweep and i == 0, rows=rows, on_row=save)
        except Exception:
            traceback.print_exc()
        save()
        print(f"flash {fs} done", flush=True)
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
