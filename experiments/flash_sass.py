"""Flash attention's tiles in sm_90 SASS, counted without a GPU: registers, spills, matrix
instructions.

Flash attention runs at about 0.8x cuDNN on an H100 (``experiments/results/h100/``) after
tile sweeps. This script asks the compiled code why, per tile setting: it captures the Triton
module that Pallas lowers for :func:`pallas_kernels.flash_attention` (causal, bfloat16, no
ALiBi), compiles it for sm_90 with the ``triton`` package (as ``triton_ir.py``: a Python with
``triton``, no GPU), and reports registers per thread, stack bytes (spilled registers),
Hopper warpgroup matrix instructions (HGMMA) against the older per-warp ones (HMMA), and the
kernel's static SASS count.

Usage::

    python experiments/flash_sass.py --triton-python /path/to/venv/bin/python \
        [--out experiments/results/cpu]

Writes ``flash_sass.{json,md}``. Instruction counts and register use, not times.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax.benchmark import source_commit  # noqa: E402
from pallas_kernels import FlashAttentionConfig, flash_attention  # noqa: E402

SASS_OP = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z0-9_]+)", re.M)
STACK = re.compile(r"STACK:(\d+)")


def configs(kv_heads: int) -> dict:
    """name -> FlashAttentionConfig: the CUDA default for this KV head count and tiles from
    the benchmark's sweep around it."""
    return {"default": FlashAttentionConfig.for_backend("cuda", 128, kv_heads),
            "128x128, 8 warps": FlashAttentionConfig(128, 128, 8, 3),
            "128x64, 4 warps": FlashAttentionConfig(128, 64, 4, 3),
            "128x64, 8 warps": FlashAttentionConfig(128, 64, 8, 3),
            "256x64, 8 warps, 2 stages": FlashAttentionConfig(256, 64, 8, 2)}


def count(cfg: FlashAttentionConfig, shape: tuple, python: str, path: str) -> dict:
    import triton_ir
    B, T, N, K, D = shape
    q = jnp.zeros((B, T, N, D), jnp.bfloat16)
    kv = jnp.zeros((B, T, K, D), jnp.bfloat16)
    texts = triton_ir.capture_ttir(lambda q, k, v: flash_attention(q, k, v, config=cfg),
                                   q, kv, kv)
    with open(path, "w") as f:
        f.write(texts[-1])
    out = triton_ir.compile_ttir(path, cfg.num_warps, cfg.num_stages, python)
    ops = collections.Counter(SASS_OP.findall(out["sass"]))
    stack = STACK.search(out["res"])
    s = triton_ir.summarize(out["ttgir"], out["ptx"], out["sass"], out["res"])
    return dict(config=dataclasses.asdict(cfg), registers=s["registers"],
                stack_bytes=int(stack.group(1)) if stack else None, hgmma=ops.get("HGMMA", 0),
                hmma=ops.get("HMMA", 0), sass=sum(ops.values()), top=dict(ops.most_common(8)))


def markdown(res: dict) -> str:
    m = res["meta"]
    B, T, N, K, D = m["shape"]
    lines = ["# Flash attention tiles in sm_90 SASS", "",
             f"Commit {m['commit']}, jax {m['jax']}, triton {m['triton']} (sm_90, no GPU); "
             f"causal, bfloat16, B={B} T={T}, GQA {N}/{K}, head dim {D}. Registers per thread, "
             "spilled bytes (stack), warpgroup (HGMMA) and per-warp (HMMA) matrix "
             "instructions and static SASS of the kernel: counts, not times.", "",
             "| tiles | block_q × block_k, warps, stages | registers | stack bytes | HGMMA | "
             "HMMA | SASS | top instructions |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | | fails: {r['error'][:60]} | | | | | |")
            continue
        c = r["config"]
        top = ", ".join(f"{k} {v}" for k, v in r["top"].items())
        lines.append(f"| {r['name']} | {c['block_q']} × {c['block_k']}, {c['num_warps']}, "
                     f"{c['num_stages']} | {r['registers']} | {r['stack_bytes']} | {r['hgmma']} | "
                     f"{r['hmma']} | {r['sass']} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--triton-python", default=sys.executable,
                   help="a Python interpreter with the triton package (default: this one)")
    p.add_argument("--shape", default="1,1024,32,8",
                   help="B,T,N,K (head dim 128; the tiles do not depend on B or T)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    a = p.parse_args(argv)
    try:
        B, T, N, K = (int(v) for v in a.shape.split(","))
    except ValueError:
        p.error(f"--shape {a.shape!r}: expected B,T,N,K")
    if N % K or T % 256 or min(B, T, N, K) < 1:
        p.error(f"--shape {a.shape!r}: N must be a multiple of K and T of 256")
    import triton_ir
    shape = (B, T, N, K, 128)
    res = dict(meta=dict(commit=source_commit(), jax=jax.__version__,
                         triton=triton_ir.triton_version(a.triton_python), shape=list(shape)),
               rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(configs(K).items()):
            try:
                row = count(cfg, shape, a.triton_python, os.path.join(tmp, f"f{i}.ttir"))
            except Exception as e:  # noqa: BLE001  (no triton package, a lowering error)
                row = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            row["name"] = name
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "flash_sass.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "flash_sass.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
