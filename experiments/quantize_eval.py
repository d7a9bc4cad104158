"""Held-out perplexity of a quantized model: RTN, GPTQ and its options, at 8/4/3/2 bits.

For one model and one corpus: perplexity on the test split at full precision and after quantizing
every linear layer with each method (:data:`METHODS`) at each bit width and group size, calibrated
on ``--nsamples`` random windows of ``--seqlen`` tokens of the calibration split (disjoint from
the test text, see ``optgqa_jax.data``).

Defaults, and why:

* ``--seqlen 512``: SmolLM2-135M reads up to 8192 tokens (its GGUF's context length). 128 x 512
  = 65k calibration tokens is a quarter of GPTQ's 128 x 2048, which cuts the calibration forward
  passes and the gradient pass of ``grad_hessian`` 4x (a CPU can time one configuration; the
  study needs a GPU) and still gives every Hessian far more tokens than its layer has inputs
  (at most 1536). ``--eval-seqlen`` defaults to the same 512: perplexity depends on the window
  length (shorter windows, less context), so compare only results of equal ``eval_seqlen``.
* ``--group-sizes 64,-1``: the usual 128 does not divide SmolLM2's d_model = 576 = 4.5 x 128,
  and ``QuantConfig`` (like the packed GPTQ format) needs groups that tile every layer's inputs;
  64 is the largest power of two dividing every input dimension (576, 576, 1536). Pass
  ``--group-sizes 128,-1`` for models where 128 divides (a list that starts with -1 needs the
  ``=`` form, ``--group-sizes=-1,64``, or argparse reads it as an option).

``--tokens DIR`` reads token ids saved by ``experiments/train_reference.py --save-tokens DIR``
(``<corpus>-<split>.npy`` and ``tokens.json``) instead of tokenizing: for models without a
tokenizer of their own (the project's reference models, saved as optgqa checkpoints, use
SmolLM2's) and machines without the tokenizer's files. The windows are cut exactly as from
the tokenized corpus.

The results JSON is rewritten after every run, so a run cut short loses nothing, and ``--resume``
skips the runs already in it (the settings must match). It also writes a markdown table (rows:
method, columns: bits x group size) and a PNG (perplexity against bits, log scale, one panel per
group size), stamped with the device, the jax version and the git commit.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import os
import re
import sys
import time
from typing import Optional

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import data, token_splits  # noqa: E402
from optgqa_jax.benchmark import source_commit as commit  # noqa: E402
from optgqa_jax.evaluate import windows_perplexity  # noqa: E402
from optgqa_jax.quant import QuantConfig, quantize  # noqa: E402
from optgqa_jax.registry import load_model  # noqa: E402

# name -> (quantize's method, QuantConfig options)
METHODS = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptq+act-order": ("gptq", {"act_order": True}),
    "gptq+grad-hessian": ("gptq", {"grad_hessian": True}),
    "gptq+learn-scales": ("gptq", {"learn_scales": True}),
    "gptq+all": ("gptq", {"act_order": True, "grad_hessian": True, "learn_scales": True}),
}
FLOAT = "float"


@dataclasses.dataclass(frozen=True)
class Study:
    """What to measure. ``bits``, ``group_sizes`` and ``methods`` pick the runs; every other
    field is a setting that all runs of one results file share (checked by ``--resume``)."""

    model: str = "smollm2-135m"
    corpus: str = "shakespeare"
    bits: tuple = (8, 4, 3, 2)
    group_sizes: tuple = (64, -1)
    methods: tuple = tuple(METHODS)
    nsamples: int = 128
    seqlen: int = 512
    eval_seqlen: int = 512
    max_eval_windows: Optional[int] = None
    seed: int = 0
    batch_size: int = 8
    sym: bool = True
    damp: float = 0.01
    learn_steps: int = 200

    def settings(self) -> dict:
        picked = ("bits", "group_sizes", "methods")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in picked}


def gguf_types(spec: str) -> Optional[dict]:
    """Tensor types of the GGUF file behind `spec` ({kind: {type: count}}), None if not GGUF."""
    from optgqa_jax.gguf_loader import PRETRAINED, pretrained_path

    path = pretrained_path(spec) if spec in PRETRAINED else spec if spec.endswith(".gguf") else None
    if path is None:
        return None
    import gguf  # only for GGUF files: checkpoints evaluate without the package
    kinds = collections.defaultdict(collections.Counter)
    for t in gguf.GGUFReader(path).tensors:
        kind = ("norm" if "norm" in t.name else "linear") if t.name.startswith("blk.") else t.name
        kinds[kind][t.tensor_type.name] += 1
    return {"file": os.path.basename(path), **{k: dict(v) for k, v in sorted(kinds.items())}}


def quantize_and_evaluate(study: Study, cfg, params, calib, test, method: str, bits: int,
                          group_size: int) -> dict:
    """Quantize with one method and evaluate it; returns the run's record."""
    kind, options = METHODS[method]
    qc = QuantConfig(bits=bits, group_size=group_size, sym=study.sym, damp=study.damp,
                     learn_steps=study.learn_steps, **options)
    _, qparams, report = quantize(cfg, params, calib, qc, method=kind,
                                  batch_size=study.batch_size, progress=True)
    t0 = time.perf_counter()
    ppl = windows_perplexity(cfg, qparams, test, batch_size=study.batch_size, progress=True)
    return dict(method=method, bits=bits, group_size=group_size, perplexity=ppl,
                quant_seconds=report.seconds, eval_seconds=time.perf_counter() - t0,
                mean_layer_error=report.mean_error(), qc=qc.to_dict())


