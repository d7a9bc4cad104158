"""Train the project's own reference MHA models (RoPE, and an ALiBi twin) on English text.

No multi-head-attention checkpoint can be downloaded here, and grouping studies need one: the
MHA→GQA strategies of ``optgqa_jax.grouping`` start from a model whose every query head has its
own key/value head. This script trains such a model from scratch, reproducibly from its seed.

The size (:class:`Reference`): 8 layers, d_model 512, 8 heads of 64 (MHA), SwiGLU width 1536,
SmolLM2's 49,152-token BPE vocabulary with tied embeddings, windows of 512 tokens: 27.3M
parameters in the blocks and 25.2M in the embedding, 52.5M in all. Why this size:

* the corpus is small (Shakespeare's calibration split: 1.9M SmolLM2 tokens), so a model of
  a few tens of millions of parameters already sees each token several times in a few minutes
  and reaches its best held-out loss; a larger one would only overfit sooner;
* 8 heads allow the KV budgets the ablation needs (n/2 = 4, n/4 = 2, n/8 = 1) with head_dim
  64, which every attention kernel of the project (and cuDNN) supports at full speed;
* SmolLM2's tokenizer keeps the text in real subword tokens, the regime of the models GQA is
  used on; its vocabulary makes the LM head a third of the compute, which the MFU below counts.

Reported, in one run: training tokens/s and model FLOPs utilisation (training FLOPs per token
from ``optgqa_jax.train.model_flops_per_token``, against the bfloat16 matmul peak measured in the
same run on a large square product, and against the data-sheet dense peak when the device is
known), held-out perplexity on the validation and test splits, and the loss curves.

Usage::

    python experiments/train_reference.py [--positions rope,alibi] [--steps 300]
        [--out experiments/results/reference] [--checkpoints checkpoints/reference]

Writes ``train_reference.{json,md}`` and each model's ``train_log.json``/``loss.png`` under
``--out``, and each trained model as an optgqa checkpoint ``<checkpoints>/<position>`` (with a
``reference.json`` naming its tokenizer and corpus) for ``experiments/ablate_grouping.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import optgqa_jax as og  # noqa: E402
from optgqa_jax import data, token_splits  # noqa: E402
from optgqa_jax.benchmark import source_commit  # noqa: E402
from optgqa_jax.evaluate import windows_perplexity  # noqa: E402
from optgqa_jax.train import TrainConfig, mfu, model_flops_per_token, train  # noqa: E402

# Dense bfloat16 tensor-core peaks from the vendors' data sheets (FLOP/s), for the second MFU
# figure; the first is against the peak measured in the run.
DATASHEET_BF16 = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference model's architecture and training recipe."""

    tokenizer: str = "smollm2-135m"
    corpus: str = "shakespeare"
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 1536
    seqlen: int = 512
    steps: int = 300
    batch_size: int = 64
    grad_accum: int = 1
    peak_lr: float = 1e-3
    warmup_steps: int = 60
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_windows_max: int = 256
    seed: int = 0

    def model_config(self, vocab_size: int, position: str) -> og.ModelConfig:
        return og.ModelConfig(vocab_size=vocab_size, d_model=self.d_model,
                              n_layers=self.n_layers, n_heads=self.n_heads,
                              n_kv_heads=self.n_heads, head_dim=self.head_dim,
                              ffn_dim=self.ffn_dim, position=position, rope_theta=10000.0,
                              tie_embeddings=True, dtype="float32", max_seq_len=self.seqlen)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, peak_lr=self.peak_lr,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                           eval_every=self.eval_every, eval_windows_max=self.eval_windows_max,
                           seed=self.seed)


def load_tokenizer(name: str):
    """The tokenizer of a pretrained model (the reference models share SmolLM2's)."""
    tok = og.load_model(name).tokenizer
    if tok is None:
        raise ValueError(f"model {name!r} has no tokenizer")
    return tok


def save_tokens(ref: Reference, directory: str) -> None:
    """Tokenise the corpus splits once into ``directory`` (for a machine without the tokenizer's
    model files): :func:`optgqa_jax.token_splits.save_token_splits`."""
    token_splits.save_token_splits(load_tokenizer(ref.tokenizer), ref.corpus, directory,
                           tokenizer_name=ref.tokenizer)


def load_windows(ref: Reference, tokens_dir: Optional[str]) -> tuple[dict, int]:
    """({"train", "validation", "test"}: windows of ref.seqlen, vocab size): the training
    windows from the calibration split, consecutive windows of the others."""
    names = {"train": "calibration", "validation": "validation", "test": "test"}
    if tokens_dir is None:
        tok = load_tokenizer(ref.tokenizer)
        return {k: data.corpus_windows(tok, ref.corpus, split, ref.seqlen)
                for k, split in names.items()}, tok.vocab_size
    windows = {}
    for k, split in names.items():
        ids, meta = token_splits.load_token_split(tokens_dir, ref.corpus, split)
        if meta["tokenizer"] != ref.tokenizer:
            raise ValueError(f"--tokens {tokens_dir} was tokenized by {meta['tokenizer']!r}, "
                             f"not {ref.tokenizer!r}")
        windows[k] = data.ids_windows(ids, ref.seqlen)
    return windows, meta["vocab_size"]


