"""No GPU needed: the row-block W4S50 kernel (``pallas_kernels.row_block_quant_matmul``)
against the dense W4 kernel, both compiled for sm_90 by Triton (``triton_ir.count_kernel``; the
``triton`` package, e.g. in a separate venv named by ``--triton-python``), on the H100 table's
one-row tiles for the full K with ``block_n`` capped at the block and 1, 2 or the table's
warps: SASS instructions, SASS per code of one K step per thread (the whole kernel's count
over ``block_k * block_n / threads``) and registers.

    python experiments/row_block_sass.py --triton-python /path/to/venv/bin/python --out DIR
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
from optgqa_jax.sparse.synthetic import random_row_block_linear  # noqa: E402
from optgqa_jax.timing import source_commit  # noqa: E402
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul  # noqa: E402
from pallas_kernels.row_block_quant_matmul import row_block_quant_matmul  # noqa: E402

DEVICE = "NVIDIA H100 80GB HBM3"      # whose tuning-table tiles are compiled
SHAPES = {"gate_up": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144),
          "o": (4096, 4096)}


def cases(blocks=(16, 32, 64)):
    qc = quant.QuantConfig(bits=4, group_size=128)
    for name, (K, N) in SHAPES.items():
        dense = QuantMatmulConfig.for_shape("cuda", 1, K, N, 128, bits=4, device=DEVICE)
        ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), K, N, qc,
                                                     "bfloat16")
        yield name, K, "dense w4g128", dense, (
            lambda x, cfg=dense, ql=ql: quant_matmul(x, ql.qweight, ql.scales, ql.zeros, bits=4,
                                                     group_size=128, config=cfg))
        for B in blocks:
            rb = random_row_block_linear(0, K, N, qc, 0.5, B, "bfloat16")
            for nw in sorted({1, 2, dense.num_warps}):
                cfg = dataclasses.replace(dense, block_n=min(dense.block_n, B), num_warps=nw)
                yield name, K, f"w4g128s50rb{B}", cfg, (
                    lambda x, cfg=cfg, rb=rb: row_block_quant_matmul(
                        x, rb.qweight, rb.scales, rb.zeros, rb.group_map, bits=4,
                        group_size=128, row_block=rb.row_block, config=cfg))


def main(argv=None) -> None:
    import triton_ir
    a = triton_ir.sass_table_args(__doc__.split("\n\n")[0], argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, K, fmt, cfg, fn in cases():
            per_thread = cfg.block_k * cfg.block_n / (32 * cfg.num_warps)
            r = triton_ir.try_count_kernel(
                fn, (jnp.ones((1, K), jnp.bfloat16),), cfg, a.triton_python,
                os.path.join(d, f"{name}_{fmt}_{cfg.num_warps}.ttir"), per_thread)
            rows.append(dict(r, shape=name, format=fmt, config=dataclasses.asdict(cfg)))
            print(name, fmt, f"block_n {cfg.block_n} warps {cfg.num_warps}:",
                  r.get("error") or f"SASS {r['sass']}, {r['sass_per_code']:.2f} per code, "
                                    f"{r['registers']} registers", flush=True)
    commit = source_commit()
    with open(os.path.join(a.out, f"row_block_sass_{commit}.json"), "w") as f:
        json.dump(dict(device_tiles=DEVICE, commit=commit, rows=rows), f, indent=1)
    lines = ["# Row-block W4S50 against dense W4 in sm_90 SASS (no GPU)\n",
             f"Commit {commit}; Triton's compiler on a CPU (not XLA's: read as a close guide); "
             f"tiles: the {DEVICE} table's one-row entry for the full K, `block_n` capped at "
             "the block. Per code: the whole kernel's SASS over one K step's codes per thread.\n",
             "| shape | format | block_n | warps | SASS | per code | registers |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        c = r["config"]
        lines.append(f"| {r['shape']} | {r['format']} | {c['block_n']} | {c['num_warps']} | "
                     + (f"{r['sass']} | {r['sass_per_code']:.2f} | {r['registers']} |"
                        if "sass" in r else f"error: {r['error']} | | |"))
    with open(os.path.join(a.out, f"row_block_sass_{commit}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