def key(run: dict) -> tuple:
    return run["method"], run["bits"], run["group_size"]


def save(res: dict, out_dir: str) -> None:
    """Rewrite the JSON (atomically), the markdown table and the plot."""
    path = os.path.join(out_dir, "quantize_eval.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "quantize_eval.md"), "w") as f:
        f.write(markdown(res))
    plot(res, os.path.join(out_dir, "quantize_eval.png"))


GGUF_TYPES = {  # llama.cpp block formats
    "Q4_1": "blocks of 32 inputs, uint4 codes, one fp16 scale d and one fp16 minimum m each, "
            "w = d*q + m: 5 bits/weight",
    "Q8_0": "blocks of 32 inputs, int8 codes, one fp16 scale d each, w = d*q: 8.5 bits/weight",
}


def gguf_note(types: Optional[dict]) -> list[str]:
    """Markdown paragraph on a GGUF baseline (`types` from :func:`gguf_types`)."""
    if not types:
        return []
    name = lambda t: f"{t} ({GGUF_TYPES[t]})" if t in GGUF_TYPES else t
    fmt = lambda kind: ", ".join(f"{n} x {name(t)}" for t, n in types.get(kind, {}).items())
    return [
        f"**The baseline is already quantized.** `{types['file']}` stores the linear weights of "
        f"the blocks as {fmt('linear')}; the token embedding, tied to the LM head (which stays "
        f"unquantized in every run), as {fmt('token_embd.weight')}; the block norms as "
        f"{fmt('norm')}. "
        "The full-precision row is this file dequantized to float32, not the original bf16 "
        "release, so every other row measures the cost of *re*-quantizing weights that already "
        "lie on a 4-bit grid. 8 bits places each block's at most 16 distinct values within a "
        "small fraction of their spacing: near-zero loss is expected, not a sign of a good "
        "quantizer. 4 bits cannot reproduce Q4_1 (a group of 64 inputs, or a whole row, spans "
        "several blocks with different scales and offsets, and our zero point is an integer "
        "where Q4_1's offset is any fp16 value), so the 4-bit loss is that of a second 4-bit "
        "rounding; 3 and 2 bits lie below the source's precision. None of these numbers is "
        "comparable with published GPTQ results on the bf16 release.", ""]


def markdown(res: dict) -> str:
    s, meta = res["settings"], res["meta"]
    runs = [r for r in res["runs"] if r["method"] != FLOAT]
    base = next((r for r in res["runs"] if r["method"] == FLOAT), None)
    cols = sorted({(r["bits"], r["group_size"]) for r in runs}, key=lambda c: (c[1] == -1, -c[0]))
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    by_key = {key(r): r for r in runs}
    cell = lambda r: "" if r is None else f"{r['perplexity']:.2f} ({r['quant_seconds']:.0f} s)"
    commits = list(dict.fromkeys(r.get("commit", meta["commit"]) for r in res["runs"]))
    stamp = (f"commit {commits[0]}" if len(commits) == 1 else
             f"commits {', '.join(commits)} (each run's commit is in the JSON)")
    lines = [f"# Quantized perplexity: {s['model']} on {s['corpus']} (test split)", "",
             f"Device {meta['device']}, jax {meta['jax']}, {stamp}. Calibration: "
             f"{s['nsamples']} random windows of {s['seqlen']} tokens of the calibration split "
             f"(seed {s['seed']}), damp {s['damp']}, {'symmetric' if s['sym'] else 'asymmetric'}"
             f" grids, learn_steps {s['learn_steps']}. Evaluation: {meta['eval_windows']} "
             f"consecutive windows of {s['eval_seqlen']} tokens ({meta['eval_tokens']:,} "
             "predicted tokens). Cells: perplexity, lower is better (quantization wall time); "
             "g-1 = one group per output channel.", ""]
    if base:
        lines += [f"Full precision: **{base['perplexity']:.3f}**.", ""]
    elif meta.get("float_perplexity"):  # measured elsewhere on the same windows
        fp = meta["float_perplexity"]
        lines += [f"Full precision: **{fp['perplexity']:.3f}** ({fp['source']}).", ""]
    lines += ["| method | " + " | ".join(f"w{b} g{g}" for b, g in cols) + " |",
              "| --- |" + " ---: |" * len(cols)]
    lines += [f"| {m} | " + " | ".join(cell(by_key.get((m, b, g))) for b, g in cols) + " |"
              for m in methods]
    return "\n".join(lines + [""] + gguf_note(meta.get("gguf"))) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if r["method"] != FLOAT]
    groups = sorted({r["group_size"] for r in runs}, key=lambda g: (g == -1, g))
    if not groups:
        return
    base = next((r["perplexity"] for r in res["runs"] if r["method"] == FLOAT),
                res["meta"].get("float_perplexity", {}).get("perplexity"))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False,
                             sharey=True)
    for ax, g in zip(axes[0], groups):
        for m in METHODS:
            pts = sorted((r["bits"], r["perplexity"]) for r in runs
                         if r["method"] == m and r["group_size"] == g)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        if base is not None:
            ax.axhline(base, color="k", ls="--", lw=1, label="full precision")
        ax.set(yscale="log", xlabel="bits",
               title="per output channel (g -1)" if g == -1 else f"group size {g}",
               xticks=sorted({r["bits"] for r in runs}))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("test perplexity")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{res['settings']['model']} on {res['settings']['corpus']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def saved_windows(study: Study, tokens_dir: str, vocab_size: int) -> tuple:
    """(calibration windows, test windows, tokens.json's record) from ids saved by
    :func:`optgqa_jax.token_splits.save_token_splits` (``train_reference.py --save-tokens``); cut as
    :func:`optgqa_jax.data.corpus_windows` cuts the tokenized splits."""
    cal, meta = token_splits.load_token_split(tokens_dir, study.corpus, "calibration",
                                      vocab_size=vocab_size)
    test, _ = token_splits.load_token_split(tokens_dir, study.corpus, "test", vocab_size=vocab_size)
    return (data.ids_windows(cal, study.seqlen, n=study.nsamples, seed=study.seed),
            data.ids_windows(test, study.eval_seqlen), meta)


def run_study(study: Study, out_dir: str, resume: bool = False,
              tokens_dir: Optional[str] = None) -> dict:
    """Run every (group size, bits, method) of `study` not yet in ``out_dir``'s JSON;
    `tokens_dir`: read saved token ids (:func:`saved_windows`) instead of tokenizing."""
    if not set(study.methods) <= set(METHODS):
        raise ValueError(f"methods {study.methods} must be among {list(METHODS)}")
    for b in study.bits:
        QuantConfig(bits=b)  # an unsupported width fails before any work
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "quantize_eval.json")
    res = {"settings": study.settings(), "runs": []}
    if resume and os.path.isfile(path):
        with open(path) as f:
            res = json.load(f)
        if res["settings"] != study.settings():
            raise ValueError(f"--resume: {path} was run with other settings {res['settings']}")
    model = load_model(study.model)
    cfg, params, tok = model.cfg, model.params, model.tokenizer
    if tok is None and tokens_dir is None:
        raise ValueError(f"model {study.model!r} has no tokenizer; pass --tokens DIR")
    for g, b in itertools.product(study.group_sizes, study.bits):  # group and packing fit
        for d_in in (cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ffn_dim):
            QuantConfig(bits=b, group_size=g).check_layer(d_in, "a linear layer")
    if tokens_dir is None:
        calib = data.corpus_windows(tok, study.corpus, "calibration", study.seqlen,
                                    n=study.nsamples, seed=study.seed)
        test = data.corpus_windows(tok, study.corpus, "test", study.eval_seqlen)
        source = dict(tokenizer=study.model,
                      corpus_hash=data.open_corpus(study.corpus).content_hash)
    else:
        calib, test, saved = saved_windows(study, tokens_dir, cfg.vocab_size)
        source = dict(tokenizer=saved["tokenizer"], corpus_hash=saved.get("corpus_hash"))
    test = test[:study.max_eval_windows]
    res["meta"] = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, commit=commit(),
                       eval_windows=int(test.shape[0]),
                       eval_tokens=int(test.shape[0] * (test.shape[1] - 1)),
                       **source,
                       gguf=gguf_types(study.model))
    stamp = {k: res["meta"][k] for k in ("device", "commit")}
    done = {key(r) for r in res["runs"]}
    if (FLOAT, None, None) not in done:
        t0 = time.perf_counter()
        ppl = windows_perplexity(cfg, params, test, batch_size=study.batch_size, progress=True)
        res["runs"].append(dict(method=FLOAT, bits=None, group_size=None, perplexity=ppl,
                                eval_seconds=time.perf_counter() - t0, **stamp))
        save(res, out_dir)
        print(f"float: perplexity {ppl:.3f}", flush=True)
    for g, b, m in itertools.product(study.group_sizes, study.bits, study.methods):
        if (m, b, g) not in done:
            run = quantize_and_evaluate(study, cfg, params, calib, test, m, b, g)
            res["runs"].append({**run, **stamp})
            save(res, out_dir)
            print(f"{m} w{b} g{g}: perplexity {run['perplexity']:.3f}, quantized in "
                  f"{run['quant_seconds']:.0f}s", flush=True)
    return res


