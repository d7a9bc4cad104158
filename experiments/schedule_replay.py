"""Replay the engine's schedule for a benchmark workload on the CPU: how full are its steps?

The engine's scheduling (admission, chunked prefill, preemption, the shape buckets a step is
padded to) depends on the workload, the engine's settings and the KV pool's page count. It
does not depend on the model's weights or on how fast the device is. This script runs the
workload of ``optgqa bench`` (same requests, same seed) through the real engine, with the
pool sized as the benchmark sizes it for the preset (``--model``, ``--kv-memory-gib``), but
with a tiny random model on the CPU in place of the preset. From the engine's step log it
reports, for decode steps and for mixed (prefill) steps apart:

* how many steps there were and how many tokens and sequences each carried;
* the rows each step was padded to (its bucket) and the fraction of padding;
* the same padding under other token-bucket sets (``--what-if``), computed from the same
  step log: buckets only pad a step, they do not change what is scheduled.

At many rows a step's matrix products are compute bound, so padded rows cost about as much
as real ones; the padding fraction of the mixed steps is then the share of their product
time spent on padding.

Usage::

    python experiments/schedule_replay.py --max-num-seqs 512 --max-num-batched-tokens 4096 \\
        --input-range 32 1024 --output-range 32 512 --out experiments/results/cpu/schedule

Writes ``schedule_replay.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import optgqa_jax as og  # noqa: E402
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax.engine.runner import page_bytes  # noqa: E402

# Token-bucket sets compared by default (each also ends at max_num_batched_tokens)
TINY_VOCAB = 256
WHAT_IF = {"powers of two from 16": "pow2", "every 256": "256", "every 512": "512"}


def bucket_set(kind: str, top: int) -> tuple[int, ...]:
    """Token buckets of one --what-if kind, ending at ``top``: "pow2" (16, 32, ...), or a step
    size ("256": 256, 512, ...), or explicit comma-separated sizes."""
    if kind == "pow2":
        b, out = 16, []
        while b < top:
            out.append(b)
            b *= 2
        return tuple(out) + (top,)
    if "," in kind:
        sizes = sorted({int(x) for x in kind.split(",") if x})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"--what-if {kind!r}: expected positive sizes")
        return tuple(s for s in sizes if s < top) + (top,)
    step = int(kind)
    if step < 1:
        raise ValueError(f"--what-if {kind!r}: expected a positive step")
    return tuple(range(step, top, step)) + (top,)


def padding(sizes: list[int], buckets: tuple[int, ...]) -> dict:
    """Rows padded to under ``buckets`` (each size to the smallest bucket >= it)."""
    padded = [next(b for b in buckets if b >= n) for n in sizes]
    real, total = int(sum(sizes)), int(sum(padded))
    return dict(buckets=list(buckets), real_rows=real, padded_rows=total,
                padding_fraction=1 - real / total if total else 0.0)


def replay(bc: B.BenchConfig, progress: bool = True) -> dict:
    """Run ``bc``'s workload through the engine with a tiny CPU model and the pool the
    benchmark would give ``bc.model``; returns the step log summarised."""
    real = B.model_config(bc)
    longest_request = (max(bc.input_range[1] if bc.input_range else bc.input_len, 1)
                       + (bc.output_range[1] if bc.output_range else bc.output_len))
    # the lengths are drawn before the token ids, so a small vocabulary keeps them
    prompts, out_lens = B.workload(bc, TINY_VOCAB)
    longest = max(len(p) + o for p, o in zip(prompts, out_lens))
    num_pages = -(-(bc.kv_tokens or bc.max_num_seqs * longest) // bc.page_size)
    real_cfg = real.replace(max_seq_len=longest_request + 16)
    if bc.kv_memory_bytes:   # as run_engine sizes it (one device)
        num_pages = min(num_pages, bc.kv_memory_bytes // page_bytes(real_cfg, bc.page_size))
    tiny = og.ModelConfig(vocab_size=TINY_VOCAB, d_model=16, n_layers=1, n_heads=2,
                          n_kv_heads=1, head_dim=8, ffn_dim=32, max_seq_len=longest_request + 16,
                          dtype="float32")
    import jax

    params = og.init_params(tiny, jax.random.PRNGKey(0))
    engine = og.Engine(tiny, params, og.EngineConfig(
        page_size=bc.page_size, num_pages=num_pages, max_num_seqs=bc.max_num_seqs,
        max_num_batched_tokens=bc.max_num_batched_tokens, max_model_len=tiny.max_seq_len,
        attention_impl="reference", seq_buckets=bc.seq_buckets, token_buckets=bc.token_buckets,
        enable_prefix_caching=False, async_scheduling=bc.async_scheduling))
    engine.record_steps = True
    sps = [og.SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in out_lens]
    t0 = time.perf_counter()
    engine.generate(prompts, sps, progress=progress)
    log = engine.step_log
    decode = [s for s in log if s.decode_only]
    mixed = [s for s in log if not s.decode_only]
    stat = lambda xs: dict(mean=float(np.mean(xs)), p50=float(np.median(xs)),  # noqa: E731
                           min=int(min(xs)), max=int(max(xs))) if xs else None
    return dict(
        model=bc.model, num_pages=int(num_pages), page_size=bc.page_size,
        max_num_seqs=bc.max_num_seqs, max_num_batched_tokens=bc.max_num_batched_tokens,
        seq_buckets=list(engine.runner.seq_buckets),
        token_buckets=list(engine.runner.token_buckets),
        async_scheduling=bc.async_scheduling, num_requests=len(prompts),
        input_tokens=int(sum(map(len, prompts))), output_tokens=int(sum(out_lens)),
        steps=len(log), preemptions=engine.stats.preemptions,
        peak_pages_used=engine.peak_pages_used, replay_s=time.perf_counter() - t0,
        decode=dict(steps=len(decode), seqs=stat([s.num_seqs for s in decode]),
                    padding=padding([s.num_tokens for s in decode],
                                    engine.runner.seq_buckets)),
        mixed=dict(steps=len(mixed), tokens=stat([s.num_tokens for s in mixed]),
                   seqs=stat([s.num_seqs for s in mixed]),
                   padding=padding([s.num_tokens for s in mixed],
                                   engine.runner.token_buckets),
                   token_histogram=np.histogram(
                       [s.num_tokens for s in mixed],
                       bins=np.linspace(0, bc.max_num_batched_tokens, 9))[0].tolist()
                   if mixed else []),
        mixed_tokens=[s.num_tokens for s in mixed],
        decode_seqs=[s.num_tokens for s in decode])


def markdown(r: dict, what_if: dict) -> str:
    m, d = r["mixed"], r["decode"]
    lines = [
        "# Engine schedule replay", "",
        f"Workload of `optgqa bench` on the {r['model']} pool ({r['num_pages']:,} pages of "
        f"{r['page_size']} tokens): {r['num_requests']} requests, {r['input_tokens']:,} prompt "
        f"and {r['output_tokens']:,} output tokens; max_num_seqs={r['max_num_seqs']}, "
        f"max_num_batched_tokens={r['max_num_batched_tokens']}, "
        f"{'asynchronous' if r['async_scheduling'] else 'synchronous'} scheduling. Replayed "
        f"on the CPU with a tiny model (the schedule does not depend on the model): "
        f"{r['steps']} steps, {r['preemptions']} preemptions, peak {r['peak_pages_used']:,} "
        "pages.", "",
        "| steps | count | tokens per step (mean, min–max) | sequences per step (mean) | "
        "buckets | padding |",
        "| --- | ---: | --- | ---: | --- | ---: |"]
    if d["steps"]:
        lines.append(f"| decode | {d['steps']} | {d['seqs']['mean']:.0f} ({d['seqs']['min']}–"
                     f"{d['seqs']['max']}) | {d['seqs']['mean']:.0f} | "
                     f"{', '.join(map(str, d['padding']['buckets']))} | "
                     f"{100 * d['padding']['padding_fraction']:.0f}% |")
    if m["steps"]:
        lines.append(f"| mixed | {m['steps']} | {m['tokens']['mean']:.0f} ({m['tokens']['min']}–"
                     f"{m['tokens']['max']}) | {m['seqs']['mean']:.0f} | "
                     f"{', '.join(map(str, m['padding']['buckets']))} | "
                     f"{100 * m['padding']['padding_fraction']:.0f}% |")
        edges = np.linspace(0, r["max_num_batched_tokens"], 9).astype(int)
        lines += ["", "Mixed steps by tokens carried:", "",
                  "| tokens | " + " | ".join(f"{a + 1}–{b}" for a, b in zip(edges, edges[1:]))
                  + " |", "| --- |" + " ---: |" * 8,
                  "| steps | " + " | ".join(map(str, m["token_histogram"])) + " |"]
        lines += ["", "Padding of the mixed steps under other token buckets (same steps):", "",
                  "| token buckets | buckets | rows padded to | padding |",
                  "| --- | ---: | ---: | ---: |"]
        for name, p in what_if.items():
            lines.append(f"| {name} | {len(p['buckets'])} | {p['padded_rows']:,} | "
                         f"{100 * p['padding_fraction']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    B.add_arguments(p)
    p.set_defaults(out=os.path.join(os.path.dirname(__file__), "results", "cpu", "schedule"))
    p.add_argument("--what-if", action="append", default=None, metavar="BUCKETS",
                   help="repeatable: token buckets to compare the mixed steps' padding under: "
                        "'pow2', a step ('512': 512, 1024, ...) or sizes ('1024,3072'); "
                        "each ends at max_num_batched_tokens (default: pow2, 256, 512)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    kinds = a.what_if or list(WHAT_IF.values())
    names = {v: k for k, v in WHAT_IF.items()}
    try:
        sets = {names.get(k, k): bucket_set(k, a.max_num_batched_tokens) for k in kinds}
    except ValueError as e:
        p.error(str(e))
    bc = B.config_from_args(a)
    r = replay(bc, progress=not a.no_progress)
    what_if = {"the run's": r["mixed"]["padding"]} | {
        name: padding(r["mixed_tokens"], s) for name, s in sets.items()}
    r["what_if"] = what_if
    r["commit"] = B.source_commit()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "schedule_replay.json"), "w") as f:
        json.dump(r, f, indent=1)
    text = markdown(r, what_if)
    with open(os.path.join(a.out, "schedule_replay.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
