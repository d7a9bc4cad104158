"""GPTQ speed on a GPU: one layer against a PyTorch GPTQ, and a whole Llama-3-8B-shape model.

Measured in one run, on one GPU:

(a) per layer, at the Llama-3-8B linear shapes (q/o 4096x4096, k/v 4096x1024,
    gate/up 4096x14336, down 14336x4096): ``optgqa_jax.quant.gptq`` against a PyTorch
    implementation of the same algorithm (GPTQ's Algorithm 1 with lazy batches and groups,
    written here for the comparison; float32 matmuls, as the reference code uses them), on
    the same random Hessian; seconds per layer and the layer-output error of each;
(b) whole-model GPTQ of the ``llama3-8b`` preset (random bfloat16 weights; the token ids of
    the calibration windows are random, which does not change the work): wall time, the time
    spent in GPTQ proper, peak device memory.

Usage::

    python experiments/bench_gptq.py [--out DIR] [--nsamples 128] [--seqlen 2048] [--skip-model]

Writes ``bench_gptq.json`` and ``bench_gptq.md`` under ``--out``.
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
from optgqa_jax import quant  # noqa: E402
from optgqa_jax.benchmark import source_commit as commit  # noqa: E402

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024),
          "gate_proj/up_proj": (4096, 14336), "down_proj": (14336, 4096)}


def torch_gptq(W, H, bits: int, group_size: int, block_size: int = 128, damp: float = 0.01):
    """GPTQ of W [D_out, D_in] in PyTorch: the paper's Algorithm 1 with lazy batches and
    symmetric min-max grids per group (quant's default). Returns the dequantized W."""
    import torch

    W, H = W.clone().float(), H.clone().float()
    maxq = 2 ** bits - 1
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)

    def grid(x):
        xmax = torch.maximum(x.min(1).values.abs(), x.max(1).values).clamp(min=1e-8)
        return (2 * xmax / maxq).unsqueeze(1), (maxq + 1) // 2

    scale, zero = grid(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = grid(W[:, i1 + i:i1 + i + group_size])
            w, d = W1[:, i], U1[i, i]
            q = scale[:, 0] * (torch.clamp(torch.round(w / scale[:, 0]) + zero, 0, maxq) - zero)
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if Q.is_cuda:
        torch.cuda.synchronize()
    return Q


def layer_rows(bits: int, group_size: int) -> list[dict]:
    rows = []
    qc = quant.QuantConfig(bits=bits, group_size=group_size)
    for name, (d_in, d_out) in SHAPES.items():
        key = jax.random.PRNGKey(d_in + d_out)
        x = jax.random.normal(key, (8192, d_in), jnp.float32) * jnp.linspace(0.2, 2.0, d_in)
        w = (jax.random.normal(jax.random.fold_in(key, 1), (d_in, d_out)) * 0.02).astype(jnp.bfloat16)
        H = quant.hessian(x)
        quant.gptq(w, H, qc)  # compile
        t0 = time.perf_counter()
        ql = quant.gptq(w, H, qc)
        jax.block_until_ready(ql.qweight)
        ours = time.perf_counter() - t0
        err = lambda wh: float(jnp.sum((wh - w.astype(jnp.float32)) * (H @ (wh - w.astype(jnp.float32)))))
        row = {"layer": name, "d_in": d_in, "d_out": d_out, "optgqa_s": ours,
               "optgqa_error": err(quant.dequantize(ql, jnp.float32))}
        try:
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            Wt = torch.from_numpy(np.asarray(w.astype(jnp.float32)).T.copy()).to(dev)
            Ht = torch.from_numpy(np.asarray(H)).to(dev)
            torch_gptq(Wt[:, :256], Ht[:256, :256], bits, group_size)  # warm-up
            t0 = time.perf_counter()
            Q = torch_gptq(Wt, Ht, bits, group_size)
            row["torch_s"] = time.perf_counter() - t0
            row["torch_error"] = err(jnp.asarray(Q.T.cpu().numpy()))
            row["speedup_vs_torch"] = row["torch_s"] / ours
        except Exception as e:  # no torch/CUDA: keep our row
            row["torch_error_msg"] = repr(e)[:200]
        print(row, flush=True)
        rows.append(row)
    return rows


def whole_model(nsamples: int, seqlen: int, bits: int, group_size: int, act_order: bool) -> dict:
    cfg = og.ModelConfig.preset("llama3-8b")
    params = og.init_params(cfg, jax.random.PRNGKey(0))
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (nsamples, seqlen))
    qc = quant.QuantConfig(bits=bits, group_size=group_size, act_order=act_order)
    t0 = time.perf_counter()
    _, qparams, report = og.quantize(cfg, params, windows, qc, batch_size=8,
                                     attention_impl="auto")
    jax.block_until_ready(qparams)
    wall = time.perf_counter() - t0
    mem = jax.devices()[0].memory_stats() or {}
    return {"model": "llama3-8b (random bf16 weights)", "qc": qc.to_dict(),
            "nsamples": nsamples, "seqlen": seqlen, "wall_s": wall,
            "gptq_s": sum(l["seconds"] for l in report.layers),
            "layers": len(report.layers), "mean_rel_error": report.mean_error(),
            "peak_gib": mem.get("peak_bytes_in_use", 0) / 2**30}


def markdown(res: dict) -> str:
    lines = [f"# GPTQ speed — {res['device']}, jax {res['jax']}, commit {res['commit']}", "",
             f"## One layer, w{res['bits']} g{res['group_size']}, H from 8192 random rows", "",
             "| layer | D_in x D_out | optgqa (s) | PyTorch (s) | speed-up | rel. output error optgqa / PyTorch |",
             "|---|---|---:|---:|---:|---:|"]
    for r in res["layers"]:
        ratio = (f"{r['optgqa_error'] / r['torch_error']:.4f}" if r.get("torch_error") else "-")
        lines.append(f"| {r['layer']} | {r['d_in']}x{r['d_out']} | {r['optgqa_s']:.2f} | "
                     f"{r.get('torch_s', float('nan')):.2f} | "
                     f"{r.get('speedup_vs_torch', float('nan')):.2f}x | {ratio} |")
    if res.get("model"):
        m = res["model"]
        lines += ["", f"## Whole model: {m['model']}, {m['nsamples']} x {m['seqlen']} calibration tokens", "",
                  f"- wall time: **{m['wall_s']:.0f} s** ({m['wall_s'] / 60:.1f} min) for "
                  f"{m['layers']} layers; GPTQ proper {m['gptq_s']:.0f} s, the rest is block "
                  "forward passes and Hessians",
                  f"- peak device memory: {m['peak_gib']:.1f} GiB",
                  f"- mean relative layer-output error: {m['mean_rel_error']:.3e}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/results/latest")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "commit": commit(),
           "bits": args.bits, "group_size": args.group_size, "layers": [], "model": None}
    path = os.path.join(args.out, "bench_gptq")

    def save():
        with open(path + ".json", "w") as f:
            json.dump(res, f, indent=2)
        with open(path + ".md", "w") as f:
            f.write(markdown(res))

    if not args.skip_layers:
        res["layers"] = layer_rows(args.bits, args.group_size)
        save()
    if not args.skip_model:
        res["model"] = whole_model(args.nsamples, args.seqlen, args.bits, args.group_size,
                                   args.act_order)
        print(res["model"], flush=True)
    save()
    print(markdown(res))


if __name__ == "__main__":
    main()
