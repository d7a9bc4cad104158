"""How much of a timed call is the kernel, and how much the gaps between kernels?

``profile_quant.py`` found, in a device trace of ``timeit_rotating``'s program, the quantized
gate/up kernel busy for 43 µs of a 63 µs call, and the bfloat16 product timed at 89 µs where its
bytes at the copy ceiling need 55 µs. This script times a few ops on the Llama-3-8B gate/up
shape (4096 x 28672, one row of x) in several ways and prints them side by side:

* ``rotating``: ``optgqa_jax.benchmark.timeit_rotating`` as the benchmarks use it, for a few
  numbers of weight copies per program and of programs per timed batch;
* ``trace``: the op's own device time in a ``jax.profiler`` trace of that program, and the
  GPU's idle time between kernels, per call;
* ``chain``: ``n`` calls in one program, each call's input depending on the previous call's
  output (as consecutive layers do), timed per call.

Ops: ``bf16`` (``x @ w``, the peer), ``xla-sum`` (XLA's column sum of the int32 codes: a
read-only pass over the same bytes), ``load`` (the Pallas bare load of the codes,
``profile_quant.stripped_matmul``, the fastest tiles of the load sweep), ``w4g128``
(``quant_matmul``, default tiles) and ``w4g128-wide`` (``quant_matmul`` on tiles like the
bare load's).

Run it twice to see what XLA command buffers (CUDA graphs) change::

    python experiments/timing_gaps.py --out DIR --label plain
    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL \\
        python experiments/timing_gaps.py --out DIR --label graphs

Writes ``timing_gaps_<label>.{json,md}``. ``--interpret`` runs a tiny case on a CPU (checks
that every path runs; no timings worth reading).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import quant  # noqa: E402
from pallas_kernels import compiler_options  # noqa: E402
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul  # noqa: E402
from profile_quant import kernel_share, stripped_matmul  # noqa: E402

LOAD_TILES = dict(block_m=1, block_n=128, block_k=1024, split_k=4, num_warps=8, num_stages=2,
                  fma=True)   # the fastest bare load of the aadfc42 sweep on gate/up


def make_ops(K: int, N: int, interpret: bool):
    """name -> (make_args(key) -> tuple, fn(*args) -> [1, N]-ish array, bytes read per call)."""
    qc = quant.parse_spec("w4g128")
    load_cfg = QuantMatmulConfig(**LOAD_TILES)
    if interpret:
        load_cfg = dataclasses.replace(load_cfg, block_n=64, block_k=128, split_k=1)

    def x_of(k):
        return jax.random.normal(k, (1, K)).astype(jnp.bfloat16)

    def ql_of(k):
        return quant.synthetic.random_quantized_linear(k, K, N, qc, "bfloat16")

    ops = {
        "bf16": (lambda k: (x_of(k), (0.02 * jax.random.normal(k, (K, N))).astype(jnp.bfloat16)),
                 lambda x, w: x @ w, K * N * 2),
        "xla-sum": (lambda k: (x_of(k), ql_of(k).qweight),
                    lambda x, q: jnp.sum(q, axis=0, keepdims=True).astype(jnp.float32)
                    + x[:, :1].astype(jnp.float32), K * N // 2),
        "load": (lambda k: (x_of(k), ql_of(k).qweight),
                 lambda x, q: stripped_matmul(x, q, bits=4, rung="load", config=load_cfg,
                                              interpret=interpret).sum(0), K * N // 2),
        "w4g128": (lambda k: (x_of(k), *(lambda ql: (ql.qweight, ql.scales, ql.zeros))(ql_of(k))),
                   lambda x, q, s, z: quant_matmul(x, q, s, z, bits=4, group_size=128,
                                                   interpret=interpret),
                   K * N // 2 + K // 128 * N * 3),
    }
    # the same product on wider tiles (those of the fastest bare loads, block_k halved for
    # the registers of the multiply-add accumulators)
    wide = QuantMatmulConfig(**dict(LOAD_TILES, block_k=512))
    if interpret:
        wide = load_cfg
    make_w4, _, w4_bytes = ops["w4g128"]
    ops["w4g128-wide"] = (make_w4, lambda x, q, s, z: quant_matmul(
        x, q, s, z, bits=4, group_size=128, interpret=interpret, config=wide), w4_bytes)
    return ops


def chained(fn, sets, opts):
    """One program calling fn on every set in turn, each x nudged by the previous output."""
    def run(sets):
        carry = jnp.zeros((), jnp.float32)
        for args in sets:
            x = args[0] + (carry * 0).astype(args[0].dtype)
            y = fn(x, *args[1:])
            carry = y.reshape(-1)[0].astype(jnp.float32)
        return carry
    return jax.jit(run, compiler_options=opts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", default="plain")
    p.add_argument("--copies", default="2,8,16")
    p.add_argument("--iters", default="3,20")
    p.add_argument("--ops", default="bf16,xla-sum,load,w4g128,w4g128-wide")
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quant"))
    a = p.parse_args(argv)
    K, N = (256, 256) if a.interpret else (4096, 28672)
    copies = [2] if a.interpret else [int(c) for c in a.copies.split(",")]
    iters = [1] if a.interpret else [int(i) for i in a.iters.split(",")]
    opts = {} if a.interpret else compiler_options()
    ceiling = 1.0 if a.interpret else B.copy_bandwidth()
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
               commit=B.source_commit(), label=a.label, ceiling=ceiling,
               xla_flags=os.environ.get("XLA_FLAGS", ""), K=K, N=N, rows=[])
    os.makedirs(a.out, exist_ok=True)
    for name, (make, fn, nbytes) in make_ops(K, N, a.interpret).items():
        if name not in a.ops.split(","):
            continue
        sets = [make(jax.random.PRNGKey(i)) for i in range(max(copies))]
        for c in copies:
            many = jax.jit(lambda s: [fn(*args) for args in s], compiler_options=opts)
            for it in iters:
                t = B.timeit(many, sets[:c], iters=it, trials=3) / c
                res["rows"].append(dict(op=name, how="rotating", copies=c, iters=it,
                                        us=t * 1e6, pct=100 * nbytes / t / ceiling))
            if not a.interpret and c == max(copies):
                part = {"bf16": "", "xla-sum": "reduce", "load": "profile_quant",
                        "w4g128": "optgqa_quant_matmul", "w4g128-wide": "optgqa_quant_matmul"}[name]
                share = kernel_share(fn, sets[:c], part, opts)   # "": every op is the op
                if share:
                    res["rows"].append(dict(op=name, how="trace", copies=c,
                                            op_us=share["kernel_us"], other_us=share["other_us"],
                                            idle_us=share["idle_us"], ops=share["ops"][:6]))
        ch = chained(fn, sets, opts)
        t0 = time.perf_counter()
        t = B.timeit(ch, sets, iters=max(iters), trials=3) / len(sets)
        res["rows"].append(dict(op=name, how="chain", copies=len(sets), iters=max(iters),
                                us=t * 1e6, pct=100 * nbytes / t / ceiling,
                                wall_s=time.perf_counter() - t0))
        for r in res["rows"]:
            if r["op"] == name:
                print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                       if k != "ops"}, flush=True)
        del sets
        _save(res, a.out)


def _save(res: dict, out: str) -> None:
    path = os.path.join(out, f"timing_gaps_{res['label']}")
    with open(path + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Per-call time against kernel time ({res['label']})", "",
             f"Device {res['device']}, jax {res['jax']}, commit {res['commit']}, XLA_FLAGS "
             f"`{res['xla_flags'] or '(none)'}`. Gate/up {res['K']}x{res['N']}, one row. Copy "
             f"ceiling {res['ceiling'] / 1e9:,.0f} GB/s.", "",
             "| op | how | copies | iters | µs per call | % of copy | trace: op µs | other µs "
             "| idle µs |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        if r["how"] == "trace":
            lines.append(f"| {r['op']} | trace | {r['copies']} | | | | {r['op_us']:.1f} | "
                         f"{r['other_us']:.1f} | {r['idle_us']:.1f} |")
        else:
            lines.append(f"| {r['op']} | {r['how']} | {r['copies']} | {r['iters']} | "
                         f"{r['us']:.1f} | {r['pct']:.0f}% | | | |")
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
