"""Offline serving benchmark in the style of vLLM's ``benchmark_throughput``, plus the paper's
MHA-vs-GQA comparison.

``N`` requests with random token prompts (``input_len`` tokens, or uniform in
``input_range``) each generate exactly ``output_len`` tokens (EOS ignored). All
requests arrive at once. Reported: requests/s, total and output tokens/s,
mean/p50/p99 latency and TTFT, mean TPOT, peak device memory, KV pool size
and peak use, and the decode steps' model-bandwidth utilisation (MBU: weight
bytes plus K/V bytes read per step, divided by the step time and by the
device-to-device copy bandwidth measured in the same process). The table gives
the mean over decode steps; the JSON also has ``decode_mbu_total``, all decode
steps' bytes over their summed time. Both count the whole parameter set, embedding table
included; ``decode_mbu_gathered`` and ``decode_mbu_total_gathered`` count only the embedding
rows a decode step looks up (one per sequence) when the embeddings are untied (tied, the LM
head reads the whole table anyway).

Each run (our engine on a model, or Hugging Face transformers ``generate`` as
the baseline) happens in its own subprocess, so peak memory is per run. Used
by ``optgqa bench`` and ``experiments/bench_engine.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Optional

import numpy as np

# the report's table and chart, kept importable from here (their home is bench_report)
from optgqa_jax.bench_report import bar_chart, markdown  # noqa: F401
from optgqa_jax.engine.config import EngineConfig
from optgqa_jax.layer_stack import argument_buffers
# the command line's flag parsers, kept importable from here (their home is bench_flags)
from optgqa_jax.bench_flags import (_context_buckets, _quant_spec, _seq_buckets,  # noqa: F401
                                    _token_buckets, _xla_options, seq_buckets_for)
# measurement helpers, kept importable from here (their home is optgqa_jax.timing)
from optgqa_jax.timing import (_percentiles, copy_bandwidth, copy_bandwidths,  # noqa: F401
                               source_commit, timeit, timeit_rotating)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Sizes in tokens; ``kv_tokens`` sizes the pool (default: enough for
    ``max_num_seqs`` requests of full length, so MHA and GQA hold the same number of tokens)."""

    model: str = "llama3-8b"
    num_requests: int = 1000
    input_len: int = 256
    output_len: int = 256
    input_range: Optional[tuple[int, int]] = None
    output_range: Optional[tuple[int, int]] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    kv_tokens: Optional[int] = None
    kv_memory_bytes: Optional[int] = None  # cap on the pool's bytes (same cap for the MHA twin)
    # decode-step sequence buckets (EngineConfig.seq_buckets; the CLI's come from
    # seq_buckets_for(max_num_seqs) unless --seq-buckets is given)
    seq_buckets: Optional[tuple[int, ...]] = (64, 256)
    token_buckets: Optional[tuple[int, ...]] = (1024, 2048)
    # block tables cut to these context lengths (EngineConfig.context_buckets; None: off)
    context_buckets: Optional[tuple[int, ...]] = None
    attention_impl: str = "auto"
    seed: int = 0
    hf_batch_size: int = 64
    async_scheduling: bool = True
    xla_compiler_options: Optional[dict] = None  # None: the engine's defaults for the backend
    # steps of at most this many tokens get command buffers (EngineConfig option)
    command_buffer_max_tokens: int = EngineConfig.command_buffer_max_tokens
    # held step buffers (EngineConfig.stable_step_buffers; None: the engine's default, off)
    stable_step_buffers: Optional[bool] = None
    # sorted, unique K/V writes (EngineConfig.sorted_kv_writes; None: the engine's default, on)
    sorted_kv_writes: Optional[bool] = None
    # layer-stacked weights (EngineConfig.stack_layers; None: the engine's default, off)
    stack_layers: Optional[bool] = None
    # projections whose float kernels are served stored [D_out, D_in] (EngineConfig.output_major)
    output_major: tuple[str, ...] = ()
    # K/V rows written by pallas_kernels.kv_write (EngineConfig.kv_write_kernel)
    kv_write_kernel: bool = False
    # queries and keys rotated and K/V written by one kernel (EngineConfig.rope_kv_write;
    # None: the engine's default, on with one device)
    rope_kv_write: Optional[bool] = None
    # residual adds and norms by one kernel per site (EngineConfig.add_norm_kernel; None: the
    # engine's default, on with one device)
    add_norm_kernel: Optional[bool] = None
    mha_twin: bool = False  # run the preset's MHA twin (n_kv_heads = n_heads)
    fuse_projections: bool = True  # serve from fused q/k/v and gate/up weights
    # e.g. "w4g128": random GPTQ-format weights (quant.synthetic); "w4g128s50": random BSR
    # weights with half of every row's groups removed (sparse.synthetic)
    quantize: Optional[str] = None
    # devices the model is split over (EngineConfig.tensor_parallel_size); the weights are
    # drawn directly in their sharded placement, the KV budget (kv_memory_bytes) is per
    # device, and MBU is against the devices' combined copy bandwidth (tp x one device's)
    tensor_parallel_size: int = 1
    copy_bytes: int = 2 << 30  # bytes copied to measure the copy-bandwidth ceiling


