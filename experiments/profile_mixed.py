"""Where does a mixed (prefill) step's time go? Profile one engine step that prefills prompts
beside running decodes.

In the engine's throughput benchmarks on the Llama-3-8B shape, the mixed steps (chunked
prefill plus the decode rows of the running sequences, padded to a token bucket) take half
of the 1000 x 256/256 run at 512 sequences and 83% of the random-length run
(``experiments/schedule_replay.py`` gives their make-up). This script builds one such step
with random weights and a paged pool, with the engine's own jitted step program:

* ``--prompts P --prompt-len L``: P new prompts of L tokens each (first chunks);
* ``--decodes D --context LO HI``: D running sequences decoding one token each, contexts drawn
  in [LO, HI];
* the step padded to ``--tokens T`` rows (default: the next power of two, as the engine's
  token buckets).

It measures, in one run: the step's device time (launches pipelined, as the engine runs
them), a per-op device trace of a few steps (which kernels and fusions the time goes to),
and, as the ceiling of that run, XLA's bfloat16 product of T rows by the model's widest
projection (gate/up). Its TFLOP/s is compared with the rate the step's matrix products would
need to fill the step's time.

Usage::

    python experiments/profile_mixed.py --prompts 14 --prompt-len 256 --decodes 370 \\
        --context 257 512 --tokens 4096 --fuse-projections --out experiments/results/mixed

Writes ``profile_mixed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import optgqa_jax as og  # noqa: E402
from optgqa_jax import benchmark as bench  # noqa: E402
from optgqa_jax.engine.runner import ModelRunner, parse_xla_options  # noqa: E402
from profile_decode import (add_step_options, device_seconds, gemm_calls,  # noqa: E402
                            op_sources, step_options, traced_ops, write_report)


def linear_flops_per_token(cfg) -> int:
    """Multiply-add FLOPs of one token through every layer's linear products (not the LM head,
    which a step runs only for each sequence's last row)."""
    D, H = cfg.d_model, cfg.head_dim
    per_layer = D * (cfg.n_heads + 2 * cfg.n_kv_heads) * H + cfg.n_heads * H * D \
        + 3 * D * cfg.ffn_dim
    return 2 * cfg.n_layers * per_layer


