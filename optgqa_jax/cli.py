"""Command line: ``optgqa generate`` and ``optgqa info``.

Examples::

    optgqa generate "The capital of France is"
    optgqa generate --chat --max-tokens 64 "Why is the sky blue?"
    optgqa generate --model path/to/hf_llama_dir --temperature 0.8 --top-p 0.9 "Once upon"
    optgqa info llama3-8b
"""

from __future__ import annotations

import argparse
import os
import subprocess
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
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    runs = benchmark.run_suite(bc, compare_mha=args.compare_mha, hf_requests=args.hf_requests,
                               out_dir=args.out, commit=os.environ.get("OPTGQA_COMMIT", commit))
    return 0 if all("error" not in r for r in runs) else 1


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