def model_config(bc: BenchConfig, max_seq_len: Optional[int] = None):
    import optgqa_jax as og

    cfg = og.ModelConfig.preset(bc.model)
    if bc.mha_twin:
        cfg = cfg.replace(n_kv_heads=cfg.n_heads)
    return cfg.replace(max_seq_len=max_seq_len) if max_seq_len else cfg


def workload(bc: BenchConfig, vocab_size: int):
    """Deterministic random prompts and output lengths."""
    rng = np.random.default_rng(bc.seed)
    n = bc.num_requests
    ins = (rng.integers(bc.input_range[0], bc.input_range[1] + 1, size=n) if bc.input_range
           else np.full(n, bc.input_len))
    outs = (rng.integers(bc.output_range[0], bc.output_range[1] + 1, size=n) if bc.output_range
            else np.full(n, bc.output_len))
    prompts = [rng.integers(0, vocab_size, size=int(k)).astype(np.int32).tolist() for k in ins]
    return prompts, [int(o) for o in outs]



def params_nbytes(params) -> int:
    """Bytes of a params tree as stored (packed codes, scales, zeros and g_idx of quantized
    kernels; every float array)."""
    import jax

    from optgqa_jax.model import is_quantized   # dense QuantizedLinear or BSR

    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_quantized)
    return int(sum(l.nbytes if is_quantized(l) else l.size * l.dtype.itemsize for l in leaves))


def random_params(cfg, bc: BenchConfig):
    """The benchmark's random weights: float (drawn in their tensor-parallel placement when
    ``bc.tensor_parallel_size > 1``, so that no device ever holds a whole model that only
    fits split), then quantized or sparsified as ``bc.quantize`` asks."""
    import jax

    import optgqa_jax as og

    key = jax.random.PRNGKey(bc.seed)
    init = lambda: og.init_params(cfg, key, fused=bc.fuse_projections)  # noqa: E731
    if bc.tensor_parallel_size == 1 and (bc.quantize or bc.output_major):
        # Drawn from the abstract tree in their final form. Quantized layers: no float copy
        # of them ever exists, so init is quick and the run's peak memory is the quantized
        # model's. Output-major kernels: drawn transposed, not transposed after drawing, which
        # left the freed kernels' memory in holes of one kernel each (the random-length run
        # at 512 sequences, ee1407e on an H100, then ran out of memory at warmup asking for
        # 1018 MiB at once).
        from optgqa_jax.model import abstract_params, init_abstract_leaves
        from optgqa_jax.weight_layout import output_major_params
        tree = abstract_params(cfg, bc.fuse_projections)
        if bc.quantize:
            tree = _quantize_random(tree, bc)
        if bc.output_major:
            tree = output_major_params(tree, bc.output_major)
        return init_abstract_leaves(tree, key)
    if bc.tensor_parallel_size > 1:
        from optgqa_jax import sharding
        sharding.check_tensor_parallel(cfg, bc.tensor_parallel_size)
        mesh = sharding.make_mesh(1, bc.tensor_parallel_size)
        specs = sharding.partition_specs(cfg, jax.eval_shape(init), mesh)
        params = jax.jit(init, out_shardings=sharding.shardings(specs, mesh))()
    else:
        params = init()
    return _quantize_random(params, bc) if bc.quantize else params


