"""The engine's ragged prefill kernel on a mixed step's shape: tiles, head grouping, and what
the step's form costs (one NVIDIA GPU).

In the 1000 x 256/256 engine benchmark on the Llama-3-8B shape (512 sequences, 4,096-token
mixed steps), a mixed step carries about 14 new prompts of 256 tokens beside about 370
decoding sequences. ``mixed_step_attention`` sends the prompts through
``paged_prefill_attention`` (decode rows skipped) and the decode rows through
``paged_attention``. This script builds that step's prefill call as the engine makes it
(``--decodes`` one-token rows with contexts in ``--context``, ``--prompts`` fresh prompts of
``--prompt-len`` tokens, empty sequences up to ``--seqs``, ``T`` = ``--tokens`` rows and
``max_q_len = T``, as the engine's token bucket sets it) and times, in one run:

* the default configuration (``PagedPrefillConfig.for_backend``), and, when ``--old-tree DIR``
  names an older checkout's root, that tree's kernel on the same inputs;
* the same prompts alone (``B`` = the prompts, ``T`` their tokens, ``max_q_len`` one prompt):
  what the engine form's extra tiles and rows cost;
* a sweep of tiles (``block_q``, ``keys_per_block``, warps, stages) with and without
  ``group_heads``;
* the peer: cuDNN's causal attention (``jax.nn.dot_product_attention``) on the prompts as a
  dense [prompts, prompt_len] batch.

Every output is first checked against ``paged_prefill_attention_reference`` on the prompts'
rows (relative error, max |diff| / max |ref|). TFLOP/s counts the causal products of the
prompts (4 · N · D · L(L+1)/2 per prompt and layer).

Usage::

    python experiments/prefill_tiles.py [--old-tree DIR] [--out DIR] [--quick]

Writes ``prefill_tiles.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax.benchmark import source_commit, timeit  # noqa: E402
from pallas_kernels import (PagedPrefillConfig, paged_prefill_attention,  # noqa: E402
                            paged_prefill_attention_reference)

TOLERANCE = 2e-2   # max |out - reference| / max |reference| in bfloat16


def old_kernel(root: str):
    """``paged_prefill_attention`` of another checkout (its file imported under another name;
    it shares this tree's ``pallas_kernels._common``)."""
    path = os.path.join(root, "pallas_kernels", "paged_prefill_attention.py")
    spec = importlib.util.spec_from_file_location("old_paged_prefill_attention", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod.paged_prefill_attention, mod.PagedPrefillConfig


def step_inputs(a, rng):
    """The engine form: decode rows first, then the prompts, then empty sequences; rows past
    the last sequence are padding. Returns (q, k_pages, v_pages, tables, cu, ctx, prompt_rows)."""
    N, K, D, Z = a.heads, a.kv_heads, a.head_dim, a.page_size
    dec_ctx = rng.integers(a.context[0], a.context[1] + 1, size=a.decodes)
    lens = list(map(int, dec_ctx)) + [a.prompt_len] * a.prompts
    news = [1] * a.decodes + [a.prompt_len] * a.prompts
    B = max(a.seqs, len(lens))
    M = -(-max(lens) // Z)
    pages = sum(-(-c // Z) for c in lens) + 1
    tables = np.zeros((B, M), np.int32)
    cu = np.zeros(B + 1, np.int32)
    ctx = np.zeros(B, np.int32)
    nxt, t = 0, 0
    for b, (c, n) in enumerate(zip(lens, news)):
        k = -(-c // Z)
        tables[b, :k] = np.arange(nxt, nxt + k)
        nxt += k
        ctx[b] = c
        t += n
        cu[b + 1] = t
    cu[len(lens) + 1:] = t
    T = a.tokens or t
    if T < t:
        raise SystemExit(f"--tokens {T} is fewer than the step's {t} tokens")
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (T, N, D), jnp.bfloat16)
    k_pages = jax.random.normal(kk, (K, pages, Z, D), jnp.bfloat16)
    v_pages = jax.random.normal(kv, (K, pages, Z, D), jnp.bfloat16)
    first = int(cu[a.decodes])
    return (q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(cu), jnp.asarray(ctx),
            (first, first + a.prompts * a.prompt_len), T)


def prompts_only(q, k_pages, v_pages, tables, cu, ctx, a):
    """The same prompts as their own call: B = prompts, T = their rows, max_q_len = one."""
    lo = a.decodes
    cu_p = cu[lo:lo + a.prompts + 1] - cu[lo]
    rows = slice(int(cu[lo]), int(cu[lo + a.prompts]))
    return (q[rows], k_pages, v_pages, tables[lo:lo + a.prompts], cu_p,
            ctx[lo:lo + a.prompts])


def rel_err(out, ref) -> float:
    o = np.asarray(out, np.float64)
    r = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(o)):
        return float("nan")
    return float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-30))


def sweep_configs(quick: bool) -> list[PagedPrefillConfig]:
    # first a few programs per head looping over the real tiles, on the defaults' tiles and
    # grouped; then tiles, grouped first
    out = [PagedPrefillConfig(group_heads=grouped, tile_programs=n)
           for grouped in (False, True) for n in (16, 64, 256)]
    for grouped in (True, False):
        for bq in ((64, 128) if quick or not grouped else (32, 64, 128)):
            for kpb in ((64, 128) if quick else (32, 64, 128)):
                for w in (4, 8):
                    for st in ((1, 2) if quick else (1, 2, 3)):
                        out.append(PagedPrefillConfig(block_q=bq, keys_per_block=kpb,
                                                      num_warps=w, num_stages=st,
                                                      group_heads=grouped))
    return out


def label(cfg) -> str:
    g = " grouped" if getattr(cfg, "group_heads", False) else ""
    n = getattr(cfg, "tile_programs", 0)
    return (f"bq={cfg.block_q} kpb={cfg.keys_per_block} w={cfg.num_warps} "
            f"s={cfg.num_stages}{g}" + (f" programs={n}" if n else ""))


def write(a, rows, T, tables, flop, quiet=False) -> None:
    """prefill_tiles.{json,md} of the rows so far (rewritten after every row, so a run cut by
    a time limit keeps what it measured)."""
    L, N, D = a.prompt_len, a.heads, a.head_dim
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=source_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                shape=dict(heads=N, kv_heads=a.kv_heads, head_dim=D, page_size=a.page_size,
                           prompts=a.prompts, prompt_len=L, decodes=a.decodes,
                           context=list(a.context), seqs=int(tables.shape[0]), tokens=T),
                flop=flop, old_tree=a.old_tree)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "prefill_tiles.json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    base = next((r["us"] for r in rows if r["impl"] == "default" and "us" in r), None)
    lines = ["# Ragged prefill on a mixed step's shape", "",
             f"Device {meta['device']}, jax {meta['jax']}, commit {meta['commit']}, "
             f"{meta['date']}. {a.prompts} prompts of {L} new tokens beside {a.decodes} decode "
             f"rows (skipped), {meta['shape']['seqs']} sequences, {T} rows, "
             f"{N}/{a.kv_heads} heads, D={D}, pages of {a.page_size}. TFLOP/s of the prompts' "
             "causal products.", "",
             "| impl | config | µs | TFLOP/s | × default | rel. error |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "us" in r:
            lines.append(f"| {r['impl']} | {r['note']} | {r['us']:.1f} | {r['tflops']:.0f} | "
                         f"{base / r['us'] if base else float('nan'):.2f} | "
                         f"{r['rel_err']:.1e} |")
        else:
            lines.append(f"| {r['impl']} | {r['note']} | — | — | — | {r.get('error', '')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "prefill_tiles.md"), "w") as f:
        f.write(text)
    if not quiet:
        print(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=14)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decodes", type=int, default=370)
    ap.add_argument("--context", type=int, nargs=2, default=(257, 512), metavar=("LO", "HI"))
    ap.add_argument("--seqs", type=int, default=512, help="sequences of the step (max_num_seqs)")
    ap.add_argument("--tokens", type=int, default=4096, help="rows of the step (token bucket)")
    ap.add_argument("--old-tree", default=None, metavar="DIR")
    ap.add_argument("--quick", action="store_true",
                    help="a smaller sweep: block_q 64/128, keys_per_block 64/128, stages 1/2")
    ap.add_argument("--max-configs", type=int, default=None, help="the sweep's first N only")
    ap.add_argument("--interpret", action="store_true",
                    help="Pallas interpret mode (a smoke test on the CPU; times mean nothing)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args(argv)
    if a.heads % a.kv_heads:
        ap.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    rng = np.random.default_rng(0)
    q, kp, vp, tables, cu, ctx, (r0, r1), T = step_inputs(a, rng)
    qs, kps, vps, ts, cus, ctxs = prompts_only(q, kp, vp, tables, cu, ctx, a)
    ref = np.asarray(paged_prefill_attention_reference(qs, kps, vps, ts, cus, ctxs)
                     .astype(jnp.float32))
    L, N, D = a.prompt_len, a.heads, a.head_dim
    flop = a.prompts * 4 * N * D * L * (L + 1) / 2
    rows = []

    def record(name, fn, args, pick, note=""):
        t0 = time.perf_counter()
        row = dict(impl=name, note=note)
        try:
            out = fn(*args)
            row["rel_err"] = rel_err(pick(out).astype(jnp.float32), ref)
            if not row["rel_err"] <= TOLERANCE:
                row["error"] = f"relative error {row['rel_err']:.3g} above {TOLERANCE}"
            else:
                s = timeit(fn, *args)
                row.update(us=s * 1e6, tflops=flop / s / 1e12)
        except Exception as e:   # noqa: BLE001  (a config that does not compile is a row)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["wall_s"] = time.perf_counter() - t0
        print(f"  {name} {note}: {row.get('us', float('nan')):.1f} us "
              f"{row.get('error', '')[:80]} ({row['wall_s']:.1f} s)", flush=True)
        rows.append(row)
        write(a, rows, T, tables, flop, quiet=True)

    engine = (q, kp, vp, tables, cu, ctx)
    prompt_rows = lambda o: o[r0:r1]  # noqa: E731
    mk = lambda f, cfg, mq: jax.jit(lambda *x: f(  # noqa: E731
        *x, max_q_len=mq, config=cfg, skip_single=True, interpret=a.interpret))
    default = PagedPrefillConfig.for_backend("cuda")
    record("default", mk(paged_prefill_attention, default, T), engine, prompt_rows,
           label(default))
    if a.old_tree:
        f_old, cfg_old = old_kernel(a.old_tree)
        record("old tree default", mk(f_old, cfg_old.for_backend("cuda"), T), engine,
               prompt_rows, a.old_tree)
    record("prompts alone", mk(paged_prefill_attention, default, L), (qs, kps, vps, ts, cus, ctxs),
           lambda o: o, label(default))
    # the peer: cuDNN on the prompts as a dense batch, K/V of each prompt contiguous
    qd = qs.reshape(a.prompts, L, N, D)
    kd = jnp.stack([kps[:, ts[i, :L // a.page_size]].reshape(a.kv_heads, L, D)
                    for i in range(a.prompts)]).transpose(0, 2, 1, 3)
    vd = jnp.stack([vps[:, ts[i, :L // a.page_size]].reshape(a.kv_heads, L, D)
                    for i in range(a.prompts)]).transpose(0, 2, 1, 3)
    if L % a.page_size == 0:
        record("cudnn (dense prompts)", jax.jit(lambda q_, k_, v_: jax.nn.dot_product_attention(
            q_, k_, v_, is_causal=True, implementation="cudnn")), (qd, kd, vd),
            lambda o: o.reshape(-1, N, D))
    for cfg in sweep_configs(a.quick)[:a.max_configs]:
        record("sweep", mk(paged_prefill_attention, cfg, T), engine, prompt_rows, label(cfg))
    write(a, rows, T, tables, flop)


if __name__ == "__main__":
    main()
