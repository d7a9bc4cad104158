"""SmolLM2-135M quantized by the project: the model on the quantized-matmul kernel against the
model on the dequantized float weights (same greedy tokens, logit difference).

GPTQ (act-order, so the load-time row sort is exercised too) on a few calibration windows,
then greedy generation from a few prompts three ways: the quantized params through the kernel
(``attention_impl="pallas"``; compiled on a GPU, interpret mode on a CPU, which is slow), the
same params sorted by ``quant.prepare_for_kernels``, and the dequantized float params on the jnp
reference. On a GPU it also serves the quantized params in the engine.

Usage::

    python experiments/check_quant_smollm2.py [--bits 4] [--group-size 64] [--tokens 16]
        [--out experiments/results/quant]

Writes ``check_quant_smollm2.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import optgqa_jax as og  # noqa: E402
from optgqa_jax import data, quant  # noqa: E402
from optgqa_jax.benchmark import source_commit  # noqa: E402

PROMPTS = ("The capital of France is", "def fibonacci(n):",
           "Grouped-query attention saves memory because")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quant"))
    a = p.parse_args(argv)
    model = og.load_model("smollm2-135m")
    cfg, params, tok = model.cfg, model.params, model.tokenizer
    calib = data.corpus_windows(tok, "shakespeare", "calibration", a.seqlen, n=a.nsamples, seed=0)
    qc = og.QuantConfig(bits=a.bits, group_size=a.group_size, act_order=True)
    t0 = time.perf_counter()
    cfg, qp, _ = og.quantize(cfg, params, calib, qc)
    quant_s = time.perf_counter() - t0
    bcfg = cfg.replace(dtype="bfloat16")
    cast = lambda t: jax.tree_util.tree_map(
        lambda l: l.replace(dtype="bfloat16") if quant.is_quantized(l) else l.astype(jnp.bfloat16),
        t, is_leaf=quant.is_quantized)
    qp = cast(qp)
    floats = jax.tree_util.tree_map(
        lambda l: quant.dequantize(l, jnp.bfloat16) if quant.is_quantized(l) else l, qp,
        is_leaf=quant.is_quantized)
    sorted_qp = quant.prepare_for_kernels(qp)
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, commit=source_commit(),
               bits=a.bits, group_size=a.group_size, act_order=True, quantize_seconds=quant_s,
               prompts=[])
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        row = dict(prompt=prompt)
        for name, prm, impl in (("kernel", qp, "pallas"), ("kernel, rows sorted", sorted_qp,
                                                           "pallas"),
                                ("dequantized float", floats, "reference")):
            t0 = time.perf_counter()
            row[name] = og.generate_simple(bcfg, prm, ids, a.tokens, attention_impl=impl)
            row[name + " seconds"] = time.perf_counter() - t0
        toks = np.asarray([ids], np.int32)
        lk = np.asarray(og.forward(bcfg, sorted_qp, toks, attention_impl="pallas"), np.float64)
        lf = np.asarray(og.forward(bcfg, floats, toks, attention_impl="reference"), np.float64)
        row["max_rel_logit_diff"] = float(np.abs(lk - lf).max() / np.abs(lf).max())
        row["same_tokens"] = row["kernel"] == row["kernel, rows sorted"] == row["dequantized float"]
        row["text"] = tok.decode(row["kernel, rows sorted"])
        print(json.dumps({k: v for k, v in row.items() if "seconds" not in k}), flush=True)
        res["prompts"].append(row)
    if jax.default_backend() != "cpu":
        engine = og.Engine(bcfg, qp, og.EngineConfig(max_num_seqs=4))
        outs = engine.generate([tok.encode(pr) for pr in PROMPTS],
                               og.SamplingParams(temperature=0.0, max_tokens=a.tokens,
                                                 ignore_eos=True))
        res["engine_same_tokens"] = [o.token_ids == r["dequantized float"]
                                     for o, r in zip(outs, res["prompts"])]
    res["all_same_tokens"] = all(r["same_tokens"] for r in res["prompts"])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_quant_smollm2.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"same greedy tokens everywhere: {res['all_same_tokens']}")


if __name__ == "__main__":
    main()
