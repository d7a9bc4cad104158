"""Which tensor-core operand the dequantized weights should be: sm_90 SASS of three forms.

The quantized matmul's tensor-core paths dequantize a weight tile in registers and multiply it
as the B operand of ``x @ W``. Where Triton picks Hopper's wgmma (64 rows of x per program and
more; at 16 it uses ``mma.sync``, whose operands both come from registers), only the A operand
may come from registers, so a B operand built in registers is stored to shared memory first.
This probe compiles a minimal
K loop (4-bit codes as bfloat16 bit patterns, ``pallas_kernels.quant_codes.pattern_codes``,
P shift-by-shift products of depth ``128 / P`` per K step) in three forms, without a GPU:

* ``B``: ``y = x @ W`` with W [K/P words, N] as stored (the current orientation);
* ``A``: ``y^T = W^T x^T``, the tile transposed in the kernel (``.T`` of the codes);
* ``AT``: the same with the words stored transposed, [N, K/P] (a load-time repack).

It prints, per form, the SASS instructions of the kernel, the wgmma (HGMMA), shared-memory
stores (STS/STSM), ldmatrix (LDSM) and barriers (BAR), from the ``triton`` package of
``--triton-python`` (see ``experiments/triton_ir.py``). Counts, not times.

Usage: python experiments/operand_a_sass.py --triton-python /path/to/python [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from pallas_kernels.quant_codes import pattern_codes  # noqa: E402
from triton_ir import capture_ttir, compile_ttir, sass_op_counts, triton_version  # noqa: E402
from optgqa_jax.timing import source_commit  # noqa: E402

FORMS = ("B", "A", "AT")


def probe(form: str, *, K: int = 4096, N: int = 4096, bn: int = 128, bm: int = 64,
          bits: int = 4, block_k: int = 128, num_warps: int = 4, num_stages: int = 3):
    """(kernel, args): the minimal K loop of one form (``FORMS``); x^T [K, bm] arrives with
    each K tile's columns in shift-major order, as the quantized kernel's wrapper puts them."""
    P = 32 // bits
    Pk = block_k // P

    def kernel(xt_ref, qw_ref, o_ref):
        j = pl.program_id(0)

        def body(i, acc):
            if form == "AT":
                words = qw_ref[pl.ds(j * bn, bn), pl.ds(i * Pk, Pk)]          # [bn, Pk]
            else:
                words = qw_ref[pl.ds(i * Pk, Pk), pl.ds(j * bn, bn)]          # [Pk, bn]
            pc = pattern_codes(words, bits, jnp.bfloat16)
            for p in range(P):
                xt = xt_ref[pl.ds(i * block_k + p * Pk, Pk), :]               # [Pk, bm]
                if form == "AT":
                    part = jnp.dot(pc[p], xt, preferred_element_type=jnp.float32)
                elif form == "A":
                    part = jnp.dot(pc[p].T, xt, preferred_element_type=jnp.float32)
                else:
                    part = jnp.dot(xt.T, pc[p], preferred_element_type=jnp.float32).T
                acc = acc + part                                              # [bn, bm]
            return acc

        acc = jax.lax.fori_loop(0, K // block_k, body, jnp.zeros((bn, bm), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    def f(xt, qw):
        return pl.pallas_call(
            kernel, grid=(N // bn,),
            in_specs=[pl.BlockSpec((K, bm), lambda j: (0, 0)),
                      pl.BlockSpec(qw.shape, lambda j: (0, 0))],
            out_specs=pl.BlockSpec((bn, bm), lambda j: (j, 0)),
            out_shape=jax.ShapeDtypeStruct((N, bm), jnp.bfloat16),
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        )(xt, qw)

    qw_shape = (N, K // P) if form == "AT" else (K // P, N)
    return f, (jax.ShapeDtypeStruct((K, bm), jnp.bfloat16),
               jax.ShapeDtypeStruct(qw_shape, jnp.int32))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--triton-python", required=True,
                   help="a Python interpreter with the triton package")
    p.add_argument("--out", default=None, help="write the counts as JSON here")
    a = p.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for form in FORMS:
            f, args = probe(form)
            path = os.path.join(tmp, f"{form}.ttir")
            with open(path, "w") as fh:
                fh.write(capture_ttir(f, *args)[0])
            out = compile_ttir(path, 4, 3, a.triton_python)
            ops = sass_op_counts(out["sass"])
            rows[form] = dict(sass=sum(ops.values()),
                              **{k: ops.get(k, 0) for k in ("HGMMA", "STS", "STSM", "LDSM",
                                                            "BAR")})
            print(form, rows[form])
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(commit=source_commit(), triton=triton_version(a.triton_python),
                           jax=jax.__version__, forms=rows), fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
