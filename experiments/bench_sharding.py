"""Tensor-parallel serving on several GPUs of one host: the engine at TP = 1 and TP = 2.

In one run, each part in a fresh process (``optgqa_jax.benchmark.run_engine``, random bfloat16
weights drawn in their sharded placement):

* ``8b-b1-tp1``, ``8b-b1-tp2``: batch-1 decode of the Llama-3-8B shape (one sequence at a
  time; the median time per output token after the first);
* ``8b-tp1``, ``8b-tp2``: the 1000 x 256/256 offline workload of ``bench_engine.py``
  (256 sequences, 2048 batched tokens, the KV pool capped per device);
* ``70b-tp2``: the same workload on the Llama-3-70B shape, which does not fit one 141 GB GPU
  with a useful KV pool, with its decode model-bandwidth utilisation (MBU) against the two
  GPUs' combined copy bandwidth (one GPU's, measured in the run, times two); and
  ``70b-b1-tp2``, its batch-1 decode.

The projections are served unfused at every degree (the fused q/k/v and gate/up blocks are not
head-aligned, see ``optgqa_jax.sharding``), so TP = 1 and TP = 2 serve the same layout.

Usage::

    python experiments/bench_sharding.py [--out experiments/results/sharding]
        [--parts 8b-b1-tp1,8b-b1-tp2,8b-tp1,8b-tp2,70b-tp2,70b-b1-tp2] [--resume]
        [--num-requests 1000] [--kv-memory-gib 48] [--kv-memory-gib-70b 40]

Writes ``bench_sharding.{json,md}`` under ``--out`` (rewritten after every part).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import benchmark as B  # noqa: E402

PARTS = ("8b-b1-tp1", "8b-b1-tp2", "8b-tp1", "8b-tp2", "70b-tp2", "70b-b1-tp2")
GIB = 1 << 30


def part_config(part: str, a) -> B.BenchConfig:
    """The BenchConfig of one part (see the module docstring)."""
    big = part.startswith("70b")
    tp = int(part.rsplit("tp", 1)[1])
    common = dict(model=a.model_70b if big else a.model_8b, tensor_parallel_size=tp,
                  fuse_projections=False, attention_impl=a.attention_impl,
                  copy_bytes=a.copy_mib << 20, page_size=a.page_size,
                  kv_memory_bytes=int((a.kv_memory_gib_70b if big else a.kv_memory_gib) * GIB))
    if "-b1-" in part:
        return B.BenchConfig(num_requests=a.batch1_requests, input_len=a.batch1_len,
                             output_len=a.batch1_len, max_num_seqs=1,
                             max_num_batched_tokens=a.batch1_len, seq_buckets=(1,),
                             token_buckets=(a.batch1_len,), **common)
    return B.BenchConfig(num_requests=a.num_requests, input_len=a.input_len,
                         output_len=a.output_len, max_num_seqs=a.max_num_seqs,
                         max_num_batched_tokens=a.max_num_batched_tokens, **common)


def summary(runs: dict) -> dict:
    """The issue's figures from the parts that ran: TP = 2 over TP = 1 for batch-1 decode
    (time per output token) and for throughput, and the 70B shape's decode MBU."""
    ok = {k: r for k, r in runs.items() if "error" not in r}
    out = {}
    tpot = lambda r: r["tpot_s"]["p50"] if r.get("tpot_s") else None  # noqa: E731
    if "8b-b1-tp1" in ok and "8b-b1-tp2" in ok and tpot(ok["8b-b1-tp2"]):
        out["batch1_speedup_tp2"] = tpot(ok["8b-b1-tp1"]) / tpot(ok["8b-b1-tp2"])
    if "8b-tp1" in ok and "8b-tp2" in ok:
        out["throughput_ratio_tp2"] = (ok["8b-tp2"]["total_tokens_per_s"]
                                       / ok["8b-tp1"]["total_tokens_per_s"])
    if "70b-tp2" in ok:
        out["mbu_70b_tp2"] = ok["70b-tp2"].get("decode_mbu_total")
        out["mbu_70b_tp2_gathered"] = ok["70b-tp2"].get("decode_mbu_total_gathered")
    return out


