"""What ALiBi adds to the paged decode kernel's inner loop, counted without a GPU.

On an H200, ALiBi made paged decode 27% slower at B=32, context 2048, GQA 28/4
(``experiments/results/h200/quant/compare_variants_*.md``). The ALiBi default then differed
from the plain one in two ways: the bias itself (a multiply-add per score) and its tiles
(32-key blocks, queries padded in XLA, chosen when masked query rows with ALiBi measured slow
at 32-key blocks). Since commit 9360360 groups that are not powers of two take the plain tiles
with ALiBi too (H100, b4f2e9e), so the padded tiles are a config of their own here. This script
separates the bias from the tiles on the compiled code: it captures the Triton module
that Pallas lowers for :func:`pallas_kernels.paged_attention` under each config, with and
without ALiBi, compiles it for sm_90 with the ``triton`` package (as ``triton_ir.py``: a
Python with ``triton``, no GPU), and reports per config the static SASS of the key loop's
body, instructions per key, registers, layout conversions and barriers.

Usage::

    python experiments/decode_sass.py --triton-python /path/to/venv/bin/python \
        [--out experiments/results/cpu]

Writes ``decode_sass.{json,md}``. Instruction counts, not times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax.benchmark import source_commit  # noqa: E402
from pallas_kernels import PagedAttentionConfig, alibi_slopes, paged_attention  # noqa: E402


def configs(group_size: int) -> dict:
    """name -> PagedAttentionConfig: the CUDA defaults with and without ALiBi, and queries
    padded in XLA with 32-key blocks (the ALiBi default for such groups before 9360360)."""
    plain = PagedAttentionConfig.for_backend("cuda", group_size=group_size)
    alibi = PagedAttentionConfig.for_backend("cuda", alibi=True, group_size=group_size)
    return {"plain default": plain, "ALiBi default": alibi,
            "queries padded, 32-key blocks": PagedAttentionConfig(keys_per_block=32)}


def count(cfg: PagedAttentionConfig, use_alibi: bool, shape: tuple, python: str,
          path: str) -> dict:
    import triton_ir
    B, N, K, ctx, D, Z = shape
    q = jnp.zeros((B, N, D), jnp.bfloat16)
    kp = jnp.zeros((K, B * ctx // Z, Z, D), jnp.bfloat16)
    tables, lengths = jnp.zeros((B, ctx // Z), jnp.int32), jnp.full((B,), ctx, jnp.int32)
    slopes = alibi_slopes(N) if use_alibi else None
    texts = triton_ir.capture_ttir(lambda q, k, v, t, l: paged_attention(
        q, k, v, t, l, alibi_slopes=slopes, config=cfg), q, kp, kp, tables, lengths)
    with open(path, "w") as f:
        f.write(texts[-1])
    out = triton_ir.compile_ttir(path, cfg.num_warps, cfg.num_stages, python)
    s = triton_ir.summarize(out["ttgir"], out["ptx"], out["sass"], out["res"])
    loop = max(s["sass_loops"], key=lambda l: l["count"]) if s["sass_loops"] else None
    keys = max(Z, cfg.keys_per_block // Z * Z)               # keys per loop iteration
    return dict(config=dataclasses.asdict(cfg), alibi=use_alibi, registers=s["registers"],
                layout_conversions=s["layout_conversions"], barriers=s["bar_sync"],
                loop_sass=None if loop is None else loop["count"],
                sass_per_key=None if loop is None else loop["count"] / keys,
                keys_per_iteration=keys, loop_top=None if loop is None else loop["top"])


def markdown(res: dict) -> str:
    m = res["meta"]
    B, N, K, ctx, D, Z = m["shape"]
    lines = ["# Paged decode with and without ALiBi: static SASS of the key loop", "",
             f"Commit {m['commit']}, jax {m['jax']}, triton {m['triton']} (sm_90, no GPU); "
             f"B={B}, GQA {N}/{K}, context {ctx}, head dim {D}, pages of {Z}. Instruction "
             "counts of one loop body (one key block), not times.", "",
             "| config | ALiBi | key block | queries | loop SASS | per key | registers | "
             "barriers (kernel) |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['alibi']} | | | fails: {r['error'][:60]} | | | |")
            continue
        c = r["config"]
        lines.append(f"| {r['name']} | {'on' if r['alibi'] else 'off'} | "
                     f"{r['keys_per_iteration']} | "
                     f"{'masked' if c['replicate_queries'] else 'padded'} | {r['loop_sass']} | "
                     f"{r['sass_per_key']:.2f} | {r['registers']} | {r['barriers']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--triton-python", default=sys.executable,
                   help="a Python interpreter with the triton package (default: this one)")
    p.add_argument("--shape", default="32,28,4,2048",
                   help="B,N,K,context (head dim 128, pages of 16)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    a = p.parse_args(argv)
    try:
        B, N, K, ctx = (int(v) for v in a.shape.split(","))
    except ValueError:
        p.error(f"--shape {a.shape!r}: expected B,N,K,context")
    if N % K or ctx % 16:
        p.error(f"--shape {a.shape!r}: N must be a multiple of K and the context of 16")
    import triton_ir
    shape = (B, N, K, ctx, 128, 16)
    res = dict(meta=dict(commit=source_commit(), jax=jax.__version__,
                         triton=triton_ir.triton_version(a.triton_python),
                         shape=list(shape)), rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(configs(N // K).items()):
            for use_alibi in (False, True):
                try:
                    row = count(cfg, use_alibi, shape, a.triton_python,
                                os.path.join(tmp, f"k{i}{int(use_alibi)}.ttir"))
                except Exception as e:  # noqa: BLE001  (no triton package, a lowering error)
                    row = dict(alibi=use_alibi, error=f"{type(e).__name__}: {str(e)[:300]}")
                row["name"] = name
                res["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "loop_top"}), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_sass.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "decode_sass.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
