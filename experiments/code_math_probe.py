"""How many instructions per code the unpack-and-multiply of one-row quantized matmuls costs,
in straight-line (one K step per program) kernels: a probe compiled for sm_90 without a GPU.

``compare_variants.py`` times one-row register tiles with one K step per program (loop-free
programs). Compiled by the ``triton`` package, that code runs two LOP3 per code where the
looping kernel runs one: with no loop to hoist it out of, ptxas encodes the float32 bit
pattern of 2^23 (``code_floats``) as an immediate beside the code's mask, and one LOP3 takes
only one immediate. This probe measures that, and a float16 alternative, on minimal kernels
with the unpacking of ``pallas_kernels.quant_matmul``'s register path (4-bit codes, one row
of x, a [block_k / 8, block_n] tile of words per program, the partial sums of each tile
written out):

* ``f32``: codes masked in place under 2^23 (one and-or), minus 2^23, float32 multiply-adds;
* ``f32 runtime magic``: the same with 2^23's bit pattern read from memory;
* ``f16 pairs``: two codes per and-or as float16 bit patterns ``1024 + code``
  (``quant_codes.pattern_codes``), minus 1024, multiplied by float16 x and summed over a
  word's 8 codes in float16, then in float32 (x scaled by a power of two per row in the
  wrapper keeps ``x * code`` sums far below float16's range);
* ``f16 pairs runtime magic``: the same with the pattern's exponent bits read from memory.

Each kernel is first run in interpret mode against a float64 reference (relative error of
the tile partials; float16 arithmetic in interpret mode may be computed in float32 by XLA on a
CPU, so the GPU's error is not measured here), then compiled with Triton for sm_90 (as
``triton_ir.py``: a Python with the ``triton`` package, no GPU) and its SASS counted:
instructions per code over the whole kernel, registers, the most frequent opcodes.

Usage::

    python experiments/code_math_probe.py --triton-python /path/to/venv/bin/python \
        [--out experiments/results/cpu/quant]

Then (``--kernels``, on by default) the same counts for the project's kernels at one row on
gate/up 4096 x 28672, 4 bits in groups of 128: ``quant_matmul``'s looping one-row default
(float32, and ``half_pairs``), its one-K-step-per-program tiles with and without
``runtime_magic`` and with ``half_pairs``, and
``bsr_quant_matmul`` at 50% group sparsity with and without it.

Writes ``code_math_probe.{json,md}``. Instruction counts, not times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax.benchmark import source_commit  # noqa: E402
from pallas_kernels.quant_codes import code_pattern, pattern_codes  # noqa: E402

BITS, P = 4, 8                       # 4-bit codes, 8 per int32 word
_TWO23 = 0x4B000000
VARIANTS = ("f32", "f32 runtime magic", "f16 pairs", "f16 pairs runtime magic")


def probe_kernel(variant: str):
    """Kernel (x_ref [P, Wk], w_ref [Wk, bn] int32, magic_ref [2] int32, o_ref [1, bn] f32):
    ``sum_k x[k] code[k, n]`` over one tile, x in shift-major order (row p holds the x of
    shift p of every word; for the float32 variants times ``2^-s``, where shift p's code is
    masked in place at bit offset s, as ``quant_matmul``'s wrapper does)."""
    runtime = variant.endswith("runtime magic")

    def kernel(x_ref, w_ref, magic_ref, o_ref):
        words = w_ref[...]
        Wk, bn = words.shape
        if variant.startswith("f32"):
            magic = magic_ref[0] if runtime else _TWO23
            hi = words >> 16
            acc = jnp.zeros((Wk, bn), jnp.float32)
            for p in range(P):
                src, s = (hi, BITS * p - 16) if BITS * p >= 16 else (words, BITS * p)
                f = jax.lax.bitcast_convert_type((src & (15 << s)) | magic, jnp.float32)
                acc = acc + x_ref[p, :].astype(jnp.float32)[:, None] * (f - float(2 ** 23))
            o_ref[...] = acc.sum(axis=0)[None, :]
        else:
            if runtime:   # the pattern's exponent bits from memory: one and-or per code pair
                pair_magic = magic_ref[1]
                codes = []
                lo, hi = [], []
                for j in range(P // 2):
                    t = ((words >> (BITS * j)) & 0x000F000F) | pair_magic
                    lo.append(jax.lax.bitcast_convert_type(t.astype(jnp.int16), jnp.float16))
                    hi.append(jax.lax.bitcast_convert_type(
                        jax.lax.shift_right_logical(t, 16).astype(jnp.int16), jnp.float16))
                codes = lo + hi
            else:
                codes = pattern_codes(words, BITS, jnp.float16)
            part = jnp.zeros((Wk, bn), jnp.float16)
            for p, c in enumerate(codes):
                part = part + x_ref[p, :][:, None] * (c - jnp.float16(1024.0))
            o_ref[...] = part.astype(jnp.float32).sum(axis=0)[None, :]

    return kernel


def probe_call(variant: str, x, words, *, block_n: int, num_warps: int, interpret: bool):
    """Tile partials [K / block_k, N] f32 of ``x @ codes`` (one program per tile)."""
    Wk_all, N = words.shape
    Wk = 32                                          # words per tile: block_k = 256 rows
    magic = jnp.array([_TWO23, code_pattern(jnp.float16, BITS)[0] * 0x10001], jnp.int32)
    return pl.pallas_call(
        probe_kernel(variant), grid=(N // block_n, Wk_all // Wk),
        in_specs=[pl.BlockSpec((P, Wk), lambda n, k: (0, k)),
                  pl.BlockSpec((Wk, block_n), lambda n, k: (k, n)),
                  pl.BlockSpec((2,), lambda n, k: (0,))],
        out_specs=pl.BlockSpec((1, block_n), lambda n, k: (k, n)),
        out_shape=jax.ShapeDtypeStruct((Wk_all // Wk, N), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret)(x, words, magic)


def random_case(seed: int, K: int, N: int):
    """Codes [K, N] in 0..15, packed words [K / 8, N], x [K] scaled to |x| <= 1, in
    shift-major order [P, K / 8] (row p: the x of shift p of each word)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (K, N))
    words = np.zeros((K // P, N), np.int64)
    for p in range(P):
        words |= codes[p::P].astype(np.int64) << (BITS * p)
    words = words.astype(np.uint32).view(np.int32)
    x = rng.standard_normal(K)
    x = x / np.abs(x).max()
    xs = np.stack([x[p::P] for p in range(P)])                 # [P, K / 8]
    want = (x[:, None] * codes).reshape(K // 256, 256, N).sum(axis=1)    # per-tile partials
    return xs, words, want


def check(variant: str, seed: int = 0, K: int = 512, N: int = 128) -> float:
    """Relative error of the variant's tile partials in interpret mode against float64."""
    xs, words, want = random_case(seed, K, N)
    dt = jnp.float32 if variant.startswith("f32") else jnp.float16
    if variant.startswith("f32"):   # shift p's code arrives times 2^s: x carries 2^-s (exact)
        xs = xs * np.array([2.0 ** -((BITS * p) % 16) for p in range(P)])[:, None]
    got = np.asarray(probe_call(variant, jnp.asarray(xs, dt), jnp.asarray(words), block_n=64,
                                num_warps=4, interpret=True), np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max() / np.abs(want).max())


def compile_variant(variant: str, python: str, block_n: int, num_warps: int, tmp: str) -> dict:
    import triton_ir
    K, N = 4096, 28672
    dt = jnp.float32 if variant.startswith("f32") else jnp.float16
    return triton_ir.count_kernel(
        lambda x, w: probe_call(variant, x, w, block_n=block_n, num_warps=num_warps,
                                interpret=False),
        (jnp.zeros((P, K // P), dt), jnp.zeros((K // P, N), jnp.int32)), num_warps, 1, python,
        os.path.join(tmp, variant.replace(" ", "_") + ".ttir"), 256 * block_n / (32 * num_warps))


def kernel_cases():
    """The project's kernels, 4 bits in groups of 128 at one row on gate/up 4096 x 28672:
    name -> (function of x, codes handled per thread, num_warps, num_stages)."""
    import dataclasses

    from optgqa_jax import quant
    from optgqa_jax.sparse.synthetic import random_bsr_linear
    from pallas_kernels.bsr_quant_matmul import BSRMatmulConfig, bsr_quant_matmul
    from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
    K, N = 4096, 28672
    qc = quant.QuantConfig(bits=4, group_size=128)
    ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), K, N, qc, "bfloat16")
    loop = QuantMatmulConfig.for_shape("cuda", 1, K, N, 128)
    one = QuantMatmulConfig(block_m=1, block_n=64, block_k=256, split_k=K // 256, num_warps=8,
                            num_stages=1, fma=True)
    out = {}
    for name, cfg in (("quant_matmul one-row default (K loop)", loop),
                      ("quant_matmul one-row default, half pairs",
                       dataclasses.replace(loop, half_pairs=True)),
                      ("quant_matmul one K step per program", one),
                      ("quant_matmul one K step per program, runtime magic",
                       dataclasses.replace(one, runtime_magic=True)),
                      ("quant_matmul one K step per program, half pairs + runtime magic",
                       dataclasses.replace(one, runtime_magic=True, half_pairs=True))):
        # the codes of one K step: the whole program of the one-step tiles; for the looping
        # default the static SASS (prologue, one loop body, epilogue) over one step's codes
        out[name] = (lambda x, cfg=cfg: quant_matmul(
            x, ql.qweight, ql.scales, ql.zeros, bits=4, group_size=128, config=cfg),
            cfg.block_k * cfg.block_n / (32 * cfg.num_warps), cfg.num_warps, cfg.num_stages)
    b = random_bsr_linear(0, K, N, qc, 0.5, "bfloat16")
    bcfg = BSRMatmulConfig.for_shape("cuda", 1, b.codes.shape[0])
    # whole rows (row_blocks = 16), the H100 table's tiles: the four arrays against the packed
    # one (pack_blocks: groups and scale-and-zero words read from the array's rows past the
    # codes, the serving layout of sparse.to_packed_bsr)
    from optgqa_jax.sparse.packed import pack_blocks
    from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_packed
    h100 = BSRMatmulConfig.for_shape("cuda", 1, b.nnz, K=K, N=N, bits=4, group_size=128,
                                     row_blocks=b.row_blocks, device="NVIDIA H100 80GB HBM3")
    packed = pack_blocks(b.codes, b.scales, b.zeros, b.col_idx)
    rows_codes = h100.block_t * 128 / (32 * h100.num_warps)
    out["bsr_quant_matmul W4S50 whole rows, H100 table, four arrays"] = (
        lambda x: bsr_quant_matmul(x, b.codes, b.scales, b.zeros, b.col_idx, b.row_ids,
                                   out_features=N, bits=4, group_size=128,
                                   row_blocks=b.row_blocks, config=h100),
        rows_codes, h100.num_warps, h100.num_stages)
    out["bsr_quant_matmul W4S50 whole rows, H100 table, packed"] = (
        lambda x: bsr_quant_matmul_packed(x, packed, nnz=b.nnz, scale_dtype=b.scales.dtype,
                                          out_features=N, bits=4, group_size=128,
                                          row_blocks=b.row_blocks, config=h100),
        rows_codes, h100.num_warps, h100.num_stages)
    out["bsr_quant_matmul W4S50 whole rows, H100 table, packed, code_zeros (its default)"] = (
        lambda x: bsr_quant_matmul_packed(x, packed, nnz=b.nnz, scale_dtype=b.scales.dtype,
                                          out_features=N, bits=4, group_size=128,
                                          row_blocks=b.row_blocks,
                                          config=dataclasses.replace(h100, code_zeros=True)),
        rows_codes, h100.num_warps, h100.num_stages)
    for name, cfg in (("bsr_quant_matmul W4S50 default", bcfg),
                      ("bsr_quant_matmul W4S50 runtime magic",
                       dataclasses.replace(bcfg, runtime_magic=True))):
        out[name] = (lambda x, cfg=cfg: bsr_quant_matmul(
            x, b.codes, b.scales, b.zeros, b.col_idx, b.row_ids, out_features=N, bits=4,
            group_size=128, config=cfg),
            cfg.block_t * 128 / (32 * cfg.num_warps), cfg.num_warps, cfg.num_stages)
    return out


def compile_kernel(fn, codes_per_thread, num_warps, num_stages, python, path) -> dict:
    import triton_ir
    row = triton_ir.count_kernel(fn, (jnp.ones((1, 4096), jnp.bfloat16),), num_warps,
                                 num_stages, python, path, codes_per_thread)
    return dict(row, num_warps=num_warps, num_stages=num_stages)


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# One-row unpack-and-multiply: SASS per code of straight-line kernels", "",
             f"Commit {m['commit']}, jax {m['jax']}, triton {m['triton']} (sm_90, no GPU); "
             f"4-bit codes, tiles of 256 rows x {m['block_n']} columns, {m['num_warps']} warps, "
             "one tile per program. Instruction counts of the whole kernel, not times; "
             "the error is interpret mode's on the CPU.", "",
             "| variant | SASS per code | registers | rel. error (interpret) | most frequent |",
             "| --- | ---: | ---: | ---: | --- |"]
    for v, r in res["variants"].items():
        top = ", ".join(f"{k} {n}" for k, n in list(r.get("top", {}).items())[:6])
        spc = f"{r['sass_per_code']:.2f}" if "sass_per_code" in r else r.get("error", "")[:60]
        lines.append(f"| {v} | {spc} | {r.get('registers', '')} | {r['rel_error']:.1e} | "
                     f"{top} |")
    if res.get("kernels"):
        lines += ["", "## The project's kernels (4 bits, groups of 128, one row, gate/up "
                  "4096 x 28672)", "",
                  "Static SASS of the whole kernel (prologue, the K loop's body once, "
                  "epilogue) over the codes one thread handles in one K step (for the "
                  "one-step tiles and BSR: in its whole program); BSR at 50% of the groups.",
                  "",
                  "| kernel | SASS per code | registers | most frequent |",
                  "| --- | ---: | ---: | --- |"]
        for name, r in res["kernels"].items():
            top = ", ".join(f"{k} {n}" for k, n in list(r.get("top", {}).items())[:6])
            spc = (f"{r['sass_per_code']:.2f}" if "sass_per_code" in r
                   else r.get("error", "")[:60])
            lines.append(f"| {name} | {spc} | {r.get('registers', '')} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--triton-python", default=sys.executable,
                   help="a Python interpreter with the triton package (default: this one)")
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--num-warps", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="also count the project's kernels with and without the runtime magic")
    p.add_argument("--kernel-filter", default="",
                   help="count only the project's kernels whose name contains this")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu",
                                                 "quant"))
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    import triton_ir
    res = dict(meta=dict(commit=source_commit(), jax=jax.__version__,
                         triton=triton_ir.triton_version(a.triton_python), block_n=a.block_n,
                         num_warps=a.num_warps), variants={})
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            row = dict(rel_error=check(v))
            try:
                row.update(compile_variant(v, a.triton_python, a.block_n, a.num_warps, tmp))
            except Exception as e:  # noqa: BLE001  (no triton package: the check still counts)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            res["variants"][v] = row
            print(v, json.dumps(row), flush=True)
        if a.kernels:
            res["kernels"] = {}
            for i, (name, (fn, cpt, w, st)) in enumerate(kernel_cases().items()):
                if a.kernel_filter not in name:
                    continue
                try:
                    row = compile_kernel(fn, cpt, w, st, a.triton_python,
                                         os.path.join(tmp, f"kernel{i}.ttir"))
                except Exception as e:  # noqa: BLE001
                    row = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                res["kernels"][name] = row
                print(name, json.dumps(row), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "code_math_probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "code_math_probe.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
