"""Where does the quantized matmul's time go? A ladder of stripped kernels and a device trace.

``pallas_kernels.quant_matmul`` reads 4-bit weights at about a quarter of the copy bandwidth at
one row, and 4- and 8-bit layers take the same time (``experiments/results/h200/quant/``). This
script splits that time, for one weight format and the tiles ``QuantMatmulConfig.for_shape``
picks on the device (its tuning-table entry, else the rules; ``--config`` overrides), on each
Llama-3-8B linear shape:

* ``bf16``: the bfloat16 product ``x @ w`` (the peer);
* ``load``: a kernel with the same grid, tiles, warps and stages that only loads the packed
  words of every K tile and adds them up (int32): what the tiling can stream;
* ``unpack``: as ``load``, and every code turned into a float (``code_floats``, as the real
  kernel does) and summed;
* ``unpack+x``: as ``unpack``, and each code multiplied by its column of x in registers (the
  ``fma`` path) or by the tensor cores (``jnp.dot``), as the config says; no scales or zeros;
* ``full``: ``quant_matmul`` itself, wrapper included (x reordered to shift-major order and
  scaled, partial sums of the K splits added);
* ``full (kernel only)``: the Pallas kernel's own device time in a ``jax.profiler`` trace of
  ``full``, and every other op of that trace (the wrapper's share).

Every rung's own kernel time in a trace is given beside its timed call (``kernel µs``).

Every row is timed with ``optgqa_jax.benchmark.timeit_rotating`` over weight copies that
overflow the L2 cache; ``%`` is the layer's bytes (codes, scales, zeros, x and y) over time,
against the copy ceiling measured in the same run. The stripped kernels skip scales and zeros,
so their bytes are the codes alone.

Usage::

    python experiments/profile_quant.py [--shapes gate_up,o,down,qkv] [--rows 1,16]
        [--format w4g128] [--config '{"block_k": 256, "split_k": 4}'] [--out DIR]

    # and the PTX of every rung, for experiments/ptx_mix.py (instructions per loop):
    XLA_FLAGS=--xla_dump_to=dump python experiments/profile_quant.py --shapes gate_up --rows 1
    python experiments/ptx_mix.py dump --kernel quant

Writes ``profile_quant.{json,md}``. ``--interpret --shape 256x192`` runs a small case on a CPU
(no timings worth reading; it checks that every rung builds and runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import quant  # noqa: E402
from pallas_kernels import compiler_options  # noqa: E402
from pallas_kernels.quant_matmul import (QuantMatmulConfig, code_floats,  # noqa: E402
                                         quant_matmul)
from bench_quant import arg_sets, io_bytes  # noqa: E402
from step_trace import op_table  # noqa: E402
from tune_quant import SHAPES  # noqa: E402

RUNGS = ("load", "unpack", "unpack+x")
# --sweep-load: tiles whose bare load of the codes is timed, in the kernel's layout and in a
# tile-contiguous one (every program's K tiles one after another in memory, as weights
# repacked at load time would be).
SWEEP_BLOCK_N = (64, 128, 256)
SWEEP_BLOCK_K = (256, 1024)
SWEEP_SPLIT = (1, 4)
SWEEP_WARPS = (4, 8)
SWEEP_STAGES = (2, 4)


def tile_major(qweight, block_n: int):
    """int32 [K * bits / 32, N] -> [N / block_n, K * bits / 32, block_n]: each column block's
    words contiguous (the layout a load-time repack would give)."""
    rows, N = qweight.shape
    return qweight.reshape(rows, N // block_n, block_n).transpose(1, 0, 2)


def stripped_matmul(x, qweight, *, bits: int, rung: str, config: QuantMatmulConfig,
                    interpret: bool = False):
    """One rung of the ladder: float32 [split, M, N] partial sums (see the module docstring).

    x [M, K] (K a multiple of block_k, M a multiple of block_m), qweight int32 [K * bits / 32,
    N] (N a multiple of block_n). x is used in stored order: the products are not a matmul's
    (the rows a shift multiplies are not the code's rows), but their cost is.
    """
    M, K = x.shape
    tiled = rung == "load-tiled"      # qweight given as tile_major(qweight, block_n)
    N = qweight.shape[0] * qweight.shape[2] if tiled else qweight.shape[1]
    P = 32 // bits
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    Pk = bk // P
    split = config.split_k
    if K % (bk * split) or N % bn or M % bm:
        raise ValueError(f"shape M={M}, K={K}, N={N} must be whole tiles of {config}")
    steps = K // bk // split
    fma = config.fma

    def kernel(x_ref, qw_ref, o_ref):
        j, s = pl.program_id(1), pl.program_id(2)
        n0 = j * bn

        def body(i, acc):
            k0 = (s * steps + i) * bk
            if tiled:
                words = plgpu.load(qw_ref.at[j, pl.ds(k0 // P, Pk), :])           # [Pk, bn]
            else:
                words = plgpu.load(qw_ref.at[pl.ds(k0 // P, Pk), pl.ds(n0, bn)])  # [Pk, bn]
            if rung in ("load", "load-tiled"):
                return (acc[0] + words.astype(jnp.float32),) + acc[1:]
            hi = words >> 16
            out = list(acc)
            for p in range(P):
                f = code_floats(words, hi, bits, p) - float(2 ** 23)
                if rung == "unpack":
                    out[0] = out[0] + f
                elif fma:
                    for m in range(bm):
                        xm = x_ref[m, pl.ds(k0 + p * Pk, Pk)].astype(jnp.float32)
                        out[m] = out[m] + xm[:, None] * f
                else:
                    xs = x_ref[:, pl.ds(k0 + p * Pk, Pk)]
                    out[0] = out[0] + jnp.dot(xs, f.astype(xs.dtype),
                                              preferred_element_type=jnp.float32)
            return tuple(out)

        dot = rung == "unpack+x" and not fma      # one [bm, bn] accumulator, else [Pk, bn]
        n_acc = bm if (fma and rung == "unpack+x") else 1
        acc = jax.lax.fori_loop(0, steps, body, tuple(
            jnp.zeros((bm if dot else Pk, bn), jnp.float32) for _ in range(n_acc)))
        if dot:
            o_ref[...] = acc[0]
        else:
            for m in range(bm):
                o_ref[pl.ds(m, 1), :] = jnp.sum(acc[m if n_acc > 1 else 0], axis=0,
                                                keepdims=True)

    return pl.pallas_call(
        kernel,
        grid=(M // bm, N // bn, split),
        in_specs=[pl.BlockSpec((bm, K), lambda i, j, s: (i, 0)),
                  pl.BlockSpec(qweight.shape, lambda i, j, s: (0,) * qweight.ndim)],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split, M, N), jnp.float32),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        name=f"profile_quant_{rung.replace('+', '_')}",
    )(x, qweight)


def kernel_share(fn, sets, name_part: str, opts) -> dict:
    """Device µs per call of the ops in a trace of ``timeit_rotating``'s program: the ops whose
    name contains `name_part`, every other op, and the GPU's idle time between them."""
    many = jax.jit(lambda s: [fn(*a) for a in s], compiler_options=opts)
    jax.block_until_ready(many(sets))
    steps = 5
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            out = many(sets)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        tables, timeline = op_table(d, steps * len(sets), top=50)
    if not tables:
        return {}
    key = max(tables, key=lambda k: sum(us for _, us, _ in tables[k]))
    ops = tables[key]
    mine = sum(us for name, us, _ in ops if name_part in name)
    return dict(kernel_us=mine, other_us=sum(us for _, us, _ in ops) - mine,
                idle_us=timeline[key]["idle_ms_per_step"] * 1e3,
                ops=[dict(name=n[:120], us=us, calls=c) for n, us, c in ops])


def profile_case(shape: str, K: int, N: int, M: int, fmt: str, overrides: dict, ceiling: float,
                 interpret: bool) -> dict:
    qc = quant.parse_spec(fmt)
    # the tiles quant.matmul takes on this device: its tuning-table entry, else the rules
    cfg = QuantMatmulConfig.for_shape("cpu" if interpret else "cuda", M, K, N, qc.group_size,
                                      bits=qc.bits,
                                      device=None if interpret else jax.devices()[0].device_kind)
    cfg = dataclasses.replace(cfg, **overrides)
    cfg = dataclasses.replace(cfg, block_m=min(cfg.block_m, max(M, 1 if cfg.fma else 16)))
    opts = {} if interpret else compiler_options()
    key = jax.random.PRNGKey(M + K + N)
    make_sets = ((lambda key, M, K, N, make: [(jax.random.normal(jax.random.fold_in(key, i),
                                                                  (M, K)).astype(jnp.bfloat16),
                                               make(jax.random.fold_in(key, i)))
                                              for i in range(2)])
                 if interpret else arg_sets)   # a CPU check needs no L2 rotation
    qsets = make_sets(key, M, K, N, lambda k: quant.synthetic.random_quantized_linear(
        k, K, N, qc, "bfloat16"))
    one = qsets[0][1]
    T = lambda fn, sets: B.timeit_rotating(fn, sets, compiler_options=opts)
    rows = []

    def add(name, t, nbytes, fn=None, sets=None, part="profile_quant_", **extra):
        if fn is not None and not interpret:   # the kernel's own time in a device trace
            extra["kernel_us"] = kernel_share(fn, sets, part, opts).get("kernel_us")
        rows.append(dict(rung=name, us=t * 1e6, bytes=nbytes,
                         pct_ceiling=100 * nbytes / t / ceiling, **extra))

    if not interpret:
        wbf = arg_sets(key, M, K, N, lambda k: jnp.zeros((K, N), jnp.bfloat16)
                       + jax.random.uniform(k, (), jnp.bfloat16))
        bf16 = lambda x, w: x @ w
        add("bf16", T(bf16, wbf), io_bytes(M, K, N), bf16, wbf, part="")
        del wbf
    Mp = max(M, cfg.block_m)
    code_bytes = one.qweight.size * 4
    for rung in RUNGS:
        sets = [(jnp.pad(x, ((0, Mp - M), (0, 0))), ql.qweight) for x, ql in qsets]
        f = lambda x, q, rung=rung: stripped_matmul(x, q, bits=qc.bits, rung=rung, config=cfg,
                                                    interpret=interpret)
        add(rung, T(f, sets), code_bytes, f, sets)
    sets = [(x, ql.qweight, ql.scales, ql.zeros) for x, ql in qsets]
    full = lambda x, q, s, z: quant_matmul(x, q, s, z, bits=qc.bits, group_size=qc.group_size,
                                           config=cfg, interpret=interpret)
    t_full = T(full, sets)
    nbytes = io_bytes(M, K, N, one)
    share = {} if interpret else kernel_share(full, sets, "optgqa_quant_matmul", opts)
    add("full", t_full, nbytes)
    if share.get("kernel_us"):
        add("full (kernel only)", share["kernel_us"] / 1e6, nbytes,
            wrapper_us=share["other_us"], idle_us=share["idle_us"])
    return dict(shape=shape, M=M, K=K, N=N, format=fmt, copies=len(qsets),
                config=dataclasses.asdict(cfg), rows=rows, trace_ops=share.get("ops"))


def sweep_load(shape: str, K: int, N: int, M: int, fmt: str, ceiling: float,
               interpret: bool, limit: Optional[int] = None) -> list[dict]:
    """Time the bare load of the codes (rungs ``load`` and ``load-tiled``) for every tile
    setting of the SWEEP_* grids that fits the shape; rows sorted by time."""
    qc = quant.parse_spec(fmt)
    opts = {} if interpret else compiler_options()
    key = jax.random.PRNGKey(K + N)
    if interpret:
        qsets = [(jnp.ones((M, K), jnp.bfloat16),
                  quant.synthetic.random_quantized_linear(key, K, N, qc, "bfloat16"))]
    else:
        qsets = arg_sets(key, M, K, N, lambda k: quant.synthetic.random_quantized_linear(
            k, K, N, qc, "bfloat16"))
    code_bytes = qsets[0][1].qweight.size * 4
    T = lambda fn, sets: B.timeit_rotating(fn, sets, compiler_options=opts)
    grid = [(bn, bk, sp, w, st) for bn in SWEEP_BLOCK_N for bk in SWEEP_BLOCK_K
            for sp in SWEEP_SPLIT for w in SWEEP_WARPS for st in SWEEP_STAGES
            if N % bn == 0 and K % (bk * sp) == 0]
    rows = []
    for bn, bk, sp, w, st in grid[:limit]:
        cfg = QuantMatmulConfig(block_m=1, block_n=bn, block_k=bk, split_k=sp, num_warps=w,
                                num_stages=st, fma=True)
        for rung in ("load", "load-tiled"):
            sets = [(x, tile_major(ql.qweight, bn) if rung == "load-tiled" else ql.qweight)
                    for x, ql in qsets]
            f = lambda x, q, rung=rung, cfg=cfg: stripped_matmul(
                x, q, bits=qc.bits, rung=rung, config=cfg, interpret=interpret)
            row = dict(shape=shape, M=M, rung=rung, block_n=bn, block_k=bk, split_k=sp,
                       num_warps=w, num_stages=st)
            try:
                t = T(f, sets)
            except Exception as e:  # a tile the lowering refuses (shared memory, registers)
                rows.append(dict(row, error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            rows.append(dict(row, us=t * 1e6, pct_ceiling=100 * code_bytes / t / ceiling))
    return sorted(rows, key=lambda r: r.get("us", float("inf")))


def _header(res: dict, title: str, note: str) -> list[str]:
    """Title and the run's stamp (device, jax, commit, copy ceiling) for either table."""
    return [f"# {title}", "",
            f"Device {res['device']}, jax {res['jax']}, commit {res['commit']}. Copy ceiling "
            f"{res['ceiling'] / 1e9:,.0f} GB/s. {note}", ""]


def _save(res: dict, out: str, name: str, md) -> None:
    """Rewrite ``<name>.json`` and ``<name>.md`` (``md(res)``) under `out`."""
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md(res))


def sweep_markdown(res: dict) -> str:
    lines = _header(res, "How fast can the tiles stream the codes? (bare loads)",
                    "`load`: the packed words read in the kernel's layout `[K*b/32, N]`; "
                    "`load-tiled`: the same words stored tile-contiguous (`tile_major`). % of "
                    "copy counts the codes' bytes.") + [
             "| shape | M | rung | bn | bk | split | warps | stages | µs | % of copy |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["sweep"]:
        t = (f"{r['us']:.1f} | {r['pct_ceiling']:.0f}%" if "us" in r
             else f"failed: {r['error'][:60]} | ")
        lines.append(f"| {r['shape']} | {r['M']} | {r['rung']} | {r['block_n']} | "
                     f"{r['block_k']} | {r['split_k']} | {r['num_warps']} | {r['num_stages']} "
                     f"| {t} |")
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    lines = _header(res, "Where the quantized matmul's time goes",
                    "Rungs as in `experiments/profile_quant.py`; `load`/`unpack`/`unpack+x` "
                    "count the packed codes only, `bf16`/`full` the whole layer's bytes.") + [
             "| shape | M | format | tiles (bm, bn, bk, split, warps, stages, fma) | rung | µs | "
             "% of copy | kernel µs (trace) |", "| --- | ---: | --- | --- | --- | ---: | ---: "
             "| ---: |"]
    for c in res["cases"]:
        k = c["config"]
        tiles = (f"{k['block_m']}, {k['block_n']}, {k['block_k']}, {k['split_k']}, "
                 f"{k['num_warps']}, {k['num_stages']}, {'yes' if k['fma'] else 'no'}")
        for r in c["rows"]:
            extra = (f" (other ops {r['wrapper_us']:.1f} µs, idle {r['idle_us']:.1f} µs)"
                     if "wrapper_us" in r else "")
            lines.append(f"| {c['shape']} | {c['M']} | {c['format']} | {tiles} | {r['rung']}"
                         f"{extra} | {r['us']:.1f} | {r['pct_ceiling']:.0f}% | "
                         + (f"{r['kernel_us']:.1f} |" if r.get("kernel_us") else "|"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="gate_up,o,down,qkv")
    p.add_argument("--shape", default=None, metavar="KxN", help="one custom shape instead")
    p.add_argument("--rows", default="1,16")
    p.add_argument("--format", default="w4g128")
    p.add_argument("--config", default="{}", help="JSON overrides of the for_shape tiles")
    p.add_argument("--interpret", action="store_true", help="CPU check: interpret mode")
    p.add_argument("--sweep-load", action="store_true",
                   help="instead of the ladder: time the bare load of the codes for a grid of "
                        "tiles, in the kernel's layout and tile-contiguous (one row of x)")
    p.add_argument("--sweep-limit", type=int, default=None, help="at most this many tiles")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quant"))
    a = p.parse_args(argv)
    overrides = json.loads(a.config)
    bad = set(overrides) - {f.name for f in dataclasses.fields(QuantMatmulConfig)}
    if bad:
        raise ValueError(f"--config: unknown fields {sorted(bad)}")
    if a.shape:
        K, N = (int(v) for v in a.shape.lower().split("x"))
        shapes = {a.shape: (K, N)}
    else:
        unknown = set(a.shapes.split(",")) - set(SHAPES)
        if unknown:
            raise ValueError(f"--shapes: {sorted(unknown)} not among {sorted(SHAPES)}")
        shapes = {s: SHAPES[s] for s in a.shapes.split(",")}
    os.makedirs(a.out, exist_ok=True)
    ceiling = 1.0 if a.interpret else B.copy_bandwidth()
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
               commit=B.source_commit(), ceiling=ceiling, cases=[])
    if a.sweep_load:
        res["sweep"] = []
        for shape, (K, N) in shapes.items():
            res["sweep"] = sorted(res["sweep"] + sweep_load(
                shape, K, N, 1, a.format, ceiling, a.interpret, a.sweep_limit),
                key=lambda r: (r["shape"], r.get("us", float("inf"))))
            best = next(r for r in res["sweep"] if r["shape"] == shape)
            print(f"{shape}: best bare load {best.get('us', float('nan')):.1f} us "
                  f"({best.get('pct_ceiling', 0):.0f}% of copy), {best['rung']} "
                  f"bn {best['block_n']} bk {best['block_k']} split {best['split_k']} "
                  f"warps {best['num_warps']} stages {best['num_stages']}", flush=True)
            _save(res, a.out, "profile_quant_sweep", sweep_markdown)
        return
    for M in (int(r) for r in a.rows.split(",")):
        for shape, (K, N) in shapes.items():
            case = profile_case(shape, K, N, M, a.format, overrides, ceiling, a.interpret)
            res["cases"].append(case)
            print("\n".join(f"{shape} M={M} {r['rung']}: {r['us']:.1f} us "
                            f"({r['pct_ceiling']:.0f}% of copy)" for r in case["rows"]),
                  flush=True)
            _save(res, a.out, "profile_quant", markdown)


if __name__ == "__main__":
    main()
