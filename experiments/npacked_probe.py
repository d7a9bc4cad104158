"""No GPU needed: a W4 product whose int32 words hold 8 output features of one input row.

``quant_matmul`` reads GPTQ's layout, each int32 holding 8 input rows of one output feature
([K / 8, N]). At 256 rows its dequantized tile reaches shared memory one 16-bit value per store
(``results/cpu/quant/README.md``): the tile's register layout after joining the shifts does not
match the runs the tensor cores read. With the words packed along N instead ([K, N / 8], the
layout AWQ uses), a word's 8 codes are 8 neighbours of one row of the [block_k, block_n] tile
that the product reads, so a thread can store them with one 128-bit store.

This probe builds that product as a minimal Pallas kernel (Triton lowering), checks it in
interpret mode against a float64 reference, and compiles it for sm_90 with the ``triton``
package (``--triton-python``; no GPU) at 256 rows of gate/up, next to ``quant_matmul``'s
joined ``dequant_tiles`` path with the same tiles: instructions of the K loop per code,
shared-memory stores by width, registers, dynamic shared memory. No timing; not a library
kernel.

    python experiments/npacked_probe.py --triton-python /path/to/venv/bin/python --out DIR
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from optgqa_jax import quant  # noqa: E402
from optgqa_jax.timing import source_commit  # noqa: E402
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul  # noqa: E402

MAGIC = 0x4B000000          # float32 2^23: its bit pattern OR a code (< 2^23) is 2^23 + code
GROUP = 128


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, k_steps: int, block_k: int, block_n: int):
    # x_ref [BM, K] bf16; w_ref [K, BN / 8] int32 (word j of row k: features 8j..8j+7, 4 bits
    # each, feature 8j+i at bits 4i); s_ref, z_ref [K / G, BN] float32; o_ref [BM, BN]
    shifts = 4 * jax.lax.broadcasted_iota(jnp.int32, (1, block_n // 8, 8), 2)

    def step(i, acc):
        k0 = pl.multiple_of(i * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]                                  # [BM, BK]
        w = w_ref[pl.ds(k0, block_k), :]                                  # [BK, BN / 8]
        q = ((w[:, :, None] >> shifts) & 15) | MAGIC                      # [BK, BN / 8, 8]
        q = jax.lax.bitcast_convert_type(q.reshape(block_k, block_n), jnp.float32)
        s = s_ref[pl.ds(i, 1), :]                                         # [1, BN]
        zb = z_ref[pl.ds(i, 1), :] + float(1 << 23)
        wt = ((q - zb) * s).astype(x.dtype)                               # (q - z) s, exact q - z
        return acc + jnp.dot(x, wt, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k_steps, step,
                            jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def npacked_matmul(x, words, scales, zeros, *, block_m=64, block_n=128, num_warps=4,
                   num_stages=3, interpret=False):
    """x [M, K] bfloat16 @ W [K, N] (``words`` [K, N / 8] int32, 4-bit codes packed along N;
    ``scales``, ``zeros`` [K / 128, N] float32) -> [M, N] bfloat16. M, K and N multiples of the
    tiles (a probe: no padding)."""
    M, K = x.shape
    N = words.shape[1] * 8
    kernel = functools.partial(_kernel, k_steps=K // GROUP, block_k=GROUP, block_n=block_n)
    return pl.pallas_call(
        kernel, grid=(M // block_m, N // block_n),
        in_specs=[pl.BlockSpec((block_m, K), lambda i, j: (i, 0)),
                  pl.BlockSpec((K, block_n // 8), lambda i, j: (0, j)),
                  pl.BlockSpec((K // GROUP, block_n), lambda i, j: (0, j)),
                  pl.BlockSpec((K // GROUP, block_n), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret)(x, words, scales, zeros)


def pack_along_n(codes: np.ndarray) -> np.ndarray:
    """[K, N] codes 0..15 -> [K, N / 8] int32, feature 8j+i of row k at bits 4i of word j."""
    K, N = codes.shape
    c = codes.reshape(K, N // 8, 8).astype(np.uint32)
    return (c << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32).view(np.int32)


def check_interpret(seed: int = 0) -> float:
    """Relative error of the kernel (interpret mode) against float64 at a small shape."""
    rng = np.random.default_rng(seed)
    M, K, N = 64, 256, 256
    codes = rng.integers(0, 16, (K, N))
    scales = rng.uniform(0.001, 0.02, (K // GROUP, N)).astype(np.float32)
    zeros = rng.integers(0, 16, (K // GROUP, N)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    w = (codes - np.repeat(zeros, GROUP, 0)) * np.repeat(scales, GROUP, 0)
    ref = np.asarray(xb, np.float64) @ np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)
    got = np.asarray(npacked_matmul(xb, jnp.asarray(pack_along_n(codes)), jnp.asarray(scales),
                                    jnp.asarray(zeros), block_n=128, interpret=True), np.float64)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    if not np.isfinite(err) or err > 1e-2:
        raise AssertionError(f"npacked kernel: relative error {err}")
    return err


def sass_row(name: str, fn, args, warps: int, stages: int, per_thread: float, python: str,
             path: str) -> dict:
    import ptx_mix
    import triton_ir
    with open(path, "w") as f:
        f.write(triton_ir.capture_ttir(fn, *args)[0])
    out = triton_ir.compile_ttir(path, warps, stages, python)
    loop = ptx_mix.sass_loops(out["sass"])[-1]
    body = [op for a, op, _ in ptx_mix.sass_instructions(out["sass"])
            if loop["start"] <= a <= loop["end"]]
    stores = collections.Counter(op for op in body if op.startswith("STS"))
    reg = re.search(r"REG:(\d+)", out["res"])
    stack = re.search(r"STACK:(\d+)", out["res"])
    return dict(name=name, loop_sass=loop["count"], per_code=loop["count"] / per_thread,
                hgmma=loop["mix"].get("HGMMA", 0), stores=dict(stores),
                top=dict(loop["mix"].most_common(8)),
                registers=int(reg.group(1)) if reg else None,
                stack_bytes=int(stack.group(1)) if stack else None,
                shared_bytes=out["shared"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--triton-python", default=sys.executable)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu",
                                                  "quant"))
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    err = check_interpret()
    print(f"interpret mode against float64: relative error {err:.2e}", flush=True)
    M, K, N = 256, 4096, 28672
    x = jnp.ones((M, K), jnp.bfloat16)
    words = jnp.zeros((K, N // 8), jnp.int32)
    sz = jnp.ones((K // GROUP, N), jnp.float32)
    ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), K, N,
                                                 quant.QuantConfig(bits=4, group_size=128),
                                                 "bfloat16")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for bm, bn, warps, stages in ((64, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 2),
                                      (128, 128, 8, 2)):
            per_thread = GROUP * bn / (32 * warps)
            tile = f"{bm} × {bn}, {warps}, {stages}"
            fn = functools.partial(npacked_matmul, block_m=bm, block_n=bn, num_warps=warps,
                                   num_stages=stages)
            rows.append(dict(sass_row("packed along N", fn, (x, words, sz, sz), warps, stages,
                                      per_thread, a.triton_python, os.path.join(d, "n.ttir")),
                             tile=tile))
            cfg = QuantMatmulConfig(block_m=bm, block_n=bn, block_k=128, num_warps=warps,
                                    num_stages=stages, joined=True, dequant_tiles=True)
            gfn = (lambda x, cfg=cfg: quant_matmul(x, ql.qweight, ql.scales, ql.zeros, bits=4,
                                                   group_size=128, config=cfg))
            rows.append(dict(sass_row("quant_matmul dequant_tiles", gfn, (x,), warps, stages,
                                      per_thread, a.triton_python, os.path.join(d, "q.ttir")),
                             tile=tile))
            for r in rows[-2:]:
                print(tile, r["name"], json.dumps({k: r[k] for k in (
                    "loop_sass", "per_code", "hgmma", "stores", "registers", "shared_bytes")}),
                      flush=True)
    commit = source_commit()
    with open(os.path.join(a.out, f"npacked_probe_{commit}.json"), "w") as f:
        json.dump(dict(commit=commit, interpret_rel_error=err, shape=[M, K, N], rows=rows), f,
                  indent=1)
    lines = ["# W4 words packed along N against quant_matmul's layout, sm_90 SASS (no GPU)\n",
             f"Commit {commit}; gate/up 4096 × 28672 at 256 rows of bfloat16 x, W4 g128, K "
             "steps of 128; Triton's compiler on a CPU (not XLA's: read as a close guide). "
             "Loop: the innermost loop's SASS per K step per thread; stores: its shared-memory "
             f"stores by width. The probe kernel in interpret mode against float64 at 64 × 256 "
             f"× 256: relative error {err:.1e}. No timing.\n",
             "| tile (m × n, warps, stages) | layout | loop SASS | per code | HGMMA | "
             "shared-memory stores | registers | spill B | shared KB |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        st = ", ".join(f"{k} {v}" for k, v in sorted(r["stores"].items()))
        lines.append(f"| {r['tile']} | {r['name']} | {r['loop_sass']} | {r['per_code']:.2f} | "
                     f"{r['hgmma']} | {st} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes'] / 1024:.1f} |")
    with open(os.path.join(a.out, f"npacked_probe_{commit}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