def _quantize_random(params, bc: BenchConfig):
    """`params` (float, or abstract ``jax.ShapeDtypeStruct`` leaves) with the linear layers
    replaced by random ones in the format ``bc.quantize`` names."""
    from optgqa_jax import quant
    from optgqa_jax.sparse.synthetic import parse_serving_spec, random_sparsify
    qc, sparsity, layout = parse_serving_spec(bc.quantize)
    row_block = int(layout[2:]) if layout.startswith("rb") else None
    params = (quant.random_quantize(params, qc, seed=bc.seed) if sparsity is None
              else random_sparsify(params, qc, sparsity, seed=bc.seed, row_block=row_block))
    if layout == "gm":
        from optgqa_jax.sparse.group_major import to_group_major_params
        params = to_group_major_params(params)
    elif layout == "wl":
        params = quant.to_weights_left_params(params)
    elif layout in ("pk", "pksm", "pksmf"):
        from optgqa_jax.sparse.packed import to_packed_bsr_params
        params = to_packed_bsr_params(params, "stream" if layout == "pk" else "shift_major",
                                      "float32" if layout == "pksmf" else None)
    return params


def run_engine(bc: BenchConfig) -> dict:
    """Our engine on a preset with random weights (in this process)."""
    import jax

    import optgqa_jax as og
    from optgqa_jax.engine.runner import page_bytes

    longest_request = (max(bc.input_range[1] if bc.input_range else bc.input_len, 1)
                       + (bc.output_range[1] if bc.output_range else bc.output_len))
    cfg = model_config(bc, max_seq_len=longest_request + 16)
    tp = bc.tensor_parallel_size
    t0 = time.perf_counter()
    params = random_params(cfg, bc)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    ceiling = copy_bandwidth(bc.copy_bytes) * tp   # tp devices' combined ceiling
    prompts, out_lens = workload(bc, cfg.vocab_size)
    longest = max(len(p) + o for p, o in zip(prompts, out_lens))
    kv_tokens = bc.kv_tokens or bc.max_num_seqs * longest
    num_pages = -(-kv_tokens // bc.page_size)
    if bc.kv_memory_bytes:  # a model whose KV needs more than the budget gets fewer pages
        # (the budget is per device: the pool is split by KV heads where tp divides them)
        split = tp if cfg.n_kv_heads % tp == 0 else 1
        num_pages = min(num_pages,
                        split * bc.kv_memory_bytes // page_bytes(cfg, bc.page_size))
    engine = og.Engine(cfg, params, og.EngineConfig(
        page_size=bc.page_size, num_pages=num_pages, max_num_seqs=bc.max_num_seqs,
        max_num_batched_tokens=bc.max_num_batched_tokens, max_model_len=cfg.max_seq_len,
        attention_impl=bc.attention_impl, seq_buckets=bc.seq_buckets,
        token_buckets=bc.token_buckets, context_buckets=bc.context_buckets,
        enable_prefix_caching=False,
        fuse_projections=bc.fuse_projections, async_scheduling=bc.async_scheduling,
        xla_compiler_options=bc.xla_compiler_options,
        command_buffer_max_tokens=bc.command_buffer_max_tokens, tensor_parallel_size=tp,
        stable_step_buffers=bool(bc.stable_step_buffers),
        sorted_kv_writes=(EngineConfig.sorted_kv_writes if bc.sorted_kv_writes is None
                          else bool(bc.sorted_kv_writes)), stack_layers=bool(bc.stack_layers),
        output_major=tuple(bc.output_major), kv_write_kernel=bool(bc.kv_write_kernel),
        rope_kv_write=bc.rope_kv_write, add_norm_kernel=bc.add_norm_kernel))
    t0 = time.perf_counter()
    engine.warmup(sampling=False)   # every request below is greedy
    warmup_s = time.perf_counter() - t0
    compiles_before = engine.stats.compiles
    engine.record_steps = True
    sps = [og.SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in out_lens]
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sps, progress=False)
    elapsed = time.perf_counter() - t0
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.token_ids) for o in outs)
    param_bytes = params_nbytes(params)
    decode = [s for s in engine.step_log if s.decode_only]
    step_bytes = [param_bytes + s.context_tokens * cfg.kv_bytes_per_token for s in decode]
    mbu = [b / s.seconds / ceiling for b, s in zip(step_bytes, decode)]
    # all decode steps together: robust to jitter in where one step's time ends and the next begins
    mbu_total = sum(step_bytes) / sum(s.seconds for s in decode) / ceiling if decode else None
    # the same with only the looked-up embedding rows (untied: the table is read by no matmul)
    table = params["embed"]["embedding"]       # [V, D], or quantized and stored [D, V]
    table_bytes = params_nbytes({"t": table})
    skipped = 0 if cfg.tie_embeddings else table_bytes
    row = table_bytes // cfg.vocab_size
    gathered = [b - skipped + (s.num_seqs * row if skipped else 0)
                for b, s in zip(step_bytes, decode)]
    mbu_gathered = [b / s.seconds / ceiling for b, s in zip(gathered, decode)]
    mbu_total_gathered = (sum(gathered) / sum(s.seconds for s in decode) / ceiling
                          if decode else None)
    mixed = [s for s in engine.step_log if not s.decode_only]
    mem = jax.devices()[0].memory_stats() or {}
    tpot = [(o.latency - o.ttft) / (len(o.token_ids) - 1) for o in outs if len(o.token_ids) > 1]
    return dict(
        impl="optgqa-engine", model=bc.model + (" MHA twin" if bc.mha_twin else "")
        + (f" {bc.quantize}" if bc.quantize else ""), quantize=bc.quantize,
        tensor_parallel_size=tp,
        device=jax.devices()[0].device_kind,
        jax=jax.__version__, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
        num_requests=len(outs), input_tokens=n_in, output_tokens=n_out, elapsed_s=elapsed,
        requests_per_s=len(outs) / elapsed, total_tokens_per_s=(n_in + n_out) / elapsed,
        output_tokens_per_s=n_out / elapsed,
        latency_s=_percentiles([o.latency for o in outs]), ttft_s=_percentiles([o.ttft for o in outs]),
        tpot_s=_percentiles(tpot), peak_memory_bytes=int(mem.get("peak_bytes_in_use", 0)),
        param_bytes=param_bytes, kv_pool_pages=num_pages,
        kv_pool_bytes=num_pages * page_bytes(cfg, bc.page_size),
        kv_peak_pages_used=engine.peak_pages_used,
        kv_peak_bytes_used=engine.peak_pages_used * page_bytes(cfg, bc.page_size),
        copy_bandwidth_bytes_per_s=ceiling, decode_steps=len(decode),
        decode_mbu=_percentiles(mbu) if mbu else None, decode_mbu_total=mbu_total,
        decode_mbu_gathered=_percentiles(mbu_gathered) if mbu_gathered else None,
        decode_mbu_total_gathered=mbu_total_gathered,
        decode_step_ms=_percentiles([s.seconds * 1e3 for s in decode]) if decode else None,
        # where the run's time goes: decode-only steps against mixed (prefill) steps
        time_in_decode_steps_s=sum(s.seconds for s in decode),
        time_in_mixed_steps_s=sum(s.seconds for s in mixed), mixed_steps=len(mixed),
        # the host's time between steps (scheduling, packing, launching) that no step hides
        time_outside_steps_s=elapsed - sum(s.seconds for s in engine.step_log),
        speculative_decode_steps=sum(s.speculative for s in decode),
        speculative_mixed_steps=sum(s.speculative for s in mixed),
        mixed_step_ms=_percentiles([s.seconds * 1e3 for s in mixed]) if mixed else None,
        mixed_tokens_per_step=float(np.mean([s.num_tokens for s in mixed])) if mixed else None,
        decode_seqs_per_step=float(np.mean([s.num_seqs for s in decode])) if decode else None,
        steps=engine.stats.steps, preemptions=engine.stats.preemptions,
        compiles_warmup=compiles_before, compiles_during_run=engine.stats.compiles - compiles_before,
        init_s=init_s, warmup_s=warmup_s,
        # argument buffers the engine's step takes for the weights (EngineConfig.stack_layers)
        param_buffers=argument_buffers(engine.runner.params),
        stack_layers=bool(bc.stack_layers))