def mixed_inputs(runner: ModelRunner, rng, *, prompts: int, prompt_len: int,
                 decode_contexts: np.ndarray, size: int):
    """A mixed step's inputs: the decode rows first, then the prompts' first chunks, each
    sequence on pages of its own; the rest of the ``size`` rows is padding."""
    cfg, Z = runner.cfg, runner.page_size
    x = runner._empty(False, size)
    t, b, next_page = 0, 0, 0
    lens = list(map(int, decode_contexts)) + [prompt_len] * prompts
    news = [1] * len(decode_contexts) + [prompt_len] * prompts
    for ctx, new in zip(lens, news):
        n_pages = -(-ctx // Z)
        table = np.arange(next_page, next_page + n_pages, dtype=np.int32)
        next_page += n_pages
        pos = np.arange(ctx - new, ctx, dtype=np.int32)
        x.tokens[t:t + new] = rng.integers(0, cfg.vocab_size, size=new)
        x.positions[t:t + new] = pos
        x.slot_mapping[t:t + new] = table[pos // Z] * Z + pos % Z
        x.token_seq[t:t + new] = b
        x.block_tables[b, :n_pages] = table
        x.context_lens[b] = ctx
        x.cu_q_lens[b + 1] = t + new
        x.select[b] = t + new - 1
        x.seeds[b] = b
        x.sample_pos[b] = ctx
        t, b = t + new, b + 1
    x.cu_q_lens[b + 1:] = t
    return x, t, next_page


def pages_needed(prompts: int, prompt_len: int, contexts: np.ndarray, Z: int) -> int:
    return int(sum(-(-int(c) // Z) for c in contexts) + prompts * -(-prompt_len // Z))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--prompts", type=int, default=14, help="new prompts in the step")
    ap.add_argument("--prompt-len", type=int, default=256, help="tokens of each prompt")
    ap.add_argument("--decodes", type=int, default=370, help="decoding sequences in the step")
    ap.add_argument("--context", type=int, nargs=2, default=(257, 512), metavar=("LO", "HI"),
                    help="the decoding sequences' contexts, drawn uniformly in [LO, HI]")
    ap.add_argument("--tokens", type=int, default=None,
                    help="rows the step is padded to (default: next power of two >= 16)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--fuse-projections", action="store_true")
    ap.add_argument("--quantize", default=None, metavar="SPEC",
                    help="random weights in this serving format (as `optgqa bench --quantize`)")
    ap.add_argument("--impl", default="auto", choices=["auto", "pallas", "reference"])
    ap.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--no-trace", action="store_true", help="time the step only")
    add_step_options(ap)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args(argv)
    lo, hi = a.context
    if a.prompts < 0 or a.decodes < 0 or a.prompts + a.decodes < 1:
        ap.error("--prompts and --decodes must be >= 0 and not both 0")
    if a.prompt_len < 1 or not 1 <= lo <= hi:
        ap.error("--prompt-len must be >= 1 and --context LO HI must satisfy 1 <= LO <= HI")
    total = a.prompts * a.prompt_len + a.decodes
    size = a.tokens or max(16, 1 << (total - 1).bit_length())
    if size < total:
        ap.error(f"--tokens {size} is fewer than the step's {total} tokens")
    try:
        options = parse_xla_options(a.xla_option) if a.xla_option else None
        if a.quantize:
            from optgqa_jax.sparse.synthetic import parse_serving_spec
            parse_serving_spec(a.quantize)
    except ValueError as e:
        ap.error(str(e))

    cfg = og.ModelConfig.preset(a.model)
    Z = a.page_size
    cfg = cfg.replace(max_seq_len=max(hi, a.prompt_len) + Z)
    rng = np.random.default_rng(0)
    contexts = rng.integers(lo, hi + 1, size=a.decodes)
    if a.quantize:
        params = bench.random_params(cfg, bench.BenchConfig(
            model=a.model, quantize=a.quantize, fuse_projections=a.fuse_projections))
    else:
        params = og.init_params(cfg, jax.random.PRNGKey(0), fused=a.fuse_projections)
    seqs = a.prompts + a.decodes
    runner = ModelRunner(cfg, params, num_pages=pages_needed(a.prompts, a.prompt_len, contexts, Z),
                         page_size=Z, max_num_seqs=seqs, max_num_batched_tokens=size,
                         max_model_len=cfg.max_seq_len, impl=a.impl, seq_buckets=(seqs,),
                         token_buckets=(size,), compiler_options=options,
                         **step_options(a))
    inputs, real, _ = mixed_inputs(runner, rng, prompts=a.prompts, prompt_len=a.prompt_len,
                                   decode_contexts=contexts, size=size)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=os.environ.get("OPTGQA_COMMIT") or bench.source_commit(), model=a.model,
                quantize=a.quantize, fused_projections=a.fuse_projections, prompts=a.prompts,
                prompt_len=a.prompt_len, decodes=a.decodes, context=[lo, hi], real_tokens=real,
                padded_tokens=size, page_size=Z, impl=a.impl,
                **step_options(a),
                compiler_options=runner.options_for(size))

    def step():
        return runner.dispatch(inputs, False, size)[0]

    results = {"step ms": device_seconds(step, iters=5, trials=3) * 1e3}
    flops = linear_flops_per_token(cfg) * size          # the padded rows are computed too
    results["linear TFLOP per step (padded rows)"] = flops / 1e12
    results["TFLOP/s if the step were only its linear products"] = (
        flops / (results["step ms"] / 1e3) / 1e12)
    # the ceiling of this run: XLA's bfloat16 product of `size` rows by gate/up's width
    xg = jax.random.normal(jax.random.PRNGKey(1), (size, cfg.d_model), jnp.bfloat16)
    wg = jax.random.normal(jax.random.PRNGKey(2), (cfg.d_model, 2 * cfg.ffn_dim), jnp.bfloat16)
    gemm = jax.jit(lambda x, w: x @ w)
    t = device_seconds(lambda: gemm(xg, wg))
    results["ceiling: bf16 product [T, D] x [D, 2F] TFLOP/s"] = 2 * size * cfg.d_model * \
        2 * cfg.ffn_dim / t / 1e12
    print(json.dumps(results, indent=1), flush=True)
    if not a.no_trace:
        meta["ops"], meta["timeline"] = traced_ops(step, steps=3)
    # the products' shapes and layouts as compiled (which operand layout each GEMM got)
    hlo = runner.lower(inputs, False, size).compile().as_text()
    meta["gemms"] = gemm_calls(hlo)
    meta["op_sources"] = op_sources(
        hlo, {n for rows in meta.get("ops", {}).values() for n, _, _ in rows})
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "step_hlo.txt"), "w") as f:   # to name the trace's fusions
        f.write(hlo)
    table = ["| what | value |", "| --- | ---: |"]
    table += [f"| {k} | {v:,.2f} |" for k, v in results.items()]
    write_report(a.out, "profile_mixed", "Mixed-step profile", meta, results, table)


if __name__ == "__main__":
    main()
