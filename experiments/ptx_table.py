"""PTX per code of ``quant_matmul``'s K loop, path by path, on a machine without a GPU.

For each case (a Llama-3-8B linear shape, a row count M, a weight format and tiles) this
captures the Triton module that Pallas lowers, compiles it for sm_90 with a Python that has
the ``triton`` package (``experiments/triton_ir.py``; Triton's first stage included, as XLA
runs it) and reports the innermost loop: PTX and SASS instructions per code (a code is one weight; the
loop's instructions over the codes one thread handles per K step; SASS from the ``ptxas`` and
``cuobjdump`` that the triton package bundles), int-to-float conversions per code
(quarter-rate instructions on NVIDIA GPUs, see ``ptx_mix.I2F``), registers per thread and the
most frequent opcodes. It counts instructions, not time: read it as a guide to which
path does less work per code, to be timed on a GPU (``experiments/tune_quant.py``).

Usage::

    python experiments/ptx_table.py --triton-python /path/to/python-with-triton
        [--out experiments/results/cpu/quant]

Writes ``ptx_per_code.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import quant  # noqa: E402
from optgqa_jax.benchmark import source_commit  # noqa: E402
from pallas_kernels.quant_matmul import QuantMatmulConfig, k_tiles, quant_matmul  # noqa: E402
import triton_ir  # noqa: E402

SHAPES = {"gate_up": (4096, 28672), "down": (14336, 4096)}
JOINED = dict(joined=True, fma=False)
# the shift-by-shift tensor-core path, whatever the rules pick at that row count
SHIFTS = dict(joined=False, fma=False, dequant_tiles=False)
# the 64- and 256-row tiles of the first counts (the rules of 1bf58ad), kept for comparison
TILES64 = dict(block_m=64, block_n=128, block_k=128, split_k=8, num_warps=4)
TILES256 = dict(block_m=128, block_n=128, block_k=128, split_k=1, num_warps=8)
JOINED_ROW = dict(block_m=16, block_n=64, block_k=128, num_warps=4, **JOINED)

# (shape, M, format, overrides of QuantMatmulConfig.for_shape)
CASES = (
    ("gate_up", 1, "w4g128", {}),
    ("down", 1, "w4g128", {}),
    ("gate_up", 1, "w8", {}),
    ("gate_up", 1, "w4g128", dict(raw_x=True)),
    ("down", 1, "w4g128", dict(raw_x=True)),
    ("gate_up", 1, "w4g128", dict(block_n=128, block_k=512)),
    ("gate_up", 1, "w4g128", JOINED_ROW),
    ("gate_up", 1, "w4g128", dict(JOINED_ROW, block_n=256)),
    ("gate_up", 16, "w4g128", {}),
    ("gate_up", 16, "w4g128", JOINED),
    ("gate_up", 16, "w4g128", dict(block_n=256, **JOINED)),
    ("gate_up", 16, "w8", JOINED),
    ("gate_up", 64, "w4g128", dict(SHIFTS, **TILES64)),
    ("gate_up", 64, "w4g128", dict(dequant_tiles=False, **JOINED, **TILES64)),
    ("gate_up", 64, "w4g128", dict(dequant_tiles=True, **JOINED, **TILES64)),
    ("gate_up", 256, "w4g128", dict(SHIFTS, **TILES256)),
    ("gate_up", 256, "w4g128", dict(dequant_tiles=False, **JOINED, **TILES256)),
    ("gate_up", 256, "w4g128", dict(dequant_tiles=True, **JOINED, **TILES256)),
)


def path_name(cfg: QuantMatmulConfig, joined_runs: bool, bits: int) -> str:
    """The kernel path a config takes for bfloat16 x."""
    if cfg.fma:
        return "register (fma)" + (", x as given" if cfg.raw_x else "")
    if not joined_runs:
        return "shift-by-shift dots"
    codes = "bit patterns" if bits in (2, 4) else "converted codes"
    return f"joined, {codes}" + (", tiles dequantized" if cfg.dequant_tiles else "")


def run_case(shape: str, M: int, fmt: str, overrides: dict, python: str, workdir: str) -> dict:
    K, N = SHAPES[shape]
    qc = quant.parse_spec(fmt)
    cfg = dataclasses.replace(QuantMatmulConfig.for_shape("cuda", M, K, N, qc.group_size),
                              **overrides)
    cfg.validate()
    block_k, tile_k, joined_runs = k_tiles(cfg, K, qc.bits, qc.group_size, False)
    ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), K, N, qc, "bfloat16")
    x = jnp.ones((M, K), jnp.bfloat16)
    texts = triton_ir.capture_ttir(lambda x, q, s, z: quant_matmul(
        x, q, s, z, bits=qc.bits, group_size=qc.group_size, config=cfg),
        x, ql.qweight, ql.scales, ql.zeros)
    path = os.path.join(workdir, f"{shape}_{M}_{fmt}_{len(os.listdir(workdir))}.ttir")
    with open(path, "w") as f:
        f.write(texts[0])
    out = triton_ir.compile_ttir(path, cfg.num_warps, cfg.num_stages, python)
    summary = triton_ir.summarize(out["ttgir"], out["ptx"], out["sass"], out["res"])
    loop = summary["loops"][-1]
    sass = summary["sass_loops"][-1] if summary["sass_loops"] else None
    per_thread = block_k * cfg.block_n // (32 * cfg.num_warps)
    top = loop["top"]
    matrix = sum(v for k, v in top.items() if k.startswith(("mma.", "wgmma.")))
    return dict(shape=shape, K=K, N=N, M=M, format=fmt, config=dataclasses.asdict(cfg),
                path=path_name(cfg, joined_runs, qc.bits), block_k=block_k, tile_k=tile_k,
                loop_ptx=loop["count"], codes_per_thread_step=per_thread,
                ptx_per_code=loop["count"] / per_thread,
                int_to_float_per_code=loop["int_to_float"] / per_thread,
                matrix_instructions=matrix, top=top, registers=summary["registers"],
                stack_bytes=summary["stack_bytes"],
                sass_loop=sass and sass["count"],
                sass_per_code=sass and sass["count"] / per_thread,
                sass_int_to_float_per_code=sass and sass["int_to_float"] / per_thread,
                sass_top=sass and sass["top"])


def markdown(res: dict) -> str:
    lines = ["# Quantized matmul: PTX instructions per code in the K loop", "",
             f"Triton {res['triton']} compiling for sm_90, on a machine without a GPU, the "
             f"Triton modules that Pallas (jax {res['jax']}) lowers for `quant_matmul` at "
             f"commit {res['commit']} ({res['date']}; `experiments/ptx_table.py`). Triton's "
             "first stage (canonicalization, the dot + add combine, CSE) runs as in XLA. XLA "
             "compiles these modules with its own Triton, so read the counts as a close guide, "
             "not as the code XLA runs. A code is one weight; `PTX / code` = instructions of "
             "the innermost loop / codes one thread handles per K step; `I2F / code` = "
             "int-to-float conversions per code (16 results per clock per SM on compute "
             "capability 9.0, against 64 for integer logic and 128 for float32 FMA). No GPU "
             "ran these: they count instructions, not time.", "",
             "| shape | M | format | path | tiles (bm, bn, bk, split, warps) | registers "
             "(stack bytes) | "
             "codes / thread / step | PTX / code | SASS / code | I2F / code (SASS) | "
             "top SASS instructions |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in res["rows"]:
        c = r["config"]
        tiles = (f"{c['block_m']}, {c['block_n']}, {r['block_k']}, {c['split_k']}, "
                 f"{c['num_warps']}")
        top = ", ".join(f"{k} {v}" for k, v in list((r["sass_top"] or {}).items())[:7])
        na = lambda v: "–" if v is None else f"{v:.2f}"
        lines.append(f"| {r['shape']} | {r['M']} | {r['format']} | {r['path']} | {tiles} | "
                     f"{r['registers'] or '–'} ({r['stack_bytes']}) | "
                     f"{r['codes_per_thread_step']} | "
                     f"{r['ptx_per_code']:.2f} | {na(r['sass_per_code'])} | "
                     f"{na(r['sass_int_to_float_per_code'])} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--triton-python", required=True,
                   help="a Python interpreter with the triton package")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu",
                                                 "quant"))
    a = p.parse_args(argv)
    import subprocess
    version = subprocess.run([a.triton_python, "-c", "import triton; print(triton.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    res = dict(triton=version, jax=jax.__version__, commit=source_commit(),
               date=datetime.date.today().isoformat(), rows=[])
    with tempfile.TemporaryDirectory() as work:
        for shape, M, fmt, overrides in CASES:
            row = run_case(shape, M, fmt, overrides, a.triton_python, work)
            res["rows"].append(row)
            print(f"{shape} M={M} {fmt} {row['path']}: {row['ptx_per_code']:.2f} PTX/code, "
                  f"{row['sass_per_code']} SASS/code, {row['sass_int_to_float_per_code']} "
                  f"I2F/code, {row['registers']} registers", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "ptx_per_code.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "ptx_per_code.md"), "w") as f:
        f.write(markdown(res))


if __name__ == "__main__":
    main()