def run_hf(bc: BenchConfig) -> dict:
    """Hugging Face transformers ``generate`` on the same architecture (random bf16 weights)."""
    import torch
    import transformers

    cfg = model_config(bc)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings)
    torch.manual_seed(bc.seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_cfg).eval()
    prompts, out_lens = workload(bc, cfg.vocab_size)
    if bc.input_range or bc.output_range:
        raise ValueError("the Hugging Face baseline runs fixed input/output lengths only")
    ids = torch.tensor(np.asarray(prompts), device="cuda")
    gen = dict(max_new_tokens=bc.output_len, min_new_tokens=bc.output_len, do_sample=False,
               pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids[:2], **(gen | dict(max_new_tokens=4, min_new_tokens=4)))  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lat = []
        for start in range(0, len(prompts), bc.hf_batch_size):
            b0 = time.perf_counter()
            model.generate(ids[start:start + bc.hf_batch_size], **gen)
            torch.cuda.synchronize()
            lat += [time.perf_counter() - t0] * len(prompts[start:start + bc.hf_batch_size])
            del b0
        elapsed = time.perf_counter() - t0
    n_in, n_out = len(prompts) * bc.input_len, len(prompts) * bc.output_len
    return dict(impl="hf-transformers", model=bc.model + (" MHA twin" if bc.mha_twin else ""),
                device=torch.cuda.get_device_name(),
                transformers=transformers.__version__, torch=torch.__version__,
                n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, num_requests=len(prompts),
                batch_size=bc.hf_batch_size, input_tokens=n_in, output_tokens=n_out,
                elapsed_s=elapsed, requests_per_s=len(prompts) / elapsed,
                total_tokens_per_s=(n_in + n_out) / elapsed, output_tokens_per_s=n_out / elapsed,
                latency_s=_percentiles(lat),
                peak_memory_bytes=int(torch.cuda.max_memory_allocated()))


