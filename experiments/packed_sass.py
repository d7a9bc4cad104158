"""No GPU needed: the packed BSR kernel (``bsr_quant_matmul_packed``) compiled for sm_90 with
and without ``code_zeros``, and on shift-major codes (``code_order="shift_major"``: x read as
given, zero points on the codes), on each Llama-3-8B shape's H100 table tiles: SASS, SASS per
code and registers (``triton_ir.count_kernel``; the ``triton`` package, e.g. in a separate venv
named by ``--triton-python``). It showed ``code_zeros`` taking q/k/v's tiles (256 codes per
thread) to 255 registers (``results/cpu/gqsa/packed_code_zeros_registers_*.md``).

Usage::

    python experiments/packed_sass.py --triton-python /path/to/venv/bin/python [--out DIR]

Writes ``packed_sass_registers.json`` under ``--out`` and prints one line per case.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from optgqa_jax import quant  # noqa: E402
from optgqa_jax.sparse.packed import pack_blocks  # noqa: E402
from optgqa_jax.sparse.synthetic import random_bsr_linear  # noqa: E402
from pallas_kernels.bsr_quant_matmul import (BSRMatmulConfig,  # noqa: E402
                                              bsr_quant_matmul_packed)
from pallas_kernels.quant_codes import reorder_block_words  # noqa: E402

SHAPES = {"gate_up": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144),
          "o": (4096, 4096)}
DEVICE = "NVIDIA H100 80GB HBM3"      # whose tuning-table tiles are compiled


def cases(shapes=SHAPES):
    """(shape, variant, K, x's dtype, config, function of x, codes per thread) for each shape:
    stream codes with code_zeros off and on, then shift-major codes with x in bfloat16 and in
    float32 (x read as given: float32 needs no widening in the kernel), the latter on
    ``BSRMatmulConfig.for_packed``'s tiles for float32 x (q/k/v's halved)."""
    qc = quant.QuantConfig(bits=4, group_size=128)
    for name, (K, N) in shapes.items():
        b = random_bsr_linear(0, K, N, qc, 0.5, "bfloat16")
        tiles = BSRMatmulConfig.for_shape("cuda", 1, b.nnz, K=K, N=N, bits=4, group_size=128,
                                          row_blocks=b.row_blocks, device=DEVICE)
        for variant, order, changes, x_dtype in (
                ("stream", "stream", dict(code_zeros=False), jnp.bfloat16),
                ("stream code_zeros", "stream", dict(code_zeros=True), jnp.bfloat16),
                ("shift_major", "shift_major", dict(raw_x=True, code_zeros=False), jnp.bfloat16),
                ("shift_major float32 x", "shift_major", dict(raw_x=True, code_zeros=False),
                 jnp.float32)):
            codes = (b.codes if order == "stream"
                     else reorder_block_words(b.codes, 4, order))
            packed = pack_blocks(codes, b.scales, b.zeros, b.col_idx)
            cfg = dataclasses.replace(tiles, **changes)
            if x_dtype == jnp.float32:    # the tiles the packed kernel takes for float32 x
                cfg = BSRMatmulConfig.for_packed("cuda", 1, b.nnz, K=K, N=N, bits=4,
                                                 group_size=128, row_blocks=b.row_blocks,
                                                 device=DEVICE, code_order=order,
                                                 x_dtype=x_dtype)
            per_thread = cfg.block_t * 128 / (32 * cfg.num_warps)
            fn = (lambda x, cfg=cfg, b=b, packed=packed, N=N, o=order:
                  bsr_quant_matmul_packed(x, packed, nnz=b.nnz, scale_dtype=b.scales.dtype,
                                          out_features=N, bits=4, group_size=128,
                                          row_blocks=b.row_blocks, code_order=o, config=cfg))
            yield name, variant, K, x_dtype, cfg, fn, per_thread


def main(argv=None) -> None:
    import triton_ir
    a = triton_ir.sass_table_args(__doc__.split("\n\n")[0], argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, variant, K, x_dtype, cfg, fn, per_thread in cases():
            r = triton_ir.try_count_kernel(
                fn, (jnp.ones((1, K), x_dtype),), cfg, a.triton_python,
                os.path.join(d, f"{name}_{variant}.ttir".replace(" ", "_")), per_thread)
            rows.append(dict(r, shape=name, variant=variant, config=dataclasses.asdict(cfg),
                             codes_per_thread=per_thread))
            print(name, variant,
                  r.get("error") or f"SASS {r['sass']}, {r['sass_per_code']:.2f} per code, "
                                    f"{r['registers']} registers", flush=True)
    with open(os.path.join(a.out, "packed_sass_registers.json"), "w") as f:
        json.dump(dict(device_tiles=DEVICE, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
