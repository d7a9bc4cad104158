"""The Triton IR of the quantized matmul, and what Triton's own compiler makes of it.

XLA compiles the Triton modules of Pallas calls internally and does not dump their PTX, so this
script captures the module that Pallas lowers (``.ttir``, written on any machine: the lowering
for CUDA runs through ``jax.export``) and, given a Python with the ``triton`` package
(``--triton-python``; a CPU machine will do, e.g. a venv with ``pip install triton``), compiles
it with Triton for sm_90 to see the layouts Triton chooses (``.ttgir``: every
``convert_layout`` is a round trip through shared memory with barriers) and the PTX (its
instruction mix per loop, by ``experiments/ptx_mix.py``).

Usage::

    python experiments/triton_ir.py --out DIR [--shape 4096x28672] [--rows 1]
        [--format w4g128] [--config '{"block_n": 128}'] [--rungs load,unpack,unpack+x,full]

Writes ``DIR/<rung>.ttir`` and, with ``triton``, ``DIR/<rung>.{ttgir,ptx}`` and
``DIR/triton_ir.json`` (per rung: layout conversions, shared-memory allocations, barriers and
the instruction mix of the K loop). Triton's compiler is not XLA's, so read the result as a
close guide, not as the exact code XLA runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import quant  # noqa: E402
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul  # noqa: E402
from profile_quant import RUNGS, stripped_matmul  # noqa: E402
import ptx_mix  # noqa: E402


def capture_ttir(fn, *args) -> list[str]:
    """The Triton modules (generic MLIR text) of every Pallas call in ``fn(*args)``, lowered
    for CUDA."""
    from jax._src.pallas.triton import lowering

    texts, original = [], lowering.lower_jaxpr_to_triton_module

    def spy(*a, **k):
        result = original(*a, **k)
        texts.append(result.module.operation.get_asm(print_generic_op_form=True))
        return result

    lowering.lower_jaxpr_to_triton_module = spy
    try:
        jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    return texts


# triton.compile skips the first stage's passes for an IR file (make_ttir: inlining,
# canonicalization, the combine patterns such as dot + add into one accumulating dot, CSE,
# loop unrolling). XLA runs that stage on the modules of Pallas calls, so run it here too,
# ahead of make_ttgir; always compile, since Triton's cache keys on the source alone.
_COMPILE = """
import sys, triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
knobs.compilation.always_compile = True
_add_stages = CUDABackend.add_stages
def add_stages(self, stages, options, language):
    _add_stages(self, stages, options, language)
    ttir, ttgir = stages["ttir"], stages["ttgir"]
    stages["ttgir"] = lambda src, metadata: ttgir(ttir(src, metadata), metadata)
CUDABackend.add_stages = add_stages
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps, num_stages=stages))
for ext in ("ttgir", "ptx"):
    open(path[:-5] + "." + ext, "w").write(k.asm[ext])
open(path[:-5] + ".shared", "w").write(str(k.metadata.shared))   # dynamic shared memory, bytes
open(path[:-5] + ".cubin", "wb").write(k.asm["cubin"])
import os, subprocess
import triton.backends.nvidia as nv
tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
for flag, ext in (("-sass", "sass"), ("-res-usage", "res")):
    out = subprocess.run([tool, flag, path[:-5] + ".cubin"], capture_output=True, text=True)
    open(path[:-5] + "." + ext, "w").write(out.stdout if out.returncode == 0 else "")
