"""Where does a decode step's time go? Profile the engine's jitted step on a GPU.

Builds a model preset with random weights and a paged pool, fills a
decode-only step of ``--batch`` sequences whose contexts are drawn from
``--context`` (a range), and measures, in one run:

* the full jitted step (model + K/V writes + attention + sampling), with the
  Pallas kernels and with the XLA reference attention;
* the same step with every context of length 1, which leaves the weight reads
  and everything else but attention's K/V reads;
* the decode attention kernel alone, once per layer;
* the model-bandwidth utilisation (MBU) of each, against the copy ceiling;
* a device trace of a few steps (``jax.profiler``), summed per XLA op, so the
  largest costs are named.

Usage::

    python experiments/profile_decode.py --model llama3-8b --batch 256 \\
        --context 257 512 --out experiments/results

    # does XLA's command-buffer (CUDA graph) setting change the step and its idle time?
    # (the engine sets that option itself, and its compiler options take precedence
    # over XLA_FLAGS, so compare it with --xla-option)
    python experiments/profile_decode.py --quick \\
        --xla-option xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL

    # any other XLA flag: one process per XLA_FLAGS string
    python experiments/profile_decode.py --xla-flags-variant=default \\
        --xla-flags-variant='--xla_gpu_enable_triton_gemm=false'

Writes ``profile_decode.json`` and ``profile_decode.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import optgqa_jax as og  # noqa: E402
from optgqa_jax import benchmark as bench  # noqa: E402
from optgqa_jax.benchmark import copy_bandwidths  # noqa: E402
from optgqa_jax.engine.runner import ModelRunner, parse_xla_options  # noqa: E402
from optgqa_jax.layer_stack import argument_buffers, stack_layers  # noqa: E402
from pallas_kernels import PagedAttentionConfig, paged_attention  # noqa: E402
# the trace and HLO readers (profile_mixed.py takes them from here too)
from step_trace import (gemm_calls, hlo_summary, op_markdown, op_sources,  # noqa: E402
                        traced_ops)


def add_step_options(ap) -> None:
    """The engine step's write and fusion options (``ModelRunner``'s keywords of the same
    names), shared by this script and ``profile_mixed.py``; :func:`step_options` reads them."""
    ap.add_argument("--sorted-kv-writes", action=argparse.BooleanOptionalAction, default=True,
                    help="write K/V in ascending slot order with unique slots (ModelRunner's "
                         "sorted_kv_writes; default on, as the engine's)")
    ap.add_argument("--kv-write-kernel", action="store_true",
                    help="write the step's K/V rows with pallas_kernels.kv_write "
                         "(EngineConfig.kv_write_kernel) instead of XLA's scatter")
    ap.add_argument("--add-norm-kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="residual adds and norms as pallas_kernels.add_rms_norm "
                         "(EngineConfig.add_norm_kernel; default on, as the engine's on one "
                         "device)")
    ap.add_argument("--rope-kv-write", action=argparse.BooleanOptionalAction, default=True,
                    help="rotate queries and keys and write K/V with pallas_kernels.rope_kv_write "
                         "(EngineConfig.rope_kv_write; RoPE models, --fuse-projections; default "
                         "on, as the engine's on one device)")


def step_options(args) -> dict:
    """``ModelRunner`` keywords from :func:`add_step_options`' flags (also recorded in the
    report's meta)."""
    return dict(sorted_kv_writes=args.sorted_kv_writes, kv_write_kernel=args.kv_write_kernel,
                rope_kv_write=args.rope_kv_write, add_norm_kernel=args.add_norm_kernel)