def main(argv=None) -> None:
    ints = lambda s: tuple(int(x) for x in s.split(","))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = Study()
    p.add_argument("--bits", type=ints, default=d.bits, help="comma-separated, e.g. 4,3")
    p.add_argument("--group-sizes", type=ints, default=d.group_sizes, help="e.g. 64,-1")
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=d.methods,
                   help=f"comma-separated subset of {','.join(METHODS)}")
    for name, kind in (("model", str), ("corpus", str), ("nsamples", int), ("seqlen", int),
                       ("eval_seqlen", int), ("max_eval_windows", int), ("seed", int),
                       ("batch_size", int), ("learn_steps", int), ("damp", float)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name))
    p.add_argument("--asym", action="store_true", help="asymmetric grids")
    p.add_argument("--out", default=None,
                   help="default experiments/results/quantize_eval/<model>-<corpus>")
    p.add_argument("--resume", action="store_true", help="skip runs already in the JSON")
    p.add_argument("--tokens", default=None, metavar="DIR",
                   help="token ids saved by train_reference.py --save-tokens (no tokenizer needed)")
    a = p.parse_args(argv)
    names = [f.name for f in dataclasses.fields(Study) if f.name != "sym"]
    study = Study(**{n: getattr(a, n) for n in names}, sym=not a.asym)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{os.path.basename(a.model.rstrip('/'))}-{a.corpus}")
    out = a.out or os.path.join(os.path.dirname(__file__), "results", "quantize_eval", slug)
    run_study(study, out, resume=a.resume, tokens_dir=a.tokens)
    print(f"wrote {out}/quantize_eval.{{json,md,png}}")


if __name__ == "__main__":
    main()