def run_in_subprocess(kind: str, bc: BenchConfig, timeout: float = 1800) -> dict:
    """Run `kind` ("engine" or "hf") in a fresh Python process; returns its result dict."""
    cmd = [sys.executable, "-m", "optgqa_jax.benchmark", "--worker", kind,
           "--config", json.dumps(dataclasses.asdict(bc))]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return dict(impl=kind, model=bc.model, error=(proc.stderr or proc.stdout)[-2000:])


def run_suite(bc: BenchConfig, *, compare_mha: bool, hf_requests: int, out_dir: str,
              commit: str = "unknown") -> list[dict]:
    """The engine on `bc.model`, optionally its MHA twin and the HF baseline; writes results."""
    jobs = [("engine", bc)]
    if compare_mha:
        jobs.append(("engine", dataclasses.replace(bc, mha_twin=True)))
    if hf_requests:
        jobs.append(("hf", dataclasses.replace(bc, num_requests=hf_requests)))
    os.makedirs(out_dir, exist_ok=True)
    runs: list[dict] = []
    for kind, job in jobs:  # results are written after every run, so a cut-off run keeps the rest
        print(f"running {kind} on {job.model}{' (MHA twin)' if job.mha_twin else ''} ...",
              file=sys.stderr, flush=True)
        runs.append(run_in_subprocess(kind, job))
        md = _write(bc, runs, out_dir, commit)
    print(md)
    return runs


