"""GQSA evaluation: group-sparse 4-bit weights (BSR) against dense quantization, on one GPU.

Part ``speed``: per-layer decode time on the Llama-3-8B linear shapes (fused q/k/v
4096×6144, o 4096×4096, fused gate/up 4096×28672, down 14336×4096), random weights, at
M = 1 and 16 rows of x:

* ``bf16``: the bfloat16 product (XLA/cuBLAS);
* ``w4g128`` and ``w2g128``: dense GPTQ-layout weights, ``pallas_kernels.quant_matmul``;
* ``w4g128s30`` / ``w4g128s50``: 30% / 50% of the groups of every row removed, the rest in
  BSR form, ``pallas_kernels.bsr_quant_matmul`` (the rules' tiles, and at one row the best
  of a search over blocks per program and warps; the best tiles also on the block-list
  schedule, ``block list µs``; with ``--table PATH`` the winners go into that tuning table);
* ``w4g128sNN repack`` (more than one row): the engine's route there, the kept codes
  repacked into the dense layout on the device and the dense W4 kernel; ``repack (gather)``
  the same with ``repacked_dense(method="gather")``; ``gathered``: the block-map kernel
  (``pallas_kernels.bsr_gather_quant_matmul``), the best of a few tile settings.

The rows and tile searches live in ``experiments/gqsa_speed.py``.

Each row: µs per product, bytes stored, GB/s of the bytes read, % of the copy ceiling,
speed-up over bf16 and time relative to dense W4 (the issue's target: W4S50 at most 0.65×),
and the relative error against the float32 product with the dequantized weight. Timing as in
``bench_quant.py`` (``timeit_rotating``: weights rotated past the L2 cache).

Part ``accuracy``: held-out perplexity of a model (default SmolLM2-135M; or the project's
trained reference checkpoint) compressed each way, with and without GQSA's calibration stages
(``optgqa_jax.sparse.calibrate``): ``float``; ``2:4`` (magnitude 2:4 pruning of the float
weights); ``w4`` (GPTQ, groups of ``--group-size``); ``w4+2:4`` (GPTQ with the 2:4 mask);
``w4s30``/``w4s50`` (GQSA: 30%/50% of each row's groups pruned by Hessian score, GPTQ on the
pruned layer); ``w2g64``/``w2g128`` (GPTQ). A suffix picks the calibration: ``+bqpo``,
``+e2e`` or ``+both``. The calibration windows come from the corpus's calibration split, the
perplexity from its test split (never overlapping).

Part ``engine`` (one subprocess per run, as ``optgqa bench``): the Llama-3-8B shape with
random weights in bfloat16, dense W4 g128, W2 g128 and BSR W4S30/W4S50 (``--quantize
w4g128s50``), decoding 256 tokens after 256-token prompts with 1 and with 16 sequences at a
time: output tokens/s, parameter bytes, peak memory.

Usage::

    python experiments/gqsa_eval.py --part speed [--rows 1,16] [--table PATH] [--out DIR]
    python experiments/gqsa_eval.py --part engine [--out DIR]
    python experiments/gqsa_eval.py --part accuracy [--model smollm2-135m] [--group-size 64]
        [--runs w4,w4s50,w4s50+both,...] [--nsamples 128] [--resume] [--out DIR]
    # the project's RoPE reference model (an optgqa checkpoint, no tokenizer of its own):
    python experiments/train_reference.py --save-tokens ids/        # where SmolLM2 is installed
    python experiments/gqsa_eval.py --part accuracy --model checkpoints/reference/rope \
        --tokens ids/ --group-size 128

Writes ``gqsa_speed.{json,md}``, ``gqsa_engine.{json,md}`` or ``gqsa_accuracy.{json,md,png}``
under ``--out`` (rewritten
after every row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import sparse  # noqa: E402
from optgqa_jax.engine.runner import parse_xla_options  # noqa: E402
from gqsa_speed import SHAPES, markdown, speed_rows  # noqa: E402  (--part speed)


# ----------------------------------------------------------------------------- accuracy
RUNS = ("float", "2:4", "w4", "w4+bqpo", "w4+e2e", "w4+both", "w4+2:4", "w4+2:4+both",
        "w4s30", "w4s30+both", "w4s50", "w4s50+bqpo", "w4s50+e2e", "w4s50+both",
        "w2g64", "w2g64+both", "w2g128", "w2g128+both")
# more runs, only when named in --runs: W4S50 with one mask per block of 4, 8 or 16 output
# features (SparsityConfig.row_block), the pattern a dense-tile kernel could read
EXTRA_RUNS = ("w4s50rb4", "w4s50rb8", "w4s50rb16", "w4s50rb32", "w4s50rb64",
              "w4s50rb4+both", "w4s50rb8+both", "w4s50rb16+both", "w4s50rb32+both",
              "w4s50rb64+both", "w4s50rb16r", "w4s50rb32r", "w4s50rb16r+both",
              "w4s50rb32r+both")
# runs whose base ends in "r": the MLP's hidden features reordered first
# (sparse.reorder.reorder_mlp_for_row_blocks; the float model unchanged)
CALIBRATION = {"": (False, False), "+bqpo": (True, False), "+e2e": (False, True),
               "+both": (True, True)}


def parse_run(run: str, group_size: int):
    """(base, calibration suffix, QuantConfig or None, sparsity or None) of a run name."""
    from optgqa_jax.quant import QuantConfig
    for suffix in ("+bqpo", "+e2e", "+both"):
        if run.endswith(suffix):
            base = run[: -len(suffix)]
            break
    else:
        base, suffix = run, ""
    nm = sparse.NMSparsity(2, 4)
    table = {"float": (None, None), "2:4": (None, nm),
             "w4": (QuantConfig(bits=4, group_size=group_size), None),
             "w4+2:4": (QuantConfig(bits=4, group_size=group_size), nm),
             "w4s30": (QuantConfig(bits=4, group_size=group_size), sparse.SparsityConfig(0.3)),
             "w4s50": (QuantConfig(bits=4, group_size=group_size), sparse.SparsityConfig(0.5)),
             **{f"w4s50rb{b}": (QuantConfig(bits=4, group_size=group_size),
                                sparse.SparsityConfig(0.5, row_block=b)) for b in (4, 8, 16, 32, 64)},
             **{f"w4s50rb{b}r": (QuantConfig(bits=4, group_size=group_size),
                                 sparse.SparsityConfig(0.5, row_block=b)) for b in (16, 32)},
             "w2g64": (QuantConfig(bits=2, group_size=64), None),
             "w2g128": (QuantConfig(bits=2, group_size=128), None)}
    if base not in table or (suffix and table[base][0] is None):
        raise ValueError(f"unknown run {run!r}; runs are {', '.join(RUNS + EXTRA_RUNS)}")
    return base, suffix, *table[base]


def accuracy(a) -> None:
    from optgqa_jax import data, token_splits
    from optgqa_jax.evaluate import windows_perplexity
    from optgqa_jax.quant import quantize
    from optgqa_jax.registry import load_model
    from optgqa_jax.sparse.calibrate import CalibrationConfig, calibrate
    runs = a.runs.split(",") if a.runs else list(RUNS)
    for r in runs:
        parse_run(r, a.group_size)                     # unknown names fail before any work
    settings = dict(model=a.model, corpus=a.corpus, group_size=a.group_size,
                    nsamples=a.nsamples, seqlen=a.seqlen, batch_size=a.batch_size,
                    bqpo_steps=a.bqpo_steps, e2e_steps=a.e2e_steps, e2e_lr=a.e2e_lr,
                    val_fraction=a.val_fraction, max_eval_windows=a.max_eval_windows)
    path = os.path.join(a.out, "gqsa_accuracy.json")
    res = dict(settings=settings, runs=[])
    if a.resume and os.path.isfile(path):
        with open(path) as f:
            res = json.load(f)
        if res["settings"] != settings:
            raise ValueError(f"--resume: {path} was run with other settings {res['settings']}")
    model = load_model(a.model)
    cfg, params, tok = model.cfg, model.params, model.tokenizer
    if a.tokens:       # ids saved by token_splits.save_token_splits: no tokenizer needed
        ids = {s: token_splits.load_token_split(a.tokens, a.corpus, s, vocab_size=cfg.vocab_size)
               for s in ("calibration", "test")}
        calib = data.ids_windows(ids["calibration"][0], a.seqlen, n=a.nsamples, seed=0)
        test = data.ids_windows(ids["test"][0], a.seqlen)[:a.max_eval_windows]
        tokenizer = ids["test"][1]["tokenizer"]
    else:
        calib = data.corpus_windows(tok, a.corpus, "calibration", a.seqlen, n=a.nsamples,
                                    seed=0)
        test = data.corpus_windows(tok, a.corpus, "test", a.seqlen)[:a.max_eval_windows]
        tokenizer = a.model
    res["meta"] = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                       commit=B.source_commit(), tokenizer=tokenizer,
                       eval_windows=int(test.shape[0]),
                       eval_tokens=int(test.shape[0] * (test.shape[1] - 1)))
    done = {r["run"] for r in res["runs"]}
    compressed = {}                                   # base run -> params before calibration

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, "gqsa_accuracy.md"), "w") as f:
            f.write(accuracy_markdown(res))
        accuracy_plot(res, os.path.join(a.out, "gqsa_accuracy.png"))

    for run in runs:
        if run in done:
            continue
        base, suffix, qc, sp = parse_run(run, a.group_size)
        t0 = time.perf_counter()
        record = dict(run=run, base=base, calibration=suffix.lstrip("+") or "none")
        reordered = base.endswith("r")
        float_params = params
        if reordered:
            from optgqa_jax.sparse.reorder import reorder_mlp_for_row_blocks
            float_params = reorder_mlp_for_row_blocks(cfg, params, group_size=a.group_size,
                                                      sparsity=sp.sparsity)[0]
        try:
            if base not in compressed:
                if qc is None:
                    compressed[base] = (params if sp is None
                                        else sparse.prune_nm_params(params, sp), None)
                else:
                    _, qp, rep = quantize(cfg, float_params, calib, qc, sparsity=sp,
                                          batch_size=a.batch_size, progress=True)
                    compressed[base] = (qp, rep.seconds)
            p, quant_s = compressed[base]
            record["quant_seconds"] = quant_s
            if suffix:
                bq, e2 = CALIBRATION[suffix]
                cc = CalibrationConfig(bqpo=bq, e2e=e2, bqpo_steps=a.bqpo_steps,
                                       e2e_steps=a.e2e_steps, e2e_lr=a.e2e_lr,
                                       val_fraction=a.val_fraction, batch_size=a.batch_size)
                p, crep = calibrate(cfg, float_params, p, calib, cc, progress=True)
                record["calibration_report"] = crep
            record["perplexity"] = windows_perplexity(cfg, p, test, batch_size=a.batch_size,
                                                      progress=True)
        except ValueError as e:          # e.g. a group size that does not divide a layer
            record["error"] = str(e)[:300]
        record["seconds"] = time.perf_counter() - t0
        record.update(device=res["meta"]["device"], commit=res["meta"]["commit"])
        res["runs"].append(record)
        save()
        print(f"{run}: " + (f"perplexity {record['perplexity']:.3f}" if "perplexity" in record
                            else f"error {record['error']}") + f" ({record['seconds']:.0f} s)",
              flush=True)


def accuracy_markdown(res: dict) -> str:
    s, m = res["settings"], res.get("meta", {})
    lines = [f"# GQSA accuracy: {s['model']} on {s['corpus']} (test split)", "",
             f"Device {m.get('device')}, jax {m.get('jax')}, commits "
             f"{', '.join(sorted({r['commit'] for r in res['runs']}))}. Calibration: "
             f"{s['nsamples']} windows of {s['seqlen']} tokens ({s.get('val_fraction', 0):.0%} of "
             f"them held out to judge the calibration stages); BQPO {s['bqpo_steps']} steps per "
             f"block, E2E-OQP {s['e2e_steps']} steps (lr {s.get('e2e_lr')}); evaluation: "
             f"{m.get('eval_windows')} windows "
             f"({m.get('eval_tokens')} predicted tokens). w4 groups of {s['group_size']}; sNN = "
             "NN% of each row's groups pruned (GQSA).", "",
             "| run | calibration | perplexity | seconds |", "| --- | --- | ---: | ---: |"]
    for r in res["runs"]:
        val = f"{r['perplexity']:.2f}" if "perplexity" in r else f"fails: {r['error'][:80]}"
        lines.append(f"| {r['base']} | {r['calibration']} | {val} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def accuracy_plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["runs"] if "perplexity" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 3.8))
    ax.bar(range(len(rows)), [r["perplexity"] for r in rows],
           color=["C0" if r["calibration"] == "none" else "C1" for r in rows])
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=60, ha="right",
                  fontsize=7)
    ax.set(yscale="log", ylabel="held-out perplexity", title=res["settings"]["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- engine
ENGINE_FORMATS = ("bf16", "w4g128", "w2g128", "w4g128s30", "w4g128s50", "w4g128s50gm",
                  "w4g128s50pk", "w4g128s50pksm", "w4g128s50pksmf")


def engine_config(spec: str, seqs: int, xla_options=None,
                  stable_step_buffers=None, stack_layers=None) -> "B.BenchConfig":
    """The engine run of one format at `seqs` sequences: `seqs` requests of 256/256 tokens,
    all admitted at once, one decode bucket and one prefill bucket (the prompts' tokens, at
    most 2048 a step), so that each run compiles only the two greedy programs it uses.
    ``xla_options``: XLA compiler options replacing the engine's defaults (None keeps them);
    ``stable_step_buffers``, ``stack_layers``: the engine options of those names (None: their
    defaults)."""
    budget = min(256 * seqs, 2048)
    return B.BenchConfig(model="llama3-8b", num_requests=seqs, max_num_seqs=seqs,
                         seq_buckets=(seqs,), max_num_batched_tokens=budget,
                         token_buckets=(budget,), quantize=None if spec == "bf16" else spec,
                         fuse_projections=True, kv_memory_bytes=16 * 2 ** 30,
                         xla_compiler_options=xla_options,
                         stable_step_buffers=stable_step_buffers, stack_layers=stack_layers)


def engine(a) -> None:
    """Each format at each sequence count in its own subprocess; with ``--resume``, runs
    already in ``gqsa_engine.json`` (without an error) are kept and skipped."""
    path = os.path.join(a.out, "gqsa_engine.json")
    res = dict(meta=dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                         commit=B.source_commit(), xla_options=a.xla_options,
                         xla_flags=os.environ.get("XLA_FLAGS", ""),
                         stable_step_buffers=a.stable_step_buffers,
                         stack_layers=a.stack_layers,
                         bsr_batched_route=sparse.bsr.batched_route()), runs=[])
    if a.resume and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old["meta"]["device"] != res["meta"]["device"]:
            raise ValueError(f"--resume: {path} was measured on {old['meta']['device']}")
        if old["meta"].get("xla_options") != a.xla_options:
            raise ValueError(f"--resume: {path} was measured with XLA options "
                             f"{old['meta'].get('xla_options')}, not {a.xla_options}")
        if old["meta"].get("bsr_batched_route", "repack") != res["meta"]["bsr_batched_route"]:
            raise ValueError(f"--resume: {path} was measured with BSR batched route "
                             f"{old['meta'].get('bsr_batched_route', 'repack')}, not "
                             f"{res['meta']['bsr_batched_route']}")
        if old["meta"].get("stack_layers") != a.stack_layers:
            raise ValueError(f"--resume: {path} was measured with stack_layers="
                             f"{old['meta'].get('stack_layers')}, not {a.stack_layers}")
        res["runs"] = [r for r in old["runs"] if "error" not in r]
        res["meta"]["commit"] = ", ".join(dict.fromkeys([old["meta"]["commit"],
                                                         res["meta"]["commit"]]))
    done = {(r["format"], r["sequences"]) for r in res["runs"]}
    for spec in a.engine_formats:
        for seqs in a.sequences:
            if (spec, seqs) in done:
                continue
            print(f"engine {spec} x{seqs} ...", flush=True)
            r = B.run_in_subprocess("engine", engine_config(spec, seqs, a.xla_options,
                                                            a.stable_step_buffers,
                                                            a.stack_layers))
            r.update(format=spec, sequences=seqs)
            res["runs"].append(r)
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
            with open(os.path.join(a.out, "gqsa_engine.md"), "w") as f:
                f.write(engine_markdown(res))


def engine_markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# GQSA engine decode, Llama-3-8B shape (random weights)", "",
             f"Device {m['device']}, jax {m['jax']}, commit {m['commit']}. 256-token prompts, "
             "256 generated tokens per sequence; output tokens/s against bfloat16 and dense W4 "
             "at the same number of sequences. XLA options: "
             + (f"{m['xla_options']}." if m.get("xla_options") else "the engine's defaults.")
             + f" BSR layers at 2-64 rows: the {m.get('bsr_batched_route', 'repack')} route."
             + (f" XLA_FLAGS: `{m['xla_flags']}`." if m.get("xla_flags") else "")
             + (f" Held step buffers: {m['stable_step_buffers']}."
                if m.get("stable_step_buffers") is not None else "")
             + (f" Stacked layers: {m['stack_layers']}."
                if m.get("stack_layers") is not None else ""),
             "",
             "| format | sequences | output tok/s | × bf16 | × dense w4g128 | param GiB | "
             "peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    speed = {(r["format"], r["sequences"]): r["output_tokens_per_s"]
             for r in res["runs"] if "error" not in r}
    ratio = lambda t, ref: "" if ref is None else f"{t / ref:.2f}"  # noqa: E731
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"| {r['format']} | {r['sequences']} | fails: {r['error'][-100:]!r} "
                         "| | | | |")
            continue
        t = r["output_tokens_per_s"]
        lines.append(f"| {r['format']} | {r['sequences']} | {t:,.0f} | "
                     f"{ratio(t, speed.get(('bf16', r['sequences'])))} | "
                     f"{ratio(t, speed.get(('w4g128', r['sequences'])))} | "
                     f"{r['param_bytes'] / 2 ** 30:.2f} | {r['peak_memory_bytes'] / 2 ** 30:.1f} |")
    return "\n".join(lines) + "\n"


def _subset(p, flag: str, value: str, allowed) -> list:
    picked = [x for x in value.split(",") if x]
    bad = [x for x in picked if x not in allowed]
    if bad or not picked:
        p.error(f"{flag} {value!r}: expected a comma-separated subset of {','.join(allowed)}")
    return picked


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("speed", "engine", "accuracy"), default="speed")
    p.add_argument("--rows", default="1,16", help="speed: comma-separated row counts M")
    p.add_argument("--shapes", default=",".join(n.split()[0] for n in SHAPES),
                   help="speed: comma-separated subset of the layer shapes")
    p.add_argument("--sparsities", default="0.3,0.5",
                   help="speed: comma-separated fractions of groups removed, in (0, 1)")
    p.add_argument("--no-group-major", dest="group_major", action="store_false",
                   help="speed: skip the group-major twins of the BSR formats")
    p.add_argument("--confirm-rounds", type=int, default=0, metavar="N",
                   help="speed: time the search's best BSR settings, the rules' tiles and "
                        "dense W4 again in N interleaved rounds and report the lowest median")
    p.add_argument("--all-bsr-options", action="store_true",
                   help="speed: also try the BSR kernel options timed slower before (raw_x, "
                        "bf16_x, index_magic, row_loop) on each one-row case's best tiles")
    p.add_argument("--table", default=None, metavar="PATH",
                   help="speed: merge each BSR case's best tiles, where they beat the rules', "
                        "into this bsr_quant_matmul tuning table (pallas_kernels.tuning; the "
                        "packaged one is pallas_kernels/tuning/bsr_quant_matmul.json)")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="engine: repeatable; an XLA compiler option of the engine's steps, "
                        "replacing the engine's defaults (e.g. xla_gpu_enable_command_buffer="
                        "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL for CUDA graphs)")
    p.add_argument("--stack-layers", choices=("auto", "on", "off"), default="auto",
                   help="engine: EngineConfig.stack_layers (auto: the engine's default, off)")
    p.add_argument("--stable-step-buffers", choices=("auto", "on", "off"), default="auto",
                   help="engine: EngineConfig.stable_step_buffers (auto: the engine's default, "
                        "off)")
    p.add_argument("--engine-formats", default=",".join(ENGINE_FORMATS),
                   help="engine: comma-separated subset of the formats")
    p.add_argument("--sequences", default="1,16",
                   help="engine: comma-separated numbers of sequences decoded together")
    p.add_argument("--model", default="smollm2-135m", help="accuracy: model name or checkpoint")
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--group-size", type=int, default=64,
                   help="accuracy: w4 group size (SmolLM2's 576-wide layers need 64)")
    p.add_argument("--runs", default=None, help=f"accuracy: subset of {','.join(RUNS)}")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bqpo-steps", type=int, default=100)
    p.add_argument("--e2e-steps", type=int, default=100)
    p.add_argument("--e2e-lr", type=float, default=5e-4)
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="accuracy: calibration windows held out to judge the calibration stages")
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--resume", action="store_true",
                   help="accuracy, engine: skip the runs already in the JSON")
    p.add_argument("--tokens", default=None, metavar="DIR",
                   help="accuracy: token ids saved by train_reference.py --save-tokens (for "
                        "checkpoints without a tokenizer, such as the reference models)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gqsa"))
    a = p.parse_args(argv)
    a.shapes = _subset(p, "--shapes", a.shapes, [n.split()[0] for n in SHAPES])
    a.engine_formats = _subset(p, "--engine-formats", a.engine_formats, ENGINE_FORMATS)
    a.stable_step_buffers = {"auto": None, "on": True, "off": False}[a.stable_step_buffers]
    a.stack_layers = {"auto": None, "on": True, "off": False}[a.stack_layers]
    try:
        a.xla_options = parse_xla_options(a.xla_option) or None
    except ValueError as e:
        p.error(f"--xla-option: {e}")
    try:
        a.sequences = [int(x) for x in a.sequences.split(",") if x]
        a.rows = [int(x) for x in a.rows.split(",") if x]
    except ValueError:
        p.error(f"--sequences {a.sequences!r} / --rows {a.rows!r}: expected comma-separated "
                "positive integers")
    try:
        a.sparsities = [float(x) for x in a.sparsities.split(",") if x]
    except ValueError:
        a.sparsities = []
    if not a.sparsities or not all(0 < x < 1 for x in a.sparsities):
        p.error(f"--sparsities {a.sparsities!r}: expected comma-separated fractions in (0, 1)")
    if a.confirm_rounds < 0:
        p.error(f"--confirm-rounds {a.confirm_rounds}: expected an integer >= 0")
    if not a.sequences or min(a.sequences) < 1 or not a.rows or min(a.rows) < 1:
        p.error(f"--sequences {a.sequences} / --rows {a.rows}: expected positive integers")
    os.makedirs(a.out, exist_ok=True)
    if a.part == "engine":
        engine(a)
        print(f"wrote {a.out}/gqsa_engine.{{json,md}}")
        return
    if a.part == "accuracy":
        accuracy(a)
        print(f"wrote {a.out}/gqsa_accuracy.{{json,md,png}}")
        return
    res = dict(meta=dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                         commit=B.source_commit(), ceiling=B.copy_bandwidth()), speed=[])

    def save():
        with open(os.path.join(a.out, "gqsa_speed.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, "gqsa_speed.md"), "w") as f:
            f.write(markdown(res))

    speed_rows(res["meta"]["ceiling"], a.rows, res["speed"], save, shapes=a.shapes,
               sparsities=a.sparsities, group_major=a.group_major, table=a.table,
               all_options=a.all_bsr_options, confirm_rounds=a.confirm_rounds)
    print(f"wrote {a.out}/gqsa_speed.{{json,md}}")


if __name__ == "__main__":
    main()