def device_seconds(fn, iters: int = 10, trials: int = 5) -> float:
    """Median seconds per call of fn() (which returns arrays) after a warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def synchronous_step(runner, inputs, B: int, trials: int = 30) -> dict:
    """Median milliseconds of the phases of one engine step run alone (not pipelined).

    pack: the host inputs into one buffer; put: its host-to-device copy call;
    dispatch: the jitted call until it returns (launches are asynchronous);
    wait: until the sampled tokens are on the host; total: all of them.
    """
    phases = collections.defaultdict(list)
    np.asarray(runner.dispatch(inputs, True, B)[0])
    for _ in range(trials):
        t0 = time.perf_counter()
        buf, layout = runner.pack(inputs)
        t1 = time.perf_counter()
        dev = jax.device_put(buf)
        t2 = time.perf_counter()
        tokens = runner.dispatch_device(dev, layout, True, B)
        t3 = time.perf_counter()
        np.asarray(tokens)
        t4 = time.perf_counter()
        for name, dt in (("pack", t1 - t0), ("put", t2 - t1), ("dispatch", t3 - t2),
                         ("wait", t4 - t3), ("total", t4 - t0)):
            phases[name].append(dt * 1e3)
    return {f"{k}_ms": float(np.median(v)) for k, v in phases.items()}


def override_decode_config(spec: str) -> None:
    """Make ``PagedAttentionConfig.for_backend`` return the defaults with ``spec``'s fields
    changed (an experiment-only patch: the model asks for_backend for its decode config)."""
    import ast
    import dataclasses

    fields = {f.name for f in dataclasses.fields(PagedAttentionConfig)}
    changes = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in fields:
            raise SystemExit(f"--decode-config: unknown field {name!r}; fields: {sorted(fields)}")
        try:
            changes[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            changes[name.strip()] = value.strip()  # bare strings such as prefetch=tiles
    original = PagedAttentionConfig.for_backend.__func__

    def patched(cls, backend, alibi=False, group_size=None, max_context=None):
        return dataclasses.replace(original(cls, backend, alibi, group_size, max_context),
                                   **changes)

    PagedAttentionConfig.for_backend = classmethod(patched)


def projection_gemms(cfg, B: int) -> dict:
    """One layer's projections at M = B tokens: separate matrices vs fused (concatenated)."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    dt = cfg.jnp_dtype
    L = cfg.n_layers  # distinct weights per layer: nothing is served from L2 or merged by CSE
    key = jax.random.PRNGKey(7)
    x = jax.random.normal(key, (B, D), dt)

    def mats(n, salt):
        return [jax.random.normal(jax.random.fold_in(key, 1000 * salt + i), (D, n), dt) * 0.02
                for i in range(L)]

    wq, wk, wv, wg, wu = mats(N * H, 1), mats(K * H, 2), mats(K * H, 3), mats(F, 4), mats(F, 5)
    wqkv = [jnp.concatenate(ws, axis=1) for ws in zip(wq, wk, wv)]
    wgu = [jnp.concatenate(ws, axis=1) for ws in zip(wg, wu)]
    out = {}
    for label, f, args in (
            ("q, k, v separate", lambda x, a, b, c: [(x @ p, x @ q, x @ r)
                                                     for p, q, r in zip(a, b, c)], (x, wq, wk, wv)),
            ("qkv fused", lambda x, a: [x @ p for p in a], (x, wqkv)),
            ("gate, up separate", lambda x, a, b: [(x @ p, x @ q) for p, q in zip(a, b)],
             (x, wg, wu)),
            ("gate_up fused", lambda x, a: [x @ p for p in a], (x, wgu))):
        fn = jax.jit(f)
        out[f"{label} (x{L} layers)"] = device_seconds(lambda: fn(*args)) * 1e3
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, nargs=2, default=(257, 512),
                    metavar=("LO", "HI"), help="context lengths drawn uniformly in [LO, HI]")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--mha-twin", action="store_true")
    ap.add_argument("--fuse-projections", action="store_true",
                    help="serve from fused q/k/v and gate/up weights (optgqa_jax.fused)")
    ap.add_argument("--quantize", default=None, metavar="SPEC",
                    help="random weights in this serving format instead of bfloat16, as "
                         "`optgqa bench --quantize` takes it (e.g. w4g128, w8, w4g128s50)")
    ap.add_argument("--decode-config", default="", metavar="K=V,...",
                    help="override the decode kernel's default PagedAttentionConfig fields for "
                         "this run, e.g. 'keys_per_block=32,replicate_queries=True'")
    ap.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                    help="repeatable: an XLA compiler option of the engine's step (replaces the "
                         "engine's defaults, e.g. --xla-option xla_gpu_enable_command_buffer=FUSION)")
    ap.add_argument("--stable-buffers", choices=("auto", "on", "off"), default="auto",
                    help="the runner's held input and token buffers (ModelRunner's "
                         "stable_buffers; auto: its default, off)")
    add_step_options(ap)
    ap.add_argument("--stack-layers", action="store_true",
                    help="serve the quantized layers and norm scales stacked across layers "
                         "(EngineConfig.stack_layers; default off, as the engine's)")
    ap.add_argument("--fixed-inputs", action="store_true",
                    help="time the step on one device copy of its inputs, passed to every call "
                         "(the engine copies new inputs each step): whether changing argument "
                         "addresses cost the command buffers' updates")
    ap.add_argument("--quick", action="store_true",
                    help="only the Pallas step and its trace (no reference path, no microbenchmarks)")
    ap.add_argument("--xla-flags-variant", action="append", default=None, metavar="FLAGS",
                    dest="xla_flags_variants",
                    help="repeatable, written --xla-flags-variant='--xla_...': rerun (--quick) "
                         "once per XLA_FLAGS string, each in its own process, and compare step "
                         "time and GPU idle time; 'default' leaves XLA_FLAGS unset (options the "
                         "engine sets itself, such as command buffers, need --xla-option)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.quantize:   # a bad spec stops here, before any weights are drawn
        from optgqa_jax.sparse.synthetic import parse_serving_spec
        try:
            parse_serving_spec(args.quantize)
        except ValueError as e:
            ap.error(f"--quantize {args.quantize!r}: {e}")
        if args.xla_flags_variants:
            ap.error("--quantize is not passed on to --xla-flags-variant runs")
    if args.xla_flags_variants:
        return compare_xla_flags(args)
    if args.decode_config:
        override_decode_config(args.decode_config)

    cfg = og.ModelConfig.preset(args.model)
    if args.mha_twin:
        cfg = cfg.replace(n_kv_heads=cfg.n_heads)
    hi = args.context[1]
    cfg = cfg.replace(max_seq_len=hi + args.page_size)
    B, Z = args.batch, args.page_size
    rng = np.random.default_rng(0)
    if args.quantize:   # drawn quantized, as the benchmarks draw them (no float copy)
        params = bench.random_params(cfg, bench.BenchConfig(
            model=args.model, quantize=args.quantize, fuse_projections=args.fuse_projections))
        param_bytes = bench.params_nbytes(params)
    else:
        params = og.init_params(cfg, jax.random.PRNGKey(0), fused=args.fuse_projections)
        param_bytes = cfg.num_params * cfg.jnp_dtype.itemsize
    param_buffers = argument_buffers(params)
    if args.stack_layers:   # EngineConfig.stack_layers: one buffer per weight kind
        params = stack_layers(params, cfg.n_layers)
    pages_per_seq = -(-cfg.max_seq_len // Z)
    num_pages = B * pages_per_seq
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                commit=os.environ.get("OPTGQA_COMMIT", "unknown"), model=args.model,
                mha_twin=args.mha_twin, fused_projections=args.fuse_projections, batch=B,
                quantize=args.quantize,
                context=list(args.context), page_size=Z,
                decode_config=repr(PagedAttentionConfig.for_backend("cuda")))
    methods = copy_bandwidths()
    ceiling = max(methods.values())
    meta["copy_methods_gbps"] = {k: v / 1e9 for k, v in methods.items()}
    meta["copy_gbps"] = ceiling / 1e9
    print("copy", meta["copy_methods_gbps"], flush=True)

    lengths = rng.integers(args.context[0], hi + 1, size=B).astype(np.int32)
    tables = rng.permutation(num_pages).reshape(B, pages_per_seq).astype(np.int32)
    results = {}

    def decode_inputs(runner, lens):
        x = runner._empty(True, B)
        pos = lens - 1
        x.tokens[:] = rng.integers(0, cfg.vocab_size, size=B)
        x.positions[:] = pos
        x.slot_mapping[:] = tables[np.arange(B), pos // Z] * Z + pos % Z
        x.token_seq[:] = np.arange(B)
        x.block_tables[:] = tables
        x.context_lens[:] = lens
        x.cu_q_lens[:] = np.arange(B + 1)
        x.select[:] = np.arange(B)
        x.seeds[:] = np.arange(B)
        x.sample_pos[:] = lens
        return x

    for impl in ("pallas",) if args.quick else ("pallas", "reference"):
        runner = ModelRunner(cfg, params, num_pages=num_pages, page_size=Z, max_num_seqs=B,
                             max_num_batched_tokens=B, max_model_len=cfg.max_seq_len, impl=impl,
                             seq_buckets=(B,), token_buckets=(B,),
                             stable_buffers={"auto": False, "on": True, "off": False}[
                                 args.stable_buffers],
                             **step_options(args),
                             compiler_options=(
                                 parse_xla_options(args.xla_option) if args.xla_option else None))
        meta["compiler_options"] = runner.compiler_options
        meta["stable_buffers"] = runner.stable_buffers
        meta.update(step_options(args))
        meta["stack_layers"] = bool(args.stack_layers)
        meta["param_buffers"] = dict(per_layer=param_buffers, served=argument_buffers(params))
        meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        for label, lens in (("step", lengths), ("step, contexts of 1", np.ones(B, np.int32))):
            inputs = decode_inputs(runner, lens)

            def run():  # as the engine does: pack, one host-to-device copy, launch
                return runner.dispatch(inputs, True, B)

            if args.fixed_inputs:   # one device copy of the inputs, passed to every step
                fixed, fixed_layout = runner.pack(inputs)
                fixed = jax.device_put(fixed)

                def run():
                    return runner.dispatch_device(fixed, fixed_layout, True, B)

            t = device_seconds(run)
            kv = int(lens.sum()) * cfg.kv_bytes_per_token
            results[f"{label} [{impl}]"] = dict(ms=t * 1e3, bytes=param_bytes + kv,
                                                mbu=(param_bytes + kv) / t / ceiling)
            print(f"{label} [{impl}]: {t * 1e3:.2f} ms", flush=True)
            if impl == "pallas" and label == "step":
                # one step at a time, as the engine runs them: where does the host's time go?
                sync = synchronous_step(runner, inputs, B)
                results["step, synchronous [pallas]"] = dict(
                    ms=sync["total_ms"], bytes=param_bytes + kv,
                    mbu=(param_bytes + kv) / (sync["total_ms"] / 1e3) / ceiling)
                meta["synchronous_step_ms"] = sync
                print("synchronous step", sync, flush=True)
                meta["host"] = {}
                meta["ops"], meta["timeline"] = traced_ops(run, steps=5, host=meta["host"])
                # the sampled tokens of six steps launched back to back, each on new input
                # tokens: equal across XLA_FLAGS variants unless a variant replays stale
                # buffer addresses (the first step's inputs) in its command buffers
                chained = [runner.dispatch(decode_inputs(runner, lengths), True, B)[0]
                           for _ in range(6)]
                meta["check_tokens"] = [np.asarray(t)[:B].tolist() for t in chained]
                # the pool after them holds the last step's K/V at the same slots: its sum
                # tells whether that step read its own inputs (random weights often sample
                # one token whatever the input, so the tokens alone may not)
                leaf = jax.tree.leaves(runner.pool)[0]
                meta["check_pool_sum"] = float(jnp.sum(jnp.abs(leaf.astype(jnp.float32))))
                hlo = runner.lower(inputs, True, B).compile().as_text()
                meta["hlo"] = hlo_summary(hlo)
                meta["op_sources"] = op_sources(
                    hlo, {n for rows in meta["ops"].values() for n, _, _ in rows})
                meta["gemms"] = gemm_calls(hlo)
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "step_hlo.txt"), "w") as f:
                    f.write(hlo)

    runner = params = None  # free the pool and weights before the kernel-only measurements
    if args.quick:
        return write(args.out, meta, results)
    # attention alone: one decode kernel call per layer over the same pages
    K, H = cfg.n_kv_heads, cfg.head_dim
    kp = jax.random.normal(jax.random.PRNGKey(1), (K, num_pages, Z, H), cfg.jnp_dtype)
    vp = jax.random.normal(jax.random.PRNGKey(2), (K, num_pages, Z, H), cfg.jnp_dtype)
    q = jax.random.normal(jax.random.PRNGKey(3), (B, cfg.n_heads, H), cfg.jnp_dtype)
    interpret = jax.devices()[0].platform == "cpu"
    attn = jax.jit(lambda q, k, v, t, l: paged_attention(q, k, v, t, l, interpret=interpret))
    tj, lj = jnp.asarray(tables), jnp.asarray(lengths)
    t = device_seconds(lambda: attn(q, kp, vp, tj, lj)) * cfg.n_layers
    kv = int(lengths.sum()) * cfg.kv_bytes_per_token
    results["attention kernel x layers"] = dict(ms=t * 1e3, bytes=kv, mbu=kv / t / ceiling)

    meta["projection_gemms_ms"] = projection_gemms(cfg, B)
    print("projections", meta["projection_gemms_ms"], flush=True)

    write(args.out, meta, results)