"""


def compile_ttir(path: str, num_warps: int, num_stages: int, python: str) -> dict:
    """Compile a .ttir file for sm_90 with the triton package of interpreter `python` (in its
    own process: Triton's MLIR and jaxlib's do not share one). No GPU is needed.
    Returns {'ttgir', 'ptx', 'sass', 'res'} texts (SASS and resource usage from the
    package's ``cuobjdump``; empty where it failed) and 'shared' (the dynamic shared memory
    a block asks for, bytes); raises ImportError without triton."""
    probe = subprocess.run([python, "-c", "import triton"], capture_output=True)
    if probe.returncode:
        raise ImportError(f"{python} has no triton package")
    run = subprocess.run([python, "-c", _COMPILE, path, str(num_warps), str(num_stages)],
                         capture_output=True, text=True,
                         env=dict(os.environ, TRITON_DEFAULT_FP_FUSION="1"))
    if run.returncode:
        raise RuntimeError(run.stderr[-1500:])
    out = {ext: open(path[:-5] + "." + ext).read() for ext in ("ttgir", "ptx", "sass", "res")}
    out["shared"] = int(open(path[:-5] + ".shared").read())
    return out


def triton_version(python: str):
    """The triton package version of interpreter `python`, or None without the package."""
    run = subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                         capture_output=True, text=True)
    return run.stdout.strip() or None


def sass_op_counts(sass: str) -> collections.Counter:
    """Instructions of a SASS text by opcode (first dot-separated part), the whole kernel."""
    return collections.Counter(m.split(".")[0] for m in re.findall(
        r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\d\s+)?([A-Z0-9_.]+)", sass, re.M))


def count_kernel(fn, args, num_warps: int, num_stages: int, python: str, path: str,
                 codes_per_thread: float) -> dict:
    """Capture the first Pallas call of ``fn(*args)``, compile it for sm_90 (``path``: where
    its .ttir goes) and count its SASS: total, per code (``codes_per_thread``), registers and
    the ten most frequent opcodes."""
    with open(path, "w") as f:
        f.write(capture_ttir(fn, *args)[0])
    out = compile_ttir(path, num_warps, num_stages, python)
    ops = sass_op_counts(out["sass"])
    reg = re.search(r"REG:(\d+)", out["res"])
    stack = re.search(r"STACK:(\d+)", out["res"])
    loops = ptx_mix.sass_loops(out["sass"])
    return dict(sass=sum(ops.values()), sass_per_code=sum(ops.values()) / codes_per_thread,
                registers=int(reg.group(1)) if reg else None, top=dict(ops.most_common(10)),
                codes_per_thread=codes_per_thread, shared_bytes=out["shared"],
                stack_bytes=int(stack.group(1)) if stack else None,
                # the innermost (last) loop: instructions and tensor-core products per pass
                loop_sass=loops[-1]["count"] if loops else None,
                loop_hgmma=loops[-1]["mix"].get("HGMMA", 0) if loops else None)


def try_count_kernel(fn, args, cfg, python: str, path: str, codes_per_thread: float) -> dict:
    """:func:`count_kernel` with ``cfg``'s warps and stages, or ``{"error": ...}`` where it
    fails (no triton package, a module Triton refuses): one row of a SASS table."""
    try:
        return count_kernel(fn, args, cfg.num_warps, cfg.num_stages, python, path,
                            codes_per_thread)
    except Exception as e:  # noqa: BLE001
        return dict(error=f"{type(e).__name__}: {str(e)[:200]}")


def sass_table_args(description: str, argv=None) -> argparse.Namespace:
    """The options of the SASS-table scripts (``packed_sass.py``, ``row_block_sass.py``):
    ``--triton-python`` and ``--out`` (default ``results/cpu/gqsa``, made if missing)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--triton-python", default=sys.executable,
                   help="a Python with the triton package (its ptxas and cuobjdump)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu",
                                                  "gqsa"))
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    return a


def summarize(ttgir: str, ptx: str, sass: str = "", res: str = "") -> dict:
    """Counts that explain a Triton kernel's cost: layouts and shared memory (TTGIR), the
    PTX and (given ``cuobjdump`` output) SASS instruction mix of each loop, registers."""
    ops = collections.Counter(re.findall(r"\b(?:ttg|triton_gpu|tt|ttng|nvgpu)\.[a-z_]+", ttgir))
    entries = ptx_mix.kernels(ptx)
    body = next(iter(entries.values())) if entries else []
    loops = ptx_mix.loops(body)
    return dict(ttgir_ops=dict(ops.most_common(25)),
                layout_conversions=sum(v for k, v in ops.items() if k.endswith("convert_layout")),
                ptx_total=sum(ptx_mix.mix(body).values()),
                bar_sync=sum(1 for line in body if "bar.sync" in line or "barrier" in line),
                global_loads={w: sum(1 for line in body if "ld.global" in line
                                     and (w in line if w != "scalar" else ".v" not in line))
                              for w in (".v4", ".v2", "scalar")},
                registers=(int(m.group(1)) if (m := re.search(r"REG:(\d+)", res)) else None),
                stack_bytes=(int(m.group(1)) if (m := re.search(r"STACK:(\d+)", res))
                             else None),   # above 0: registers spilled to the stack
                sass_loops=[dict(count=l["count"], int_to_float=l["int_to_float"],
                                 top=dict(l["mix"].most_common(12)))
                            for l in ptx_mix.sass_loops(sass)],
                loops=[dict(label=l.get("label"), count=sum(l["mix"].values()),
                            int_to_float=l["int_to_float"],
                            top=dict(collections.Counter(l["mix"]).most_common(12)))
                       for l in loops])


