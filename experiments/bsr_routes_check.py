"""Every route of ``sparse.bsr_matmul`` against float64, on small random BSR layers (one GPU).

For each case (K, N, group size, sparsity, scale dtype, rows M of bfloat16 x), prints the max
error over the output's scale for the routes ``pallas`` (``bsr_quant_matmul``), ``gathered``
(``bsr_gather_quant_matmul``, its default tiles), ``repack`` and ``dequantize``, and for the
block-map kernel on three more tile settings. It found the block-map kernel's wrong sums on
groups whose shift products were shallower than 16 (``MIN_DOT_DEPTH``), compiled on an H100:
``experiments/results/h100/gqsa/gather_shallow_products_{before_7441d8a,after_8accf02}.log``.

Usage::

    python experiments/bsr_routes_check.py > routes.log
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import quant, sparse  # noqa: E402
from optgqa_jax.sparse.synthetic import random_bsr_linear  # noqa: E402
from pallas_kernels import _common as kc  # noqa: E402
from pallas_kernels.bsr_gather_quant_matmul import (BSRGatherConfig,  # noqa: E402
                                                    bsr_gather_quant_matmul)

# (K, N, group size, sparsity): groups of 32 at 4 bits (shift depth 4), 128 (depth 16)
CASES = ((256, 40, 32, 0.25), (256, 64, 32, 0.25), (256, 128, 32, 0.5), (512, 40, 128, 0.25),
         (4096, 4096, 128, 0.5))
GATHER_TILES = {"g_split1": BSRGatherConfig(block_m=16, block_n=64, split_k=1),
                "g_bn16": BSRGatherConfig(block_m=16, block_n=16, split_k=1, num_stages=1),
                "g_bn64_s1stage": BSRGatherConfig(block_m=16, block_n=64, split_k=2,
                                                  num_stages=1)}


def check(rng, K: int, N: int, gs: int, sp: float, scale_dtype: str, M: int) -> dict:
    """{route: max |y - x @ W| / max |x @ W|, or the error's text}."""
    qc = quant.parse_spec(f"w4g{gs}")
    qc = qc.__class__(**{**qc.__dict__, "scale_dtype": scale_dtype})
    b = random_bsr_linear(int(rng.integers(1 << 30)), K, N, qc, sp, "bfloat16")
    x = jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                          (M, K)).astype(jnp.bfloat16)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(
        sparse.dequantize_bsr(b, jnp.float32), np.float64)
    scale = np.abs(want).max()
    runs = {impl: (lambda impl=impl: sparse.bsr_matmul(x, b, impl))
            for impl in ("pallas", "gathered", "repack", "dequantize")}
    runs.update({name: (lambda cfg=cfg: bsr_gather_quant_matmul(
        x, b.codes, b.scales, b.zeros, b.col_idx, b.row_ids, out_features=N, bits=4,
        group_size=gs, config=cfg, interpret=kc.backend() == "cpu")) for name, cfg in GATHER_TILES.items()})
    out = {}
    for name, f in runs.items():
        try:
            y = np.asarray(f(), np.float64)
            out[name] = float(np.abs(y - want).max() / scale) if np.isfinite(y).all() else "NaN"
        except Exception as e:     # report and go on: one route's failure is a finding
            out[name] = f"ERR {type(e).__name__}: {str(e)[:80]}"
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    for K, N, gs, sp in CASES:
        for sd in ("float16", "bfloat16"):
            for M in (2, 3, 16):
                out = check(rng, K, N, gs, sp, sd, M)
                print(f"K={K} N={N} gs={gs} sp={sp} {sd} M={M}: " + ", ".join(
                    f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in out.items()), flush=True)


if __name__ == "__main__":
    main()