def _write(bc: BenchConfig, runs: list[dict], out_dir: str, commit: str) -> str:
    device = next((r["device"] for r in runs if "device" in r), "unknown")
    # the one-device options as the engine resolved them (None: on with one device)
    engine_cfg = EngineConfig(rope_kv_write=bc.rope_kv_write, add_norm_kernel=bc.add_norm_kernel,
                              tensor_parallel_size=bc.tensor_parallel_size)
    meta = dict(device=device, jax=next((r["jax"] for r in runs if "jax" in r), "unknown"),
                commit=commit,
                workload=f"{bc.num_requests} requests, input {bc.input_range or bc.input_len}, "
                         f"output {bc.output_range or bc.output_len}, EOS ignored",
                engine=f"max_num_seqs={bc.max_num_seqs}, "
                       f"max_num_batched_tokens={bc.max_num_batched_tokens}, "
                       f"sequence buckets {', '.join(map(str, bc.seq_buckets or ()))}, "
                       f"token buckets {', '.join(map(str, bc.token_buckets or ()))}, "
                       + (f"context buckets {', '.join(map(str, bc.context_buckets))}, "
                          if bc.context_buckets else "")
                       + f"page_size={bc.page_size}, attention={bc.attention_impl}"
                       + (f", KV pool capped at {bc.kv_memory_bytes / 2**30:.3g} GiB"
                          + (" per device" if bc.tensor_parallel_size > 1 else "")
                          if bc.kv_memory_bytes else "")
                       + (f", tensor parallel over {bc.tensor_parallel_size} devices (MBU "
                          "against their combined copy bandwidth)"
                          if bc.tensor_parallel_size > 1 else "")
                       + (", fused q/k/v and gate/up" if bc.fuse_projections
                          else ", separate q/k/v and gate/up")
                       + (f", stored [D_out, D_in]: {', '.join(bc.output_major)}"
                          if bc.output_major else "")
                       + (", K/V written by the Pallas kernel" if bc.kv_write_kernel else "")
                       + (", RoPE and K/V write in one Pallas kernel"
                          if engine_cfg.use_rope_kv_write else "")
                       + (", residual adds and norms in one Pallas kernel"
                          if engine_cfg.use_add_norm_kernel else "")
                       + (", asynchronous scheduling" if bc.async_scheduling
                          else ", synchronous scheduling")
                       + (f", XLA options {bc.xla_compiler_options}"
                          if bc.xla_compiler_options is not None else
                          f", command buffers for steps of <= {bc.command_buffer_max_tokens} tokens"),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with open(os.path.join(out_dir, "bench_engine.json"), "w") as f:
        json.dump(dict(meta=meta, config=dataclasses.asdict(bc), runs=runs), f, indent=1)
    md = markdown(meta, runs)
    with open(os.path.join(out_dir, "bench_engine.md"), "w") as f:
        f.write(md)
    try:
        bar_chart(runs, os.path.join(out_dir, "bench_engine.png"))
    except ImportError:
        print("matplotlib is not installed: no bar chart", file=sys.stderr)
    return md


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--model", default=d.model, help="preset name (random weights)")
    parser.add_argument("--num-requests", type=int, default=d.num_requests)
    parser.add_argument("--input-len", type=int, default=d.input_len)
    parser.add_argument("--output-len", type=int, default=d.output_len)
    parser.add_argument("--input-range", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--output-range", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    parser.add_argument("--page-size", type=int, default=d.page_size)
    parser.add_argument("--kv-memory-gib", type=float, default=None,
                        help="cap on the KV pool's size (GiB) for every model of the run: each "
                             "gets the pool its max_num_seqs needs, up to this; a model whose KV "
                             "needs more batches fewer sequences (what a fixed GPU allows)")
    parser.add_argument("--attention-impl", default=d.attention_impl,
                        choices=["auto", "pallas", "reference"])
    parser.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction,
                        default=d.fuse_projections,
                        help="serve from fused q/k/v and gate/up weights (EngineConfig option; "
                             "default: on)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=d.async_scheduling,
                        help="launch each decode step before the previous one's tokens are read "
                             "(EngineConfig option; default: on)")
    parser.add_argument("--sorted-kv-writes", action=argparse.BooleanOptionalAction,
                        default=EngineConfig.sorted_kv_writes,
                        help="write K/V in ascending slot order with unique slots "
                             "(EngineConfig.sorted_kv_writes; default: on)")
    parser.add_argument("--stack-layers", action=argparse.BooleanOptionalAction,
                        default=False,
                        help="serve the quantized layers and norm scales stacked across layers, "
                             "one argument buffer per weight kind (EngineConfig.stack_layers; "
                             "default: off)")
    parser.add_argument("--kv-write-kernel", action=argparse.BooleanOptionalAction,
                        default=False,
                        help="write each step's K/V rows with the Pallas kernel "
                             "pallas_kernels.kv_write instead of XLA's scatter "
                             "(EngineConfig.kv_write_kernel; default: off)")
    parser.add_argument("--rope-kv-write", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="rotate queries and keys and write K/V with one Pallas kernel per "
                             "layer (pallas_kernels.rope_kv_write; RoPE models with fused "
                             "projections; EngineConfig.rope_kv_write; default: on with one "
                             "device)")
    parser.add_argument("--add-norm-kernel", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="run each residual add and the RMS norm after it as one Pallas "
                             "kernel (pallas_kernels.add_rms_norm; EngineConfig.add_norm_kernel; "
                             "default: on with one device)")
    parser.add_argument("--output-major", default="", metavar="NAME,NAME,...",
                        help="projections (e.g. gate_up_proj,qkv_proj) whose float kernels are "
                             "served stored [D_out, D_in] (EngineConfig.output_major; default: "
                             "none)")
    parser.add_argument("--context-buckets", default=None, metavar="N,N,...",
                        help="context lengths (tokens, ascending) that block tables are cut to "
                             "(EngineConfig.context_buckets; default: off, tables span the "
                             "model's max_seq_len)")
    parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                        help="repeatable: an XLA compiler option for the engine's steps, replacing "
                             "the engine's defaults (e.g. xla_gpu_enable_command_buffer=FUSION)")
    parser.add_argument("--token-buckets", default=None, metavar="N,N,...",
                        help="token counts mixed (prefill) steps are padded to, ascending, the "
                             "last >= --max-num-batched-tokens (EngineConfig option; default: "
                             "1024, 2048 and --max-num-batched-tokens)")
    parser.add_argument("--seq-buckets", default=None, metavar="N,N,...",
                        help="sequence counts decode steps are padded to, ascending, the last "
                             ">= --max-num-seqs (EngineConfig option; default: 64 and 256 below "
                             "--max-num-seqs, then 3/4, 7/8, 15/16 and 31/32 of it where those "
                             "are multiples of 8 above 256, and --max-num-seqs itself)")
    parser.add_argument("--command-buffer-max-tokens", type=int,
                        default=d.command_buffer_max_tokens, metavar="N",
                        help="steps of at most N tokens are compiled with XLA command buffers "
                             "(CUDA graphs) on (EngineConfig option; 0: none; default: "
                             "%(default)s)")
    parser.add_argument("--quantize", default=None, metavar="SPEC",
                        help="serve random GPTQ-format weights, e.g. w4g128 (4 bits, groups of "
                             "128) or w8 (8 bits, per channel), or group-sparse BSR weights, e.g. "
                             "w4g128s50 (half of every row's groups removed; w4g128s50gm: "
                             "served in group-major order; w4g128s50pk: each layer's arrays "
                             "packed into one; w4g128s50pksm: packed, each block's codes "
                             "in shift-major order, x read as given; w4g128s50pksmf: that with "
                             "x handed to the kernel in float32); append +head and/or +emb to "
                             "quantize the LM head and the token table too (w4g128+head+emb): "
                             "the speed and memory of a quantized model of the preset")
    parser.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                        metavar="N",
                        help="split the model over the first N devices (EngineConfig option); "
                             "--kv-memory-gib is then per device and MBU is against the N "
                             "devices' combined copy bandwidth")
    parser.add_argument("--compare-mha", action="store_true",
                        help="also run the model's MHA twin and print the paper's comparison")
    parser.add_argument("--hf-requests", type=int, default=0,
                        help="also time Hugging Face transformers generate on this many requests")
    parser.add_argument("--hf-batch-size", type=int, default=d.hf_batch_size,
                        help="prompts per Hugging Face generate call")
    parser.add_argument("--out", default=os.path.join("experiments", "results"))