def k_step(cfg: QuantMatmulConfig, K: int, qc) -> int:
    """Rows of one K step as the kernel runs it (k_tiles rounds block_k up for the path)."""
    try:
        from pallas_kernels.quant_matmul import k_tiles
    except ImportError:   # a kernel from before commit 841fc8d
        return max(16 * 32 // qc.bits, min(cfg.block_k, K))
    return k_tiles(cfg, K, qc.bits, qc.group_size, False)[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096x28672")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--format", default="w4g128")
    p.add_argument("--config", default="{}")
    p.add_argument("--rungs", default=",".join(RUNGS + ("full",)))
    p.add_argument("--triton-python", default=sys.executable,
                   help="a Python interpreter with the triton package (default: this one)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    K, N = (int(v) for v in a.shape.lower().split("x"))
    qc = quant.parse_spec(a.format)
    cfg = dataclasses.replace(QuantMatmulConfig.for_shape("cuda", a.rows, K, N, qc.group_size),
                              **json.loads(a.config))
    os.makedirs(a.out, exist_ok=True)
    ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), K, N, qc, "bfloat16")
    Mp = max(a.rows, cfg.block_m)
    x = jnp.ones((a.rows, K), jnp.bfloat16)
    report = dict(shape=[K, N], rows=a.rows, format=a.format, config=dataclasses.asdict(cfg),
                  rungs={})
    for rung in a.rungs.split(","):
        if rung == "full":
            texts = capture_ttir(lambda x, q, s, z: quant_matmul(
                x, q, s, z, bits=qc.bits, group_size=qc.group_size, config=cfg),
                x, ql.qweight, ql.scales, ql.zeros)
        else:
            texts = capture_ttir(lambda x, q: stripped_matmul(
                x, q, bits=qc.bits, rung=rung, config=cfg),
                jnp.pad(x, ((0, Mp - a.rows), (0, 0))), ql.qweight)
        path = os.path.join(a.out, f"{rung.replace('+', '_')}.ttir")
        with open(path, "w") as f:
            f.write(texts[0])
        entry = dict(ttir=path)
        try:
            out = compile_ttir(path, cfg.num_warps, cfg.num_stages, a.triton_python)
        except ImportError:
            print(f"{rung}: wrote {path} (no triton package: not compiled)")
            report["rungs"][rung] = entry
            continue
        except Exception as e:  # noqa: BLE001  (a parser of another MLIR version)
            entry["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"{rung}: {entry['error']}")
            report["rungs"][rung] = entry
            continue
        for ext in ("ttgir", "ptx", "sass", "res"):
            with open(path[:-5] + "." + ext, "w") as f:
                f.write(out[ext])
        entry.update(summarize(out["ttgir"], out["ptx"], out["sass"], out["res"]),
                     shared_bytes=out["shared"])
        # codes one thread handles per K step, and the innermost loop's PTX per code
        per_thread = k_step(cfg, K, qc) * cfg.block_n // (32 * cfg.num_warps)
        if entry["loops"]:
            entry["codes_per_thread_step"] = per_thread
            entry["loop_ptx_per_code"] = entry["loops"][-1]["count"] / per_thread
        if entry["sass_loops"]:
            entry["loop_sass_per_code"] = entry["sass_loops"][-1]["count"] / per_thread
        report["rungs"][rung] = entry
        print(rung, json.dumps({k: v for k, v in entry.items() if k != "ttgir_ops"}), flush=True)
    with open(os.path.join(a.out, "triton_ir.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
