"""Command line: ``optgqa generate``, ``info``, ``bench``, ``quantize`` and ``eval``.

Examples::

    optgqa generate "The capital of France is"
    optgqa generate --chat --max-tokens 64 "Why is the sky blue?"
    optgqa generate --model path/to/hf_llama_dir --temperature 0.8 --top-p 0.9 "Once upon"
    optgqa info llama3-8b
    optgqa quantize --model smollm2-135m --bits 4 --group-size 64 --nsamples 128 --seqlen 512 \
        --out smollm2-w4g64     # 128 does not divide SmolLM2's d_model = 576
    optgqa eval --model smollm2-w4g64 --corpus shakespeare --split test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from optgqa_jax.engine import Engine, EngineConfig, SamplingParams
from optgqa_jax.registry import load_model


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_generate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, seed=args.seed)
    if model.tokenizer is None:
        print(f"error: model {args.model!r} has no tokenizer; text prompts need one",
              file=sys.stderr)
        return 2
    tok = model.tokenizer
    texts = [tok.apply_chat_template(p) if args.chat else p for p in args.prompts]
    prompts = [tok.encode(t) for t in texts]
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    t1 = time.perf_counter()
    longest = max(len(p) for p in prompts) + args.max_tokens
    max_model_len = min(model.cfg.max_seq_len, -(-longest // 64) * 64)
    engine = Engine(model.cfg, model.params,
                    EngineConfig(max_model_len=max_model_len, max_num_seqs=max(1, len(prompts)),
                                 seed=args.seed), tokenizer=tok)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    completions = engine.generate(prompts, params, progress=len(prompts) > 1)
    elapsed = time.perf_counter() - t1
    for prompt, c in zip(args.prompts, completions):
        print(f"\n### {prompt}\n{prompt if not args.chat else ''}{c.text}")
    n_out = sum(len(c.token_ids) for c in completions)
    print(f"\n{len(completions)} prompts, {n_out} tokens generated in {elapsed:.2f}s "
          f"(includes compilation); engine: {engine.stats}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = load_model(args.model, with_params=False, dtype=args.dtype)
    cfg = model.cfg
    print(f"model: {args.model}")
    for key, value in cfg.to_dict().items():
        if key == "kv_head_map" and value is None:
            value = f"contiguous groups of {cfg.group_size}"
        print(f"  {key:15s} {value}")
    kind = "MHA" if cfg.n_kv_heads == cfg.n_heads else "MQA" if cfg.n_kv_heads == 1 else "GQA"
    print(f"attention: {kind}, {cfg.n_heads} query heads / {cfg.n_kv_heads} KV heads")
    print(f"parameters: {cfg.num_params:,} ({_format_bytes(cfg.num_params * cfg.jnp_dtype.itemsize)}"
          f" in {cfg.dtype})")
    per_token = cfg.kv_bytes_per_token
    print(f"KV cache: {_format_bytes(per_token)} per token in {cfg.dtype} "
          f"({_format_bytes(per_token * cfg.max_seq_len)} for one max_seq_len={cfg.max_seq_len} "
          "sequence)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from optgqa_jax import benchmark

    bc = benchmark.config_from_args(args)
    runs = benchmark.run_suite(bc, compare_mha=args.compare_mha, hf_requests=args.hf_requests,
                               out_dir=args.out, commit=benchmark.source_commit())
    return 0 if all("error" not in r for r in runs) else 1


def _check_corpus(name: str) -> None:
    """Fail before loading a model when the corpus is not installed (FileNotFoundError, exit 2)."""
    from optgqa_jax import data

    try:
        data.open_corpus(name)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--corpus {name}: {e}") from None


def _check_seqlen(seqlen: int, cfg) -> None:
    if seqlen < 2:
        raise ValueError(f"--seqlen {seqlen} must be >= 2 (a window predicts its tokens 2..T)")
    if cfg is not None and seqlen > cfg.max_seq_len:
        raise ValueError(f"--seqlen {seqlen} exceeds the model's max_seq_len={cfg.max_seq_len}")


def _linear_inputs(cfg) -> dict[str, int]:
    """Input dimension D_in of each kind of linear layer (the group size must divide each)."""
    return {"q/k/v, gate/up (d_model)": cfg.d_model,
            "o_proj (n_heads * head_dim)": cfg.n_heads * cfg.head_dim,
            "down_proj (ffn_dim)": cfg.ffn_dim}


def _quant_config_from_args(args: argparse.Namespace):
    """The QuantConfig of the quantize flags; errors name the flag (exit 2 before any work)."""
    from optgqa_jax.quant.config import SUPPORTED_BITS, QuantConfig

    if args.bits not in SUPPORTED_BITS:
        raise ValueError(f"--bits {args.bits} is not supported; choose one of {SUPPORTED_BITS}")
    if args.group_size != -1 and args.group_size < 1:
        raise ValueError(f"--group-size {args.group_size} must be -1 (per output channel) or "
                         "a positive integer")
    if args.nsamples < 1:
        raise ValueError(f"--nsamples {args.nsamples} must be >= 1")
    if args.learn_steps < 1:
        raise ValueError(f"--learn-steps {args.learn_steps} must be >= 1")
    if not 0 <= args.damp < 1e3:
        raise ValueError(f"--damp {args.damp} must be a non-negative number (0.01 is usual)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    return QuantConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym,
                       act_order=args.act_order, static_groups=args.static_groups,
                       damp=args.damp, grad_hessian=args.grad_hessian,
                       learn_scales=args.learn_scales, learn_steps=args.learn_steps,
                       quantize_lm_head=args.quantize_lm_head,
                       quantize_embedding=args.quantize_embedding)


def quantized_bytes(cfg, qparams) -> tuple[int, int]:
    """(bytes of the quantized linear weights as stored, bytes of the same weights in cfg.dtype)."""
    import jax
    import numpy as np

    from optgqa_jax.quant import is_quantized

    leaves = jax.tree_util.tree_leaves(qparams, is_leaf=is_quantized)
    layers = [x for x in leaves if is_quantized(x)]
    stored = sum(x.nbytes for x in layers)
    dense = sum(int(np.prod(x.shape)) for x in layers) * cfg.jnp_dtype.itemsize
    return stored, dense


def save_tokenizer(tokenizer, out_dir: str) -> None:
    """Write `tokenizer` where ``registry.load_model`` looks for one in a checkpoint directory.

    A BPE tokenizer becomes ``tokenizer.json`` plus its EOS/BOS ids in
    ``generation_config.json`` (files already there, e.g. from an export, are kept). The byte
    tokenizer needs no file: the loader picks it from the vocabulary size.
    """
    from optgqa_jax.tokenizer import BPETokenizer

    if not isinstance(tokenizer, BPETokenizer):
        return
    path = os.path.join(out_dir, "tokenizer.json")
    if not os.path.exists(path):
        tokenizer.tokenizer.save(path)
    gen = os.path.join(out_dir, "generation_config.json")
    ids = {k: v for k, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id))
           if v is not None}
    if ids and not os.path.exists(gen):
        with open(gen, "w") as f:
            json.dump(ids, f, indent=2)


def cmd_quantize(args: argparse.Namespace) -> int:
    from optgqa_jax import data
    from optgqa_jax.quant import quantize

    qc = _quant_config_from_args(args)
    _check_seqlen(args.seqlen, None)
    if args.format == "hf-gptq" and args.quantize_embedding:
        raise ValueError("--quantize-embedding: the Hugging Face GPTQ layout stores embeddings "
                         "in float; use --format optgqa")
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out} already exists; pass --overwrite to replace it")
    _check_corpus(args.corpus)
    model = load_model(args.model, dtype=args.dtype, seed=args.seed)
    cfg = model.cfg
    if model.tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer; calibration text needs one")
    _check_seqlen(args.seqlen, cfg)
    for what, d_in in _linear_inputs(cfg).items():
        if qc.group_size != -1 and d_in % qc.group_size:
            raise ValueError(f"--group-size {qc.group_size} does not divide D_in={d_in} of {what}")
    if args.quantize_lm_head and cfg.tie_embeddings:
        raise ValueError(f"--quantize-lm-head: --model {args.model} ties its LM head to the "
                         "token table; --quantize-embedding quantizes the shared table")
    windows = data.corpus_windows(model.tokenizer, args.corpus, "calibration", args.seqlen,
                                  n=args.nsamples, seed=args.seed)
    cfg, qparams, report = quantize(cfg, model.params, windows, qc, method=args.method,
                                    batch_size=args.batch_size, progress=True)
    stored, dense = quantized_bytes(cfg, qparams)
    print(f"quantized {len(report.layers)} layers of {args.model} ({args.method} "
          f"{qc.tag}) on {windows.shape[0]}x{windows.shape[1]} calibration tokens of "
          f"{args.corpus} in {report.seconds:.1f}s")
    print(f"mean relative layer-output error: {report.mean_error():.3e}")
    print(f"weights: {stored:,} bytes quantized vs {dense:,} in {cfg.dtype} "
          f"({dense / stored:.2f}x smaller, {8 * stored * cfg.jnp_dtype.itemsize / dense:.2f} "
          "bits per weight)")
    if args.format == "optgqa":
        from optgqa_jax.checkpoint import save_checkpoint

        save_checkpoint(args.out, cfg, qparams, overwrite=args.overwrite, quant_config=qc)
    else:
        from optgqa_jax.quant.hf_gptq import export_hf_gptq

        export_hf_gptq(args.out, cfg, qparams, qc, overwrite=args.overwrite)
    save_tokenizer(model.tokenizer, args.out)
    summary = dict(model=args.model, format=args.format, corpus=args.corpus, seed=args.seed,
                   nsamples=args.nsamples, seqlen=args.seqlen, mean_error=report.mean_error(),
                   quantized_bytes=stored, float_bytes=dense, float_dtype=cfg.dtype)
    with open(os.path.join(args.out, "quant_report.json"), "w") as f:
        json.dump({**summary, **report.to_dict()}, f, indent=2)
    print(f"wrote {args.format} checkpoint to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from optgqa_jax import data
    from optgqa_jax.evaluate import windows_perplexity

    _check_seqlen(args.seqlen, None)
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows {args.max_windows} must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    _check_corpus(args.corpus)
    model = load_model(args.model, dtype=args.dtype)
    if model.tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer; evaluation text needs one")
    _check_seqlen(args.seqlen, model.cfg)
    windows = data.corpus_windows(model.tokenizer, args.corpus, args.split, args.seqlen)
    windows = windows[:args.max_windows]
    t0 = time.perf_counter()
    ppl = windows_perplexity(model.cfg, model.params, windows, batch_size=args.batch_size,
                             progress=True)
    seconds = time.perf_counter() - t0
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    print(f"perplexity {ppl:.4f} on {tokens:,} predicted tokens ({windows.shape[0]} windows of "
          f"{args.seqlen}) of {args.corpus}/{args.split}, {seconds:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, corpus=args.corpus, split=args.split,
                           seqlen=args.seqlen, windows=int(windows.shape[0]), tokens=tokens,
                           perplexity=ppl, seconds=seconds), f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optgqa", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--model", default="smollm2-135m",
                     help="pretrained name, preset, .gguf file or checkpoint directory "
                          "(default: smollm2-135m)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling (and random-preset) seed")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="print a model's configuration and memory footprint")
    info.add_argument("model", nargs="?", default="smollm2-135m")
    info.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="offline serving throughput benchmark (GPU)",
                           description="vLLM-style offline throughput of the engine on a preset with "
                                       "random weights; --compare-mha adds its MHA twin, "
                                       "--hf-requests a Hugging Face transformers baseline.")
    from optgqa_jax import benchmark
    benchmark.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    q = sub.add_parser("quantize", help="quantize a model's linear layers (GPTQ or RTN)",
                       description="Quantize every linear layer on calibration windows of a "
                                   "corpus and write a checkpoint plus quant_report.json.")
    q.add_argument("--model", default="smollm2-135m", help="model spec (see generate)")
    q.add_argument("--bits", type=int, default=4, help="code width: 2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, default=128,
                   help="inputs per scale; -1: one group per output channel (default 128)")
    q.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order (desc_act)")
    q.add_argument("--static-groups", action="store_true",
                   help="group grids from the unquantized weights (monotone g_idx)")
    q.add_argument("--damp", type=float, default=0.01, help="relative Hessian dampening")
    q.add_argument("--grad-hessian", action="store_true",
                   help="weight calibration tokens by their loss-gradient norms")
    q.add_argument("--learn-scales", action="store_true", help="train the scales after GPTQ")
    q.add_argument("--learn-steps", type=int, default=200, help="steps of --learn-scales")
    q.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize an untied LM head (default: it stays float)")
    q.add_argument("--quantize-embedding", action="store_true",
                   help="also quantize the token table by RTN (and with it a tied LM head; "
                        "default: it stays float; --format optgqa only)")
    q.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--corpus", default="shakespeare",
                   help="shakespeare, python-docs or text:<path> (calibration split)")
    q.add_argument("--seed", type=int, default=0, help="calibration crops (and preset) seed")
    q.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--format", choices=["optgqa", "hf-gptq"], default="optgqa",
                   help="optgqa orbax checkpoint (default) or Hugging Face GPTQ layout")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    q.set_defaults(func=cmd_quantize)

    ev = sub.add_parser("eval", help="held-out perplexity of a model on a corpus split",
                        description="Perplexity over consecutive non-overlapping windows.")
    ev.add_argument("--model", default="smollm2-135m", help="model spec (see generate)")
    ev.add_argument("--corpus", default="shakespeare",
                    help="shakespeare, python-docs or text:<path>")
    ev.add_argument("--split", choices=["calibration", "validation", "test"], default="test")
    ev.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows")
    ev.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ev.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