def config_from_args(args) -> BenchConfig:
    token_buckets = tuple(b for b in BenchConfig.token_buckets if b < args.max_num_batched_tokens)
    token_buckets = _token_buckets(getattr(args, "token_buckets", None),
                                   args.max_num_batched_tokens) or (
        token_buckets + (args.max_num_batched_tokens,))
    seq_buckets = (_seq_buckets(getattr(args, "seq_buckets", None), args.max_num_seqs)
                   or seq_buckets_for(args.max_num_seqs))
    return BenchConfig(
        model=args.model, num_requests=args.num_requests, input_len=args.input_len,
        output_len=args.output_len,
        input_range=tuple(args.input_range) if args.input_range else None,
        output_range=tuple(args.output_range) if args.output_range else None,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size, attention_impl=args.attention_impl,
        kv_memory_bytes=int(args.kv_memory_gib * 2**30) if args.kv_memory_gib else None,
        fuse_projections=args.fuse_projections, hf_batch_size=args.hf_batch_size,
        async_scheduling=args.async_scheduling, quantize=_quant_spec(args.quantize),
        xla_compiler_options=_xla_options(args.xla_option),
        command_buffer_max_tokens=args.command_buffer_max_tokens,
        sorted_kv_writes=bool(getattr(args, "sorted_kv_writes", EngineConfig.sorted_kv_writes)),
        stack_layers=bool(getattr(args, "stack_layers", False)),
        output_major=tuple(n for n in getattr(args, "output_major", "").split(",") if n),
        kv_write_kernel=bool(getattr(args, "kv_write_kernel", False)),
        rope_kv_write=getattr(args, "rope_kv_write", None),
        add_norm_kernel=getattr(args, "add_norm_kernel", None),
        seq_buckets=seq_buckets,
        token_buckets=token_buckets,
        context_buckets=_context_buckets(getattr(args, "context_buckets", None)),
        tensor_parallel_size=args.tensor_parallel_size)


def _worker_main(argv) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["engine", "hf"], required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    d = json.loads(args.config)
    for key in ("input_range", "output_range", "seq_buckets", "token_buckets", "context_buckets",
                "output_major"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    bc = BenchConfig(**d)
    result = run_engine(bc) if args.worker == "engine" else run_hf(bc)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