def write(out_dir: str, meta: dict, results: dict) -> None:
    # meta["hlo"] says whether XLA formed command buffers (CUDA graphs) for the step
    table = ["| what | ms | GB moved | MBU (of copy) |", "| --- | --- | --- | --- |"]
    table += [f"| {k} | {v['ms']:.2f} | {v['bytes'] / 1e9:.1f} | {100 * v['mbu']:.0f}% |"
              for k, v in results.items()]
    write_report(out_dir, "profile_decode", "Decode-step profile", meta, results, table)


def write_report(out_dir: str, stem: str, title: str, meta: dict, results: dict,
                 table: list[str]) -> None:
    """``stem.json`` (meta and results) and ``stem.md``: the meta as a list (without the op
    trace), ``table``, then the op trace (:func:`op_markdown`); the markdown is printed."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    lines = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in meta.items()
                                  if k not in ("ops", "timeline", "host", "check_tokens", "gemms")]
    lines += [""] + table + op_markdown(meta)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)


def compare_xla_flags(args) -> None:
    """Run the quick profile once per XLA_FLAGS variant (subprocesses) and tabulate them."""
    import subprocess

    rows = []
    for i, flags in enumerate(args.xla_flags_variants):
        out = os.path.join(args.out, f"xla_flags_{i}")
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        if flags != "default":
            env["XLA_FLAGS"] = flags
        cmd = [sys.executable, os.path.abspath(__file__), "--quick", "--model", args.model,
               "--batch", str(args.batch), "--context", *map(str, args.context),
               "--page-size", str(args.page_size), "--out", out] + (
                   ["--mha-twin"] if args.mha_twin else []) + (
                   ["--fuse-projections"] if args.fuse_projections else []) + (
                   ["--decode-config", args.decode_config] if args.decode_config else []) + [
                   f"--xla-option={o}" for o in args.xla_option]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        row = dict(flags=flags)
        try:
            with open(os.path.join(out, "profile_decode.json")) as f:
                d = json.load(f)
            step = d["results"]["step [pallas]"]
            tl = next(iter(d["meta"].get("timeline", {}).values()), {})
            ops = next(iter(d["meta"].get("ops", {}).values()), [])
            row.update(ms=step["ms"], mbu=step["mbu"], idle=tl.get("idle_ms_per_step"),
                       kernels=tl.get("kernels_per_step"), device=d["meta"]["device"],
                       command_buffers=d["meta"].get("hlo", {}).get("command_buffer_calls"),
                       top_ops=[(n[:60], round(us), round(c)) for n, us, c in ops[:8]])
        except (OSError, KeyError, StopIteration, ValueError):
            row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        rows.append(row)
        print(row, flush=True)
    lines = ["# Decode step under XLA_FLAGS variants", "",
             "| XLA_FLAGS | step ms | MBU | GPU idle ms/step | kernels/step | command buffers |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['flags']}` | fails: {r['error'][0][:80]} | | | | |")
        else:
            idle = f"{r['idle']:.2f}" if r["idle"] is not None else "—"
            lines.append(f"| `{r['flags']}` | {r['ms']:.2f} | {100 * r['mbu']:.0f}% | {idle} | "
                         f"{r['kernels'] or 0:.0f} | {r['command_buffers']} |")
    for r in rows:  # the largest ops of each variant: which GEMM kernels XLA picked
        if "error" not in r:
            lines += ["", f"Largest ops with `{r['flags']}` (µs per step, calls):", ""]
            lines += [f"- {n}: {us} µs, {c}" for n, us, c in r["top_ops"]]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_decode_xla_flags.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "profile_decode_xla_flags.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
