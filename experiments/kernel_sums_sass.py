"""sm_90 SASS of the one-row gate/up W4 g128 product (the H100 table's tiles: 64 x 512, split 8,
4 warps) under the register path's options that decide what the wrapper does around the
kernel: ``wrapper_sums`` (x's sums from a reduce in the wrapper), ``kernel_sums`` (from the
kernel), ``raw_x`` (x read as given: no shift-major copy), each with ``runtime_magic``.
Compiled without a GPU through ``experiments/triton_ir.py`` (a Python with the ``triton``
package). Counts, not times.

Usage::

    python experiments/kernel_sums_sass.py /path/to/python-with-triton [OUT.json]
"""
import dataclasses
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import jax
import jax.numpy as jnp
import triton_ir
from optgqa_jax import quant
from optgqa_jax.benchmark import source_commit
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
K, N = 4096, 28672
qc = quant.parse_spec("w4g128")
ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), K, N, qc, "bfloat16")
x = jnp.ones((1, K), jnp.bfloat16)
base = QuantMatmulConfig(block_m=1, block_n=64, block_k=512, split_k=8, num_warps=4, num_stages=3, fma=True)
variants = {
  "rm+ws (table)": dict(runtime_magic=True, wrapper_sums=True),
  "rm": dict(runtime_magic=True),
  "rm+ks": dict(runtime_magic=True, kernel_sums=True),
  "rm+ks+raw_x": dict(runtime_magic=True, kernel_sums=True, raw_x=True),
  "rm+raw_x": dict(runtime_magic=True, raw_x=True),
  "rm+ws+raw_x": dict(runtime_magic=True, wrapper_sums=True, raw_x=True),
}
wd = tempfile.mkdtemp()
per_thread = 512 * 64 / 128
out = {}
for name, kw in variants.items():
    cfg = dataclasses.replace(base, **kw)
    r = triton_ir.count_kernel(lambda x, q, s, z: quant_matmul(x, q, s, z, bits=4, group_size=128, config=cfg),
                               (x, ql.qweight, ql.scales, ql.zeros), cfg.num_warps, cfg.num_stages,
                               sys.argv[1], os.path.join(wd, name.replace('+','_').replace(' ','') + ".ttir"), per_thread)
    out[name] = r
    print(f"{name:16s} SASS {r['sass']:5d} per code {r['sass_per_code']:.2f} regs {r['registers']} top {r['top']}", flush=True)
if len(sys.argv) > 2:
    with open(sys.argv[2], "w") as f:
        json.dump(dict(commit=source_commit(), triton="3.9.0 (sm_90)", shape=[K, N],
                       tiles=dataclasses.asdict(base), codes_per_thread=per_thread,
                       variants=out), f, indent=1)