def markdown(meta: dict, runs: dict) -> str:
    lines = ["# Tensor-parallel serving", "",
             f"- device: {meta['device']} x {meta['devices']}", f"- jax: {meta['jax']}",
             f"- commit: {meta['commit']}", "",
             "| part | model | TP | requests | in/out tokens | total tok/s | output tok/s | "
             "TPOT p50 (ms) | decode step p50 (ms) | decode MBU (combined ceiling) | "
             "params (GiB) | KV pool (GiB) | peak device 0 (GiB) | preemptions |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    for part, r in runs.items():
        if "error" in r:
            lines.append(f"| {part} | {r.get('model', '')} | | | | fails: "
                         f"{r['error'][-160:].splitlines()[-1] if r['error'] else ''} "
                         "| | | | | | | | |")
            continue
        tpot = r["tpot_s"]["p50"] * 1e3 if r.get("tpot_s") else None
        step = r["decode_step_ms"]["p50"] if r.get("decode_step_ms") else None
        mbu = r.get("decode_mbu_total")
        fmt = lambda v, d=1: "—" if v is None else f"{v:,.{d}f}"  # noqa: E731
        lines.append(
            f"| {part} | {r['model']} | {r['tensor_parallel_size']} | {r['num_requests']} | "
            f"{r['input_tokens']:,}/{r['output_tokens']:,} | {r['total_tokens_per_s']:,.0f} | "
            f"{r['output_tokens_per_s']:,.0f} | {fmt(tpot, 2)} | {fmt(step, 2)} | "
            f"{'—' if mbu is None else f'{100 * mbu:.0f}%'} | {r['param_bytes'] / GIB:.1f} | "
            f"{r['kv_pool_bytes'] / GIB:.1f} | {r['peak_memory_bytes'] / GIB:.1f} | "
            f"{r['preemptions']} |")
    s = meta.get("summary", {})
    lines += ["", "Summary (targets: TP = 2 batch-1 decode >= 1.6x TP = 1; the 70B shape's "
              "decode MBU >= 60% of the two GPUs' combined copy bandwidth):", ""]
    if "batch1_speedup_tp2" in s:
        lines.append(f"- batch-1 decode, TP = 2 over TP = 1: {s['batch1_speedup_tp2']:.2f}x")
    if "throughput_ratio_tp2" in s:
        lines.append(f"- 1000 x 256/256 throughput, TP = 2 over TP = 1: "
                     f"{s['throughput_ratio_tp2']:.2f}x")
    if s.get("mbu_70b_tp2") is not None:
        gathered = s.get("mbu_70b_tp2_gathered")
        lines.append(f"- 70B shape at TP = 2, decode MBU: {100 * s['mbu_70b_tp2']:.0f}% "
                     + ("" if gathered is None else
                        f"({100 * gathered:.0f}% counting only the gathered embedding rows)"))
    if not s:
        lines.append("- no pair of parts completed")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "sharding"))
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--model-8b", default="llama3-8b")
    p.add_argument("--model-70b", default="llama3-70b")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--batch1-requests", type=int, default=4)
    p.add_argument("--batch1-len", type=int, default=128)
    p.add_argument("--kv-memory-gib", type=float, default=48.0, help="per device, 8B shape")
    p.add_argument("--kv-memory-gib-70b", type=float, default=40.0,
                   help="per device, 70B shape (its weights take about 66 GiB per GPU)")
    p.add_argument("--copy-mib", type=int, default=2048,
                   help="bytes copied to measure one device's copy bandwidth")
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--resume", action="store_true",
                   help="keep the parts of an earlier run's bench_sharding.json in --out "
                        "(e.g. the 8B parts and the 70B parts run as two commands)")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; choose from {list(PARTS)}")
    import jax
    need = max(int(x.rsplit("tp", 1)[1]) for x in parts)
    if len(jax.devices()) < need:
        raise SystemExit(f"--parts need {need} devices; this machine has {len(jax.devices())}")
    os.makedirs(a.out, exist_ok=True)
    meta = dict(device=jax.devices()[0].device_kind, devices=len(jax.devices()),
                jax=jax.__version__, commit=B.source_commit(), args=vars(a))
    runs = {}
    path = os.path.join(a.out, "bench_sharding.json")
    if a.resume and os.path.exists(path):
        with open(path) as f:
            runs = {k: v for k, v in json.load(f)["runs"].items() if k not in parts}
    for part in parts:
        bc = part_config(part, a)
        t0 = time.perf_counter()
        runs[part] = B.run_in_subprocess("engine", bc, timeout=a.timeout_s)
        runs[part]["config"] = dataclasses.asdict(bc)
        r = runs[part]
        print(f"{part}: " + (f"error {r['error'][-300:]}" if "error" in r else
                             f"{r['total_tokens_per_s']:,.0f} tok/s, TPOT p50 "
                             f"{(r['tpot_s'] or {}).get('p50', float('nan')) * 1e3:.2f} ms")
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        meta["summary"] = summary(runs)
        with open(path, "w") as f:
            json.dump(dict(meta=meta, runs=runs), f, indent=1)
        with open(os.path.join(a.out, "bench_sharding.md"), "w") as f:
            f.write(markdown(meta, runs))


if __name__ == "__main__":
    main()