def matmul_peak(n: int = 8192, iters: int = 20) -> float:
    """bfloat16 FLOP/s of an n×n×n matmul on the default device, best of 3 timings."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / iters)
    return 2 * n ** 3 / best


def train_one(ref: Reference, position: str, vocab_size: int, windows: dict, out_dir: str,
              checkpoint_dir: str, peak: float) -> dict:
    """Train one reference model; save it; return its record."""
    cfg = ref.model_config(vocab_size, position)
    params = og.init_params(cfg, jax.random.PRNGKey(ref.seed))
    log_dir = os.path.join(out_dir, position)
    run_dir = os.path.join(checkpoint_dir, f"{position}-run")  # train state, for resume
    t0 = time.perf_counter()
    result = train(cfg, params, windows["train"], ref.train_config(),
                   eval_windows=windows["validation"], out_dir=run_dir, resume=True)
    seconds = time.perf_counter() - t0
    for name in ("train_log.json", "loss.png"):
        os.makedirs(log_dir, exist_ok=True)
        shutil.copy(os.path.join(run_dir, name), os.path.join(log_dir, name))
    model_dir = os.path.join(checkpoint_dir, position)
    og.save_checkpoint(model_dir, cfg, result.params, overwrite=True)
    with open(os.path.join(model_dir, "reference.json"), "w") as f:
        json.dump({"tokenizer": ref.tokenizer, "corpus": ref.corpus,
                   "reference": dataclasses.asdict(ref), "position": position}, f, indent=2)
    bcfg = cfg.replace(dtype="bfloat16")
    bparams = jax.tree.map(lambda x: x.astype(jnp.bfloat16), result.params)
    ppl = {split: windows_perplexity(bcfg, bparams, windows[split], batch_size=32)
           for split in ("validation", "test")}
    flops = model_flops_per_token(cfg, ref.seqlen)
    device = jax.devices()[0].device_kind
    record = dict(position=position, params=cfg.num_params, tokens_per_s=result.tokens_per_s,
                  flops_per_token=flops, mfu_measured_peak=mfu(result.tokens_per_s, flops, peak),
                  perplexity=ppl, train_seconds=seconds, checkpoint=model_dir,
                  final_train_loss=result.history["train"]["loss"][-1],
                  evals=result.history["eval"])
    if device in DATASHEET_BF16:
        record["mfu_datasheet"] = mfu(result.tokens_per_s, flops, DATASHEET_BF16[device])
    return record


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Reference MHA models ({m['corpus']}, {m['tokenizer']} tokenizer)", "",
             f"Device {m['device']}, jax {m['jax']}, commit {m['commit']}. Measured bfloat16 "
             f"matmul peak {m['matmul_peak_flops'] / 1e12:.0f} TFLOP/s. "
             f"{m['train_windows']} training windows of {m['seqlen']} tokens; "
             f"{m['steps']} steps of {m['batch_size']} windows.", "",
             "| position | params | tokens/s | MFU (measured peak) | MFU (data sheet) | "
             "val ppl | test ppl | train s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in res["runs"]:
        sheet = f"{100 * r['mfu_datasheet']:.1f}%" if "mfu_datasheet" in r else "n/a"
        lines.append(f"| {r['position']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu_measured_peak']:.1f}% | {sheet} | "
                     f"{r['perplexity']['validation']:.2f} | {r['perplexity']['test']:.2f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    d = Reference()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", default="rope,alibi")
    p.add_argument("--tokens", default=None,
                   help="read token ids written by --save-tokens instead of tokenizing")
    p.add_argument("--save-tokens", default=None, metavar="DIR",
                   help="tokenize the corpus splits into DIR and exit")
    for name in ("steps", "batch_size", "grad_accum", "seed", "eval_every", "seqlen",
                 "d_model", "n_layers", "n_heads", "head_dim", "ffn_dim", "warmup_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--peak-lr", type=float, default=d.peak_lr)
    p.add_argument("--matmul-size", type=int, default=8192,
                   help="n of the n×n×n bfloat16 matmul that measures the peak")
    p.add_argument("--max-eval-windows", type=int, default=None,
                   help="score at most this many validation/test windows at the end")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "reference"))
    p.add_argument("--checkpoints", default="checkpoints/reference")
    a = p.parse_args(argv)
    ref = dataclasses.replace(d, peak_lr=a.peak_lr, **{n: getattr(a, n) for n in (
        "steps", "batch_size", "grad_accum", "seed", "eval_every", "seqlen", "d_model",
        "n_layers", "n_heads", "head_dim", "ffn_dim", "warmup_steps")})
    if a.save_tokens:
        save_tokens(ref, a.save_tokens)
        return
    positions = a.positions.split(",")
    for pos in positions:
        if pos not in ("rope", "alibi", "none"):
            raise ValueError(f"--positions: {pos!r} is not one of rope, alibi, none")
    windows, vocab_size = load_windows(ref, a.tokens)
    if a.max_eval_windows:
        windows["validation"] = windows["validation"][:a.max_eval_windows]
        windows["test"] = windows["test"][:a.max_eval_windows]
    peak = matmul_peak(a.matmul_size)
    os.makedirs(a.out, exist_ok=True)
    res = {"meta": dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                        commit=source_commit(), tokenizer=ref.tokenizer, corpus=ref.corpus,
                        seqlen=ref.seqlen, steps=ref.steps, batch_size=ref.batch_size,
                        train_windows=int(windows["train"].shape[0]),
                        matmul_peak_flops=peak, reference=dataclasses.asdict(ref)), "runs": []}
    for pos in positions:
        res["runs"].append(train_one(ref, pos, vocab_size, windows, a.out, a.checkpoints, peak))
        with open(os.path.join(a.out, "train_reference.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(a.out, "train_reference.md"), "w") as f:
            f.write(markdown(res))
        print(markdown(res), flush=True)


if __name__ == "__main__":
    main()
