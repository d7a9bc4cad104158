"""Paged decode with ALiBi against without, timed in interleaved rounds (one NVIDIA GPU).

Issue 13 asks for decode with ALiBi within 5% of decode without at every decode shape of the
kernel table (``bench_kernels.decode_shapes``). Single timings of one call spread by several
per cent between runs (28/4 at the engine's shape: +3% to +17% in two runs at b4f2e9e), so here
each shape and dtype times, round after round, the default without ALiBi, the default with
ALiBi and, for groups that are not powers of two, candidate tiles (``CANDIDATES`` with ALiBi,
``PLAIN_CANDIDATES`` without); the
table reports the medians over the rounds and each ALiBi variant's time over the no-ALiBi
default's. Every output is checked against ``paged_attention_reference`` first.

Usage::

    python experiments/alibi_ab.py [--rounds 5] [--shape TEXT] [--out DIR]

Writes ``alibi_ab.json`` and ``alibi_ab.md`` under ``--out`` (rewritten after every shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import decode_inputs, decode_shapes, rel_err  # noqa: E402
from optgqa_jax.benchmark import timeit  # noqa: E402
from optgqa_jax.timing import interleaved_rounds, start_gpu_rounds  # noqa: E402
from pallas_kernels import (PagedAttentionConfig, alibi_slopes, paged_attention,  # noqa: E402
                            paged_attention_reference)
from pallas_kernels import _common as kc  # noqa: E402

# Tiles tried for groups that are not powers of two (masked query rows), beside the defaults
# (each skipped where it is the default): with ALiBi 32- and 64-key blocks with and without the
# block table read one block ahead, and 32-key blocks with it on 2 warps; without ALiBi 64-key
# blocks with and without it, and 32-key blocks with it on 2 warps (the best 28/4 setting at
# the engine's shape in group_tiles_ab.py's sweep, H100, c9f6850). The last is the default for
# tables of at most SHORT_CONTEXT tokens since the rule was added, the 64-key ones above it.
CANDIDATES = [PagedAttentionConfig(keys_per_block=kpb, prefetch=pf, replicate_queries=True,
                                   num_warps=w)
              for kpb, pf, w in ((64, "none", 4), (64, "tables", 4), (32, "tables", 4),
                                 (32, "tables", 2))]
PLAIN_CANDIDATES = [PagedAttentionConfig(keys_per_block=64, prefetch=pf, replicate_queries=True)
                    for pf in ("none", "tables")] + [
                    PagedAttentionConfig(keys_per_block=32, prefetch="tables", num_warps=2,
                                         replicate_queries=True)]
TOLERANCE = 2e-2     # max |out - reference| / max |reference| in 16-bit dtypes


def label(cfg: PagedAttentionConfig) -> str:
    return (f"kpb={cfg.keys_per_block} prefetch={cfg.prefetch} w={cfg.num_warps} "
            f"{'masked/replicated rows' if cfg.replicate_queries else 'padded queries'}")


def shape_rows(s, dtype, rounds: int, ceiling: float) -> list:
    """The interleaved rounds of one decode shape and dtype: one row per variant."""
    # the kernel table's inputs (bench_kernels: key 0), so that the engine's 28/4 and 32/8
    # shapes hold the same context lengths
    args = decode_inputs(s, dtype, jax.random.PRNGKey(0))
    kv_bytes = 2 * int(np.asarray(args[4]).sum()) * s.kv_heads * s.head_dim * 2
    slopes = alibi_slopes(s.q_heads)
    G = s.q_heads // s.kv_heads
    variants = {"no ALiBi, default": (None, None),
                "ALiBi, default": (slopes, None)}
    # the defaults paged_attention picks for these inputs (the table's capacity bounds the
    # contexts: PagedAttentionConfig.for_backend(max_context=...))
    defaults = {alibi: PagedAttentionConfig.for_backend(
        kc.backend(), alibi=alibi, group_size=G,
        max_context=args[3].shape[1] * args[1].shape[2]) for alibi in (False, True)}
    default_alibi = defaults[True]
    if not kc.is_power_of_two(G):
        default_plain = defaults[False]
        for cfg in PLAIN_CANDIDATES:
            if cfg != default_plain:
                variants[f"no ALiBi, {label(cfg)}"] = (None, cfg)
        for cfg in CANDIDATES:
            if cfg != default_alibi:
                variants[f"ALiBi, {label(cfg)}"] = (slopes, cfg)
    timers, checks = {}, {}
    for name, (sl, cfg) in variants.items():
        fn = jax.jit(lambda q, k, v, t, l, sl=sl, cfg=cfg: paged_attention(
            q, k, v, t, l, alibi_slopes=sl, config=cfg, interpret=kc.backend() == "cpu"))
        ref = paged_attention_reference(*args, alibi_slopes=sl)
        err = rel_err(fn(*args), ref)
        if not err <= TOLERANCE:     # NaN fails too
            raise AssertionError(f"{s.name} {jnp.dtype(dtype).name} {name}: error {err:.2e}")
        checks[name] = err
        timers[name] = lambda fn=fn: timeit(fn, *args)
    times = interleaved_rounds(timers, rounds)
    base = float(np.median(times["no ALiBi, default"]))
    out = []
    for name, ts in times.items():
        med = float(np.median(ts))
        cfg = variants[name][1] or defaults[variants[name][0] is not None]
        out.append(dict(shape=s.name, dtype=jnp.dtype(dtype).name, variant=name,
                        config=label(cfg),
                        ms=med * 1e3, rounds_ms=[t * 1e3 for t in ts],
                        pct_ceiling=100 * kv_bytes / med / ceiling,
                        vs_no_alibi=med / base, rel_err=checks[name]))
    return out


def markdown(meta: dict, rows: list) -> str:
    lines = [f"# Paged decode: ALiBi against without, interleaved rounds\n",
             f"Device {meta['device']}, jax {meta['jax']}, commit {meta['commit']}, "
             f"{meta['date']}. Copy ceiling {meta['copy_gbps']:,.0f} GB/s. Each row: the median "
             f"of {meta['rounds']} rounds, every variant of a shape timed once per round in turn "
             "(each timing the median of 5 batches of 20 calls); × no ALiBi = that median over "
             "the no-ALiBi default's (issue 13's target: the ALiBi default ≤ 1.05).\n",
             "| shape | dtype | variant | tiles | ms | % ceiling | × no ALiBi | rounds (ms) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        bold = "**" if r["variant"] == "ALiBi, default" else ""
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['variant']} | {r['config']} | "
                     f"{r['ms']:.3f} | "
                     f"{r['pct_ceiling']:.0f}% | {bold}{r['vs_no_alibi']:.3f}{bold} | "
                     + ", ".join(f"{t:.3f}" for t in r["rounds_ms"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shape", default="", metavar="TEXT", help="only shapes whose name has TEXT")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a, ceiling, meta = start_gpu_rounds(p)
    meta["candidates"] = [dataclasses.asdict(c) for c in CANDIDATES]
    rows = []
    for s in decode_shapes()[0]:
        if a.shape not in s.name:
            continue
        for dtype in (jnp.bfloat16, jnp.float16):
            rows += shape_rows(s, dtype, a.rounds, ceiling)
            with open(os.path.join(a.out, "alibi_ab.json"), "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
            with open(os.path.join(a.out, "alibi_ab.md"), "w") as f:
                f.write(markdown(meta, rows))
            print(f"{s.name} {jnp.dtype(dtype).name}: " + ", ".join(
                f"{r['variant']} {r['ms']:.3f} ms ({r['vs_no_alibi']:.3f})"
                for r in rows if r["shape"] == s.name and r["dtype"] == jnp.dtype(dtype).name),
                flush=True)
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
