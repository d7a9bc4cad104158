"""Time the kernel variants that were built and counted without a GPU against the defaults, in
one short run (the first thing to run on a GPU after them).

* ``quant``: ``quant_matmul`` on the Llama-3-8B linear shapes at 1, 16, 64 and 256 rows of x,
  4 bits in groups of 128: the bfloat16 product, the ``for_shape`` default, joined tiles 256
  columns wide (codes as bfloat16 bit patterns), the deepest register tiles and register tiles
  with one K step per program (one row), the register path reading x as given (``raw_x``, on
  the default, the device's tuning-table tiles and two one-step tiles; one row), register
  tiles without a split of K (narrow columns, each program looping over K; with ``raw_x`` the
  product is then a single kernel; one row), joined
  tiles with ``dequant_tiles`` (64 rows and more; from 256 rows also whole 256-row tiles, 128
  and 64 columns wide, with and without a split of K, and on 2 stages), XLA's
  dequantize-then-multiply and the streaming Pallas dequantize kernel then the bfloat16
  product (64 rows and more). µs per
  product over weight copies that overflow the L2 cache, times against bfloat16, % of the
  copy ceiling and the relative error against the bfloat16 product of the dequantized weight.
* ``flash``: causal flash attention, B=4 T=4096 GQA 32/8 D=128, default tiles against
  ``lazy_rescale=True`` (and cuDNN), with and without ALiBi.
* ``decode``: paged decode with groups of 7 (28/4) padded in XLA against masked query rows
  (``replicate_queries=True``), at B=64 ctx 4096 and at the engine's shape (B=256, contexts
  257-512), beside 32/8; and 28/4 at B=32 ctx 2048 with and without ALiBi (with ALiBi also
  the ALiBi default's neighbours: 16- and 64-key blocks, prefetched page tables, more
  programs).
* ``decode_tiles`` (not in the default parts): the CUDA default decode (with the group size
  known, as the model calls it) against other grid sizes, key blocks (32, 64, 128), the
  kernel's own prefetch, warps and stages at B=64 ctx 4096 for 28/4, 40/8, 12/4 and 32/8.

Usage::

    python experiments/compare_variants.py [--parts quant,flash,decode,decode_tiles] [--out DIR]
        [--shapes gate_up,down,o,qkv] [--rows 1,16,64,256] [--variant NAME ...]

Writes ``compare_variants.{json,md}`` under ``--out`` after every part. ``--small`` shrinks
every shape and keeps one setting of each list of register tiles (a run on a CPU in interpret mode, for the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import quant  # noqa: E402
from pallas_kernels import (FlashAttentionConfig, PagedAttentionConfig, alibi_slopes,  # noqa: E402
                            compiler_options, flash_attention, paged_attention)
from pallas_kernels import _common as C  # noqa: E402
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul  # noqa: E402
from bench_quant import arg_sets, io_bytes  # noqa: E402
from tune_quant import with_split  # noqa: E402

SHAPES = {"gate_up": (4096, 28672), "down": (14336, 4096), "o": (4096, 4096),
          "qkv": (4096, 6144)}


def quant_variants(M: int, K: int, N: int, few: bool = False) -> dict:
    """name -> QuantMatmulConfig (None: XLA's dequantize-then-multiply; "dequantize_kernel":
    the streaming Pallas dequantize, then the bfloat16 product). ``few``: of the one-step and
    no-split register tiles only the first setting of each list, with its options (the
    ``--small`` runs that check every kind of variant on a CPU)."""
    bm = max(16, C.next_power_of_two(M)) if M <= 64 else 128
    out = {"default": QuantMatmulConfig.for_shape("cuda", M, K, N, 128)}
    out["joined 256"] = with_split(QuantMatmulConfig(
        block_m=min(bm, 64), block_n=256, block_k=128, num_warps=4, num_stages=3, joined=True),
        M, K, N)
    if M == 1:
        out["register deep"] = with_split(QuantMatmulConfig(
            block_m=1, block_n=128, block_k=512, num_warps=8, num_stages=3, fma=True), M, K, N)
        # One K step per program (split_k = K / block_k): loop-free programs that each load
        # one tile, as the streaming dequantize kernel does (about 81% of copy on gate/up),
        # where the looping programs' bare loads stopped near 50%; the float32 partials add
        # 4 N K / block_k bytes (3% of the codes at block_k 256). Compiled for sm_90 by the
        # triton package (experiments/triton_ir.py, no GPU): 32 registers at 64 x 256 and
        # 8 warps, as the looping default; 63 at 256 x 128 and 8 warps, 233 with 4 warps.
        for bn, bk, warps in ((64, 256, 8), (128, 256, 8), (256, 128, 8), (128, 512, 8),
                              (64, 512, 4), (128, 128, 4)):
            out[f"register 1-step {bn}x{bk}"] = QuantMatmulConfig(
                block_m=1, block_n=bn, block_k=bk, split_k=max(1, K // bk), num_warps=warps,
                num_stages=1, fma=True)
        for name in ("register 1-step 64x256", "register 1-step 256x128"):   # 2^23's pattern
            out[name + " runtime magic"] = dataclasses.replace(out[name], runtime_magic=True)
            out[name + " half pairs"] = dataclasses.replace(out[name], runtime_magic=True,
                                                            half_pairs=True)
        out["default half pairs"] = dataclasses.replace(out["default"], half_pairs=True)
        # x read as given (raw_x): no shift-major, scaled copy of x per call (one launch
        # fewer), x's columns read with stride P and widened in the kernel; on the default,
        # on the device's tuning-table tiles and on two one-step tiles
        tuned = QuantMatmulConfig.for_shape("cuda", M, K, N, 128, device=C.device_kind())
        if tuned != out["default"]:
            out["tuned"] = tuned
        for name in ("default", "tuned", "register 1-step 64x256", "register 1-step 128x512"):
            if name in out and out[name].fma:
                out[name + " raw x"] = dataclasses.replace(out[name], raw_x=True)
        # no split of K: narrow column tiles so that the grid still fills the GPU, each
        # program looping over all of K (the loads pipelined by num_stages); with raw_x the
        # product is one kernel, no copy of x before it and no sum of partials after it
        for bn, bk, warps in ((32, 256, 4), (16, 512, 4), (32, 512, 8)):
            cfg = QuantMatmulConfig(block_m=1, block_n=bn, block_k=bk, split_k=1,
                                    num_warps=warps, num_stages=3, fma=True)
            out[f"register no-split {bn}x{bk}"] = cfg
            out[f"register no-split {bn}x{bk} raw x"] = dataclasses.replace(cfg, raw_x=True)
    if few:
        out = {k: v for k, v in out.items()
               if not k.startswith(("register 1-step", "register no-split"))
               or k.startswith(("register 1-step 64x256", "register no-split 32x256"))}
    if M >= 64:
        out["joined dequant_tiles"] = with_split(QuantMatmulConfig(
            block_m=bm, block_n=128, block_k=128, num_warps=8, num_stages=3, joined=True,
            dequant_tiles=True), M, K, N)
    if M >= 256:
        # Whole 256-row tiles: each weight tile dequantized once per 256 rows instead of twice
        # (128-row tiles). Compiled for sm_90 by the triton package without a GPU
        # (experiments/triton_ir.py, gate/up, 256 rows): 256 x 128 x 128 on 8 warps takes 234
        # registers, no spill, 16 HGMMA and 521 SASS instructions per K step (8.1 per code);
        # 256 x 64 takes 128 registers (11.0 per code). An estimate from those counts (4
        # schedulers per SM, one instruction each per cycle; about 4,300 bfloat16 FLOP per
        # cycle per SM): about 1,000 issue cycles of dequantization per K step against about
        # 2,000 of tensor-core work for the 256 x 128 tile, so, if the two overlap, near the
        # bfloat16 rate. Timed on an H100 at 5b427eb (results/h100/quant/
        # compare_variants_256_5b427eb.md) they lost: 256 x 64 and 256 x 128 on 2 stages ran
        # slower than the Pallas dequantize + bfloat16 route, and 256 x 128 on 3 stages asks
        # for more shared memory than a block may have (about 240 KB against 227 KB).
        for bn in (128, 64):
            cfg = QuantMatmulConfig(block_m=256, block_n=bn, block_k=128, num_warps=8,
                                    num_stages=3, joined=True, dequant_tiles=True)
            out[f"joined dequant_tiles 256x{bn}"] = with_split(cfg, M, K, N)
            if out[f"joined dequant_tiles 256x{bn}"].split_k != 1:
                out[f"joined dequant_tiles 256x{bn} no split"] = cfg
        out["joined dequant_tiles 256x128 2 stages"] = dataclasses.replace(
            out["joined dequant_tiles 256x128"], num_stages=2)
        # Smaller tiles, several blocks per SM: at 128 x 128 on 8 warps one block fills an
        # SM's registers, so its dequantization and its products take turns. In sm_90 SASS
        # (experiments/quant_occupancy_sass.py, results/cpu/quant/quant_occupancy_sass_*.md)
        # 64 x 128 fits 2 blocks per SM, 64 x 64 3 (3 stages) or 4 (2 stages), at 7.3-7.6
        # instructions per code as before, each weight tile dequantized 4 times at 256 rows.
        for bm_, bn_, warps, stages in ((64, 128, 4, 3), (64, 128, 4, 2), (64, 128, 8, 3),
                                        (64, 64, 4, 3), (64, 64, 4, 2)):
            out[f"joined dequant_tiles {bm_}x{bn_} w{warps} s{stages}"] = with_split(
                QuantMatmulConfig(block_m=bm_, block_n=bn_, block_k=128, num_warps=warps,
                                  num_stages=stages, joined=True, dequant_tiles=True), M, K, N)
    if M >= 64:
        out["dequantize (XLA)"] = None
        out["dequantize kernel"] = "dequantize_kernel"
    return out


def part_quant(a, ceiling: float, rows: list) -> None:
    opts = compiler_options()
    qc = quant.parse_spec("w4g128")
    interpret = C.backend() == "cpu"
    for name in a.shapes.split(","):
        K, N = SHAPES[name] if not a.small else (512, 384)
        for M in (int(m) for m in a.rows.split(",")):
            key = jax.random.PRNGKey(M * 7 + K)
            make_q = lambda k: quant.synthetic.random_quantized_linear(k, K, N, qc, "bfloat16")  # noqa: E731
            sets = arg_sets(key, M, K, N, make_q) if not a.small else [
                (jax.random.normal(key, (M, K)).astype(jnp.bfloat16), make_q(key))]
            x0, q0 = sets[0]
            ref = (x0.astype(jnp.float32) @ quant.dequantize(q0, jnp.bfloat16).astype(
                jnp.float32))
            w_sets = [(x, quant.dequantize(q, jnp.bfloat16)) for x, q in sets]
            T = lambda fn, s: B.timeit_rotating(fn, s, compiler_options=opts,  # noqa: E731
                                                iters=a.iters, trials=a.trials)
            t_bf16 = T(lambda x, w: x @ w, w_sets)
            rows.append(dict(part="quant", shape=name, K=K, N=N, M=M, variant="bfloat16",
                             us=t_bf16 * 1e6, vs_bf16=1.0,
                             pct_ceiling=100 * io_bytes(M, K, N) / t_bf16 / ceiling))
            for variant, cfg in chosen(a, quant_variants(M, K, N, few=a.small)).items():
                row = dict(part="quant", shape=name, K=K, N=N, M=M, variant=variant,
                           config=dataclasses.asdict(cfg) if isinstance(cfg, QuantMatmulConfig)
                           else None)
                try:
                    if cfg is None or isinstance(cfg, str):   # XLA's, or the Pallas, dequantize
                        fn = lambda x, q, impl=cfg or "dequantize": quant.matmul(  # noqa: E731
                            x, q, impl)
                    else:
                        fn = lambda x, q, cfg=cfg: quant_matmul(  # noqa: E731
                            x, q.qweight, q.scales, q.zeros, bits=4, group_size=128,
                            config=cfg, interpret=interpret)
                    y = fn(x0, q0).astype(jnp.float32)
                    row["rel_error"] = float(jnp.abs(y - ref).max() / jnp.abs(ref).max())
                    t = T(fn, sets)
                    row.update(us=t * 1e6, vs_bf16=t_bf16 / t,
                               pct_ceiling=100 * io_bytes(M, K, N, q0) / t / ceiling)
                except Exception as e:  # noqa: BLE001  (a variant that fails to compile)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)


def chosen(a, variants: dict) -> dict:
    """The variants ``--variant`` names (all when none is named)."""
    if not a.variant:
        return variants
    return {name: cfg for name, cfg in variants.items() if name in a.variant}


def part_flash(a, ceiling: float, rows: list) -> None:
    Bz, T, N, K, D = (4, 4096, 32, 8, 128) if not a.small else (1, 64, 4, 2, 64)
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(ks[0], (Bz, T, N, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (Bz, T, K, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (Bz, T, K, D), jnp.bfloat16)
    flops = 4 * Bz * N * T * T * D / 2
    base = FlashAttentionConfig.for_backend("cuda", D, K)
    interpret = C.backend() == "cpu"
    for alibi in (False, True):
        sl = alibi_slopes(N) if alibi else None
        ref = None
        for variant, cfg in chosen(a, {"default": base, "lazy_rescale": dataclasses.replace(
                base, lazy_rescale=True)}).items():
            if interpret:
                cfg = dataclasses.replace(cfg, block_q=16, block_k=16)
            fn = jax.jit(lambda q, k, v, cfg=cfg, sl=sl: flash_attention(
                q, k, v, causal=True, alibi_slopes=sl, config=cfg, interpret=interpret),
                compiler_options=compiler_options())
            row = dict(part="flash", shape=f"B={Bz} T={T} {N}/{K} D={D}", alibi=alibi,
                       variant=variant)
            try:
                out = fn(q, k, v).astype(jnp.float32)
                ref = out if variant == "default" else ref
                if ref is not None:     # the default ran first (not when --variant left it out)
                    row["rel_error_vs_default"] = float(jnp.abs(out - ref).max()
                                                        / jnp.abs(ref).max())
                t = B.timeit(fn, q, k, v, iters=a.iters, trials=a.trials)
                row.update(ms=t * 1e3, tflops=flops / t / 1e12)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not interpret and not alibi:
            cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"))
            try:
                t = B.timeit(cudnn, q, k, v, iters=a.iters, trials=a.trials)
                rows.append(dict(part="flash", shape=f"B={Bz} T={T} {N}/{K} D={D}",
                                 alibi=False, variant="cuDNN", ms=t * 1e3,
                                 tflops=flops / t / 1e12))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(part="flash", variant="cuDNN", alibi=False,
                                 error=f"{type(e).__name__}: {str(e)[:200]}"))


def _decode_inputs(key, batch, N, K, context, min_context=None, D=128, Z=16):
    pages_per_seq = -(-context // Z)
    num_pages = batch * pages_per_seq
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    q = jax.random.normal(k1, (batch, N, D), jnp.bfloat16)
    kp = jax.random.normal(k2, (K, num_pages, Z, D), jnp.bfloat16)
    vp = jax.random.normal(k3, (K, num_pages, Z, D), jnp.bfloat16)
    tables = jax.random.permutation(k4, num_pages).reshape(batch, pages_per_seq)
    lengths = (jax.random.randint(k5, (batch,), min_context, context + 1, jnp.int32)
               if min_context else jnp.full((batch,), context, jnp.int32))
    return q, kp, vp, tables.astype(jnp.int32), lengths


def _time_decode(a, ceiling, rows, part, batch, N, K, ctx, lo, alibi, variants) -> None:
    """Time paged decode at one shape for each (name -> PagedAttentionConfig)."""
    interpret = C.backend() == "cpu"
    args = _decode_inputs(jax.random.PRNGKey(batch + N), batch, N, K, ctx, lo)
    kv_bytes = 2 * int(jnp.sum(args[4])) * K * 128 * 2
    sl = alibi_slopes(N) if alibi else None
    for variant, cfg in chosen(a, variants).items():
        fn = jax.jit(lambda q, k, v, t, l, cfg=cfg, sl=sl: paged_attention(
            q, k, v, t, l, alibi_slopes=sl, config=cfg, interpret=interpret),
            compiler_options=compiler_options())
        row = dict(part=part, shape=f"B={batch} ctx={ctx if not lo else f'{lo}-{ctx}'} "
                   f"{N}/{K}", alibi=alibi, variant=variant)
        try:
            jax.block_until_ready(fn(*args))
            t = B.timeit(fn, *args, iters=a.iters, trials=a.trials)
            row.update(ms=t * 1e3, pct_ceiling=100 * kv_bytes / t / ceiling)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)


def part_decode(a, ceiling: float, rows: list) -> None:
    cases = [(64, 28, 4, 4096, None, False), (64, 32, 8, 4096, None, False),
             (256, 28, 4, 512, 257, False), (256, 32, 8, 512, 257, False),
             (32, 28, 4, 2048, None, False), (32, 28, 4, 2048, None, True)]
    if a.small:
        cases = [(2, 28, 4, 64, None, False), (2, 28, 4, 64, None, True)]
    for batch, N, K, ctx, lo, alibi in cases:
        _time_decode(a, ceiling, rows, "decode", batch, N, K, ctx, lo, alibi,
                     decode_variants(N, K, alibi))


def decode_variants(N: int, K: int, alibi: bool) -> dict:
    """name -> PagedAttentionConfig for the decode part at one head layout."""
    padded = dataclasses.replace(PagedAttentionConfig.for_backend("cuda", alibi=alibi),
                                 replicate_queries=False)
    variants = {"padded in XLA": padded, "replicated / masked rows":
                dataclasses.replace(padded, replicate_queries=True)}
    if alibi:   # the ALiBi default's neighbours (issue: within 5% of no ALiBi)
        variants.update({
            # the no-ALiBi default's config (masked rows, key blocks for the group size):
            # compiled for sm_90, ALiBi adds 5% to its loop's static SASS (324 -> 339)
            "no-ALiBi default config": PagedAttentionConfig.for_backend(
                "cuda", group_size=N // K),
            "padded, 64-key blocks": dataclasses.replace(padded, keys_per_block=64),
            "padded, 16-key blocks": dataclasses.replace(padded, keys_per_block=16),
            "padded, prefetch tables": dataclasses.replace(padded, prefetch="tables"),
            "padded, target_programs 1024": dataclasses.replace(padded,
                                                                target_programs=1024)})
    return variants


def part_decode_tiles(a, ceiling: float, rows: list) -> None:
    """The CUDA default decode against other grid sizes, key blocks and warps, at B=64 ctx
    4096 for groups of 7, 5, 3 and 4 (28/4, 40/8, 12/4, 32/8): where the time goes for groups
    that are not powers of two."""
    cases = [(64, 28, 4, 4096), (64, 40, 8, 4096), (64, 12, 4, 4096), (64, 32, 8, 4096)]
    if a.small:
        cases = [(2, 28, 4, 64)]
    for batch, N, K, ctx in cases:
        _time_decode(a, ceiling, rows, "decode_tiles", batch, N, K, ctx, None, False,
                     decode_tile_variants(N, K))


def decode_tile_variants(N: int, K: int) -> dict:
    """name -> PagedAttentionConfig: the CUDA default for the group size and its neighbours."""
    d = PagedAttentionConfig.for_backend("cuda", group_size=N // K)
    return {
        "default": d,
        "target_programs 256": dataclasses.replace(d, target_programs=256),
        "target_programs 1024": dataclasses.replace(d, target_programs=1024),
        "target_programs 2048": dataclasses.replace(d, target_programs=2048),
        "32-key blocks": dataclasses.replace(d, keys_per_block=32),
        "64-key blocks": dataclasses.replace(d, keys_per_block=64),
        "128-key blocks": dataclasses.replace(d, keys_per_block=128),
        "prefetch tables": dataclasses.replace(d, prefetch="tables"),
        "prefetch tiles": dataclasses.replace(d, prefetch="tiles"),
        "8 warps": dataclasses.replace(d, num_warps=8),
        "2 stages": dataclasses.replace(d, num_stages=2)}


def variant_names() -> set:
    """Every variant name any part can run (what ``--variant`` may name)."""
    names = {"default", "lazy_rescale"}
    for M in (1, 16, 64, 256, 2048):
        names |= set(quant_variants(M, 4096, 4096))
    for alibi in (False, True):
        names |= set(decode_variants(32, 8, alibi))
    return names | set(decode_tile_variants(28, 4))


PARTS = {"quant": part_quant, "flash": part_flash, "decode": part_decode,
         "decode_tiles": part_decode_tiles}


def markdown(meta: dict, rows: list) -> str:
    lines = ["# Variants built without a GPU, against the defaults", "",
             f"Device {meta['device']}, jax {meta['jax']}, commit {meta['commit']}; copy "
             f"ceiling {meta['ceiling'] / 1e9:,.0f} GB/s.", ""]
    fmt = lambda v, d=1: "—" if v is None else f"{v:,.{d}f}"  # noqa: E731
    quant_rows = [r for r in rows if r["part"] == "quant"]
    if quant_rows:
        lines += ["## quant_matmul, w4 g128 (µs per product)", "",
                  "| shape | M | variant | µs | × bf16 | % ceiling | rel. error |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in quant_rows:
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['M']} | {r['variant']} | fails: "
                             f"{r['error'][:80]} | | | |")
            else:
                lines.append(f"| {r['shape']} | {r['M']} | {r['variant']} | {fmt(r['us'])} | "
                             f"{fmt(r['vs_bf16'], 2)} | {fmt(r['pct_ceiling'], 0)}% | "
                             f"{fmt(r.get('rel_error'), 4) if r.get('rel_error') is not None else '—'} |")
    for part, unit, key in (("flash", "TFLOP/s", "tflops"), ("decode", "% of copy", "pct_ceiling"),
                            ("decode_tiles", "% of copy", "pct_ceiling")):
        prow = [r for r in rows if r["part"] == part]
        if not prow:
            continue
        lines += ["", f"## {part}", "", f"| shape | ALiBi | variant | ms | {unit} |",
                  "| --- | --- | --- | ---: | ---: |"]
        for r in prow:
            if "error" in r:
                lines.append(f"| {r.get('shape', '')} | {r.get('alibi')} | {r['variant']} | "
                             f"fails: {r['error'][:80]} | |")
            else:
                lines.append(f"| {r['shape']} | {r['alibi']} | {r['variant']} | "
                             f"{fmt(r['ms'], 3)} | {fmt(r.get(key), 0)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="quant,flash,decode")
    p.add_argument("--shapes", default="gate_up,down,o,qkv")
    p.add_argument("--rows", default="1,16,64,256")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--variant", action="append", default=[],
                   help="run this variant (its name as in the tables; repeat the option for "
                        "several; default: every variant of each part; the baselines "
                        "bfloat16 and cuDNN always run)")
    p.add_argument("--small", action="store_true", help="tiny shapes (interpret mode on a CPU)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "variants"))
    a = p.parse_args(argv)
    unknown = [x for x in a.parts.split(",") if x not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {sorted(PARTS)}")
    unknown = sorted(set(a.variant) - variant_names())
    if unknown:
        raise SystemExit(f"--variant: unknown {unknown}; choose from {sorted(variant_names())}")
    os.makedirs(a.out, exist_ok=True)
    ceiling = B.copy_bandwidth(8 << 20 if a.small else 2 << 30)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=B.source_commit(), ceiling=ceiling)
    rows: list = []
    for part in a.parts.split(","):
        t0 = time.perf_counter()
        try:
            PARTS[part](a, ceiling, rows)
        except Exception:  # noqa: BLE001  (keep the other parts)
            rows.append(dict(part=part, variant="(part)", error=traceback.format_exc()[-400:]))
        print(f"== {part}: {time.perf_counter() - t0:.0f} s", flush=True)
        with open(os.path.join(a.out, "compare_variants.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(a.out, "compare_variants.md"), "w") as f:
            f.write(markdown(meta, rows))


if __name__ == "__main__":
    main()
