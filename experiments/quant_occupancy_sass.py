"""No GPU needed: how many blocks of the quantized matmul's 256-row tiles fit on one sm_90 SM.

At 256 rows (the engine's decode steps in the throughput workload) the W4 g128 product is
0.4-0.6x bfloat16 on an H100 with one 8-warp block of 128 x 128 tiles per SM: each K step
dequantizes its tile, stores it to shared memory and waits for its tensor-core product before
the next, so the SM alternates between integer work and products. Several resident blocks let
the warp schedulers run one block's dequantization under another's product. This script
compiles ``quant_matmul``'s joined ``dequant_tiles`` path (``triton_ir.count_kernel``: the
module Pallas lowers, compiled by the ``triton`` package for sm_90, e.g. in a separate venv
named by ``--triton-python``) at 256 rows for a list of tiles and reports registers, spills,
dynamic shared memory, the innermost loop's instructions and tensor-core products per K step,
and the blocks per SM those allow under sm_90's limits (65,536 registers per SM, allocated per
warp in units of 256; 228 KB of shared memory per SM with 1 KB reserved per block; 64 warps;
32 blocks). It measures no time: ``compare_variants.py --parts quant`` (reproduce step
``variants-256-occupancy``) times the same tiles on a GPU.

    python experiments/quant_occupancy_sass.py --triton-python /path/to/venv/bin/python --out DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from optgqa_jax import quant  # noqa: E402
from optgqa_jax.timing import source_commit  # noqa: E402
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul  # noqa: E402

ROWS = 256
SHAPES = {"gate_up": (4096, 28672), "down": (14336, 4096)}
# (block_m, block_n, num_warps, num_stages): the tiles timed so far at 256 rows (128 x 128 on
# 8 warps, the tuning table's), then smaller tiles that leave room for more blocks per SM
TILES = ((128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3), (64, 128, 4, 2), (64, 128, 8, 3),
         (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3))

# sm_90 limits per SM (CUDA programming guide, compute capability 9.0)
REGISTERS = 65536
REGISTER_UNIT = 256          # registers are allocated per warp in units of 256
SHARED = 228 * 1024
SHARED_RESERVED = 1024       # per block
MAX_WARPS = 64
MAX_BLOCKS = 32


def tile_config(block_m: int, block_n: int, num_warps: int, num_stages: int):
    """The joined ``dequant_tiles`` tile: 128-row K steps (one group of 128)."""
    return QuantMatmulConfig(block_m=block_m, block_n=block_n, block_k=128, num_warps=num_warps,
                             num_stages=num_stages, joined=True, dequant_tiles=True)


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> dict:
    """Resident blocks per SM allowed by registers, shared memory and warps, and the least."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by = dict(registers=REGISTERS // (per_warp * num_warps),
              shared=SHARED // (shared + SHARED_RESERVED),
              warps=MAX_WARPS // num_warps)
    by["blocks"] = min(min(by.values()), MAX_BLOCKS)
    return by


def main(argv=None) -> None:
    import triton_ir
    a = triton_ir.sass_table_args(__doc__.split("\n\n")[0], argv)
    qc = quant.QuantConfig(bits=4, group_size=128)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, (K, N) in SHAPES.items():
            ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), K, N, qc,
                                                         "bfloat16")
            for bm, bn, warps, stages in TILES:
                cfg = tile_config(bm, bn, warps, stages)
                per_thread = cfg.block_k * cfg.block_n / (32 * warps)
                fn = (lambda x, cfg=cfg, ql=ql: quant_matmul(
                    x, ql.qweight, ql.scales, ql.zeros, bits=4, group_size=128, config=cfg))
                r = triton_ir.try_count_kernel(
                    fn, (jnp.ones((ROWS, K), jnp.bfloat16),), cfg, a.triton_python,
                    os.path.join(d, f"{name}_{bm}x{bn}_{warps}_{stages}.ttir"), per_thread)
                if "error" not in r:
                    r["occupancy"] = blocks_per_sm(r["registers"], r["shared_bytes"], warps)
                rows.append(dict(r, shape=name, config=dataclasses.asdict(cfg)))
                print(name, f"{bm}x{bn} w{warps} s{stages}:",
                      r.get("error") or f"{r['registers']} registers, "
                      f"{r['shared_bytes']} B shared, loop {r['loop_sass']} SASS, "
                      f"{r['occupancy']['blocks']} blocks/SM", flush=True)
    commit = source_commit()
    with open(os.path.join(a.out, f"quant_occupancy_sass_{commit}.json"), "w") as f:
        json.dump(dict(commit=commit, rows_of_x=ROWS, rows=rows), f, indent=1)
    lines = ["# Quantized matmul at 256 rows: blocks per SM in sm_90 SASS (no GPU)\n",
             f"Commit {commit}; `quant_matmul`'s joined `dequant_tiles` path, W4 g128, 128-row "
             "K steps, bfloat16 x, compiled by Triton's compiler on a CPU (not XLA's: read as a "
             "close guide). Loop: the innermost loop's SASS instructions and HGMMA per K step "
             "per thread; blocks per SM from sm_90's register, shared-memory and warp limits. "
             "No timing.\n",
             "| shape | tile (m × n, warps, stages) | registers | spill B | shared KB | "
             "blocks/SM (regs, smem) | warps/SM | loop SASS | HGMMA | SASS per code |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        c = r["config"]
        tile = f"{c['block_m']} × {c['block_n']}, {c['num_warps']}, {c['num_stages']}"
        if "error" in r:
            lines.append(f"| {r['shape']} | {tile} | error: {r['error']} | | | | | | | |")
            continue
        o = r["occupancy"]
        lines.append(f"| {r['shape']} | {tile} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes'] / 1024:.1f} | **{o['blocks']}** ({o['registers']}, "
                     f"{o['shared']}) | {o['blocks'] * c['num_warps']} | {r['loop_sass']} | "
                     f"{r['loop_hgmma']} | {r['loop_sass'] / r['codes_per_thread']:.2f} |")
    with open(os.path.join(a.out, f"quant_occupancy_sass_{commit}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
