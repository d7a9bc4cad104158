"""The grouping ablation: MHA→GQA strategies × KV-head budgets × {no uptraining, short uptraining}.

One protocol for every strategy of ``optgqa_jax.grouping``, on three cases:

* ``reference``: the project's own MHA model (``experiments/train_reference.py``, 8 heads),
  converted to 4, 2 and 1 KV heads;
* ``smollm2 9/3→9/1``: SmolLM2-135M's real GQA weights (9 query heads, 3 KV heads) regrouped
  to one KV head;
* ``smollm2 9/9π→9/3``: SmolLM2 expanded to MHA (each query head with its own copy of its KV
  head, exact) with its query heads permuted, then converted back to 3 KV heads — the planted
  structure on real weights: a strategy that finds the original groups loses nothing.

For each (case, strategy variant, KV budget): the conversion's per-layer attention-output error
on calibration windows, held-out perplexity as converted and after a short uptraining
(``optgqa_jax.grouping.uptrain``), KV-cache bytes per token, conversion and uptraining time. Per
KV budget of the reference model, the engine's decode throughput. A control row uptrains the
unconverted model the same number of steps, so that the gain of uptraining is not mistaken for
recovery from the conversion.

Every converted model is trained and scored in its exactly equivalent MHA form (its K/V heads
gathered per query head; ``uptrain.to_mha``), so one compiled program serves all groupings of a
case; the engine runs the grouped model itself.

Usage::

    python experiments/ablate_grouping.py --reference checkpoints/reference/rope \
        [--out experiments/results/grouping] [--no-smollm2] [--uptrain-steps 100]

Writes ``ablate_grouping.{json,md}``, ``perplexity.png`` (perplexity against KV heads per
strategy) and ``groups_<case>.png`` (each layer's group map) under ``--out``; the JSON is
rewritten after every run, so an interrupted study keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import optgqa_jax as og  # noqa: E402
from optgqa_jax import data  # noqa: E402
from optgqa_jax.benchmark import source_commit  # noqa: E402
from optgqa_jax.evaluate import windows_perplexity  # noqa: E402
from optgqa_jax.grouping import convert_to_gqa, expand_to_mha  # noqa: E402
from optgqa_jax.grouping.common import layer_errors  # noqa: E402
from optgqa_jax.grouping.uptrain import to_mha, uptrain  # noqa: E402
from optgqa_jax.train import TrainConfig  # noqa: E402

# variant name -> (strategy, equal_groups)
VARIANTS = {
    "random": ("random", True),
    "mean_pool": ("mean_pool", True),
    "activation": ("activation", True),
    "activation (unequal)": ("activation", False),
    "weight_error": ("weight_error", True),
    "weight_error (unequal)": ("weight_error", False),
    "aligned": ("aligned", True),
    "learned_weights": ("learned_weights", True),
    "key_norm (unequal)": ("key_norm", False),
}
CONTROL = "none (uptrained MHA/GQA)"
PALLAS_CHECK_K = 2  # every variant runs at this budget, unequal groups included
# With one KV head every strategy groups all heads together; only these differ in the merge.
K1_VARIANTS = ("mean_pool", "aligned", "learned_weights")


@dataclasses.dataclass(frozen=True)
class Ablation:
    """What to run; every field is recorded in the results."""

    reference: Optional[str] = "checkpoints/reference/rope"
    smollm2: bool = True
    corpus: str = "shakespeare"
    reference_kv_heads: tuple = (4, 2, 1)
    variants: tuple = tuple(VARIANTS)
    seqlen: int = 512
    calibration_windows: int = 32
    eval_windows: int = 256
    uptrain_steps: int = 100
    uptrain_batch: int = 32
    uptrain_lr: float = 3e-4
    smollm2_uptrain_steps: int = 40
    smollm2_uptrain_batch: int = 16
    decode_requests: int = 128
    decode_prompt: int = 448  # + decode_tokens = the reference model's 512 positions
    decode_tokens: int = 64
    seed: int = 0


def permuted_mha(cfg, params, seed: int):
    """`cfg`/`params` expanded to MHA with query heads permuted (q, k, v, o head blocks alike,
    so the function is unchanged; RoPE only: ALiBi slopes belong to head indices)."""
    if cfg.position == "alibi":
        raise ValueError("permuting query heads changes an ALiBi model's slopes")
    mcfg, mparams = expand_to_mha(cfg, params)
    N, H = mcfg.n_heads, mcfg.head_dim
    perm = np.random.default_rng(seed).permutation(N)
    cols = (perm[:, None] * H + np.arange(H)).reshape(-1)
    out = dict(mparams)
    for i in range(mcfg.n_layers):
        attn = dict(out[f"layer_{i}"]["attn"])
        for name in ("q_proj", "k_proj", "v_proj"):
            attn[name] = {"kernel": attn[name]["kernel"][:, cols]}
        attn["o_proj"] = {"kernel": attn["o_proj"]["kernel"][cols, :]}
        out[f"layer_{i}"] = {**out[f"layer_{i}"], "attn": attn}
    return mcfg, out, perm


def bf16(cfg, params):
    return cfg.replace(dtype="bfloat16"), jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.bfloat16), params)


def bf16_kv_bytes(cfg) -> int:
    """KV-cache bytes per token of `cfg` served in bfloat16 (how every model here is scored)."""
    return cfg.replace(dtype="bfloat16").kv_bytes_per_token


def perplexity(cfg, params, windows) -> float:
    """Held-out perplexity of a (grouped) model in bfloat16, through its MHA form."""
    return windows_perplexity(*bf16(*to_mha(cfg, params)), windows, batch_size=32)


def decode_throughput(cfg, params, ab: Ablation) -> dict:
    """Engine decode tokens/s of a grouped model, bfloat16: ab.decode_requests prompts of
    ab.decode_prompt random tokens (long enough that reading the KV cache is a sizeable part
    of a decode step), ab.decode_tokens greedy tokens each; timed on a second identical run.
    The time includes the prompts' prefill, which grouping does not shorten."""
    bcfg, bparams = bf16(cfg, params)
    rng = np.random.default_rng(ab.seed)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, ab.decode_prompt)]
               for _ in range(ab.decode_requests)]
    sp = og.SamplingParams(temperature=0.0, max_tokens=ab.decode_tokens, ignore_eos=True)
    engine = og.Engine(bcfg, bparams, og.EngineConfig(max_num_seqs=ab.decode_requests,
                                                      enable_prefix_caching=False))
    engine.generate(prompts, sp)  # compiles
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return dict(tokens_per_s=tokens / seconds, seconds=seconds, tokens=tokens,
                kv_bytes_per_token=bcfg.kv_bytes_per_token)


def pallas_check(cfg, params, tokens) -> float:
    """Relative max error of the grouped model's logits on the Pallas kernels against the jnp
    reference (bfloat16, the grouped model itself, not its MHA form)."""
    bcfg, bparams = bf16(cfg, params)
    ref = np.asarray(og.forward(bcfg, bparams, tokens, attention_impl="reference"))
    out = np.asarray(og.forward(bcfg, bparams, tokens, attention_impl="pallas"))
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def run_case(ab: Ablation, name: str, cfg, params, kv_list, windows, steps: int, batch: int,
             res: dict, save, check_pallas: bool = False) -> None:
    """Every variant × KV budget of one case, appended to res["runs"] one by one."""
    calib, train_w, test = windows
    tc = None if steps == 0 else TrainConfig(
        steps=steps, batch_size=batch, peak_lr=ab.uptrain_lr, warmup_steps=steps // 10,
        seed=ab.seed, log_every=max(1, steps // 4))
    done = {(r["case"], r["variant"], r["n_kv_heads"]) for r in res["runs"]}
    base = dict(case=name, n_heads=cfg.n_heads, source_kv_heads=cfg.n_kv_heads)
    if (name, CONTROL, cfg.n_kv_heads) not in done:
        t0 = time.perf_counter()
        ppl0 = perplexity(cfg, params, test)
        up = None if tc is None else uptrain(cfg, params, train_w, tc=tc, progress=False)[1]
        res["runs"].append(dict(base, variant=CONTROL, strategy=None, n_kv_heads=cfg.n_kv_heads,
                                perplexity=ppl0,
                                perplexity_uptrained=None if up is None else perplexity(cfg, up,
                                                                                        test),
                                kv_bytes_per_token=bf16_kv_bytes(cfg),
                                uptrain_seconds=time.perf_counter() - t0))
        save()
    mha_ref = to_mha(cfg, params)  # one compiled layer-error program for the whole case
    for K in kv_list:
        for variant in ab.variants:
            if (name, variant, K) in done:
                continue
            strategy, equal = VARIANTS[variant]
            if equal and cfg.n_heads % K:
                continue
            if K == 1 and strategy not in K1_VARIANTS:
                continue  # one group of every head: the same model as mean_pool
            t0 = time.perf_counter()
            cfg2, params2, report = convert_to_gqa(cfg, params, K, strategy, calibration=calib,
                                                   equal_groups=equal, seed=ab.seed,
                                                   compute_layer_error=False)
            convert_s = time.perf_counter() - t0
            errors = layer_errors(*mha_ref, *to_mha(cfg2, params2), calib, batch_size=8)
            ppl = perplexity(cfg2, params2, test)
            t0 = time.perf_counter()
            if tc is None:  # no uptraining in this case
                up, result = None, None
            else:
                _, up, result = uptrain(cfg2, params2, train_w, tc=tc, report=report,
                                        source_params=params, progress=False)
            up_s = time.perf_counter() - t0
            run = dict(base, variant=variant, strategy=strategy, n_kv_heads=K,
                       equal_groups=equal, groups=[list(g) for g in report.groups],
                       objective_name=report.objective_name, objective=report.objective,
                       layer_error=errors, mean_layer_error=float(np.mean(errors)),
                       perplexity=ppl,
                       perplexity_uptrained=None if up is None else perplexity(cfg2, up, test),
                       kv_bytes_per_token=bf16_kv_bytes(cfg2), convert_seconds=convert_s,
                       uptrain_seconds=up_s,
                       uptrain_tokens_per_s=None if result is None else result.tokens_per_s)
            if check_pallas and K == PALLAS_CHECK_K:
                run["pallas_rel_error"] = pallas_check(cfg2, params2 if up is None else up,
                                                       test[:2, :128])
            res["runs"].append(run)
            save()
            print(f"{name} {variant} K={K}: ppl {ppl:.2f} -> {run['perplexity_uptrained']} "
                  f"(layer error {run['mean_layer_error']:.4f})", flush=True)


# ----------------------------------------------------------------------------- reporting
def markdown(res: dict) -> str:
    m = res["meta"]
    ab = m["ablation"]
    lines = [f"# Grouping ablation ({ab['corpus']}, test split)", "",
             f"Device {m['device']}, jax {m['jax']}, commit {m['commit']}. Calibration: "
             f"{ab['calibration_windows']} windows of {ab['seqlen']} tokens; perplexity on "
             f"{m['eval_windows']} test windows of {ab['seqlen']} tokens, bfloat16. Uptraining: "
             f"{ab['uptrain_steps']} steps of {ab['uptrain_batch']} windows for the reference "
             f"model, {ab['smollm2_uptrain_steps']} of {ab['smollm2_uptrain_batch']} for SmolLM2, "
             f"peak lr {ab['uptrain_lr']}. Cells: perplexity as converted → after uptraining "
             "(mean relative attention-output error per layer). Bold: best per column after "
             "uptraining.", ""]
    for case in dict.fromkeys(r["case"] for r in res["runs"]):
        runs = [r for r in res["runs"] if r["case"] == case]
        ks = sorted({r["n_kv_heads"] for r in runs if r["variant"] != CONTROL}, reverse=True)
        control = [r for r in runs if r["variant"] == CONTROL]
        lines += [f"## {case}", ""]
        if control:
            c = control[0]
            after = ("" if c["perplexity_uptrained"] is None else
                     f", {c['perplexity_uptrained']:.2f} after the same uptraining")
            lines += [f"Unconverted ({c['n_kv_heads']} KV heads): perplexity "
                      f"{c['perplexity']:.2f}{after}.", ""]
        lines += ["| variant | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "| --- |" + " ---: |" * len(ks)]
        final = lambda r: (r["perplexity"] if r["perplexity_uptrained"] is None
                           else r["perplexity_uptrained"])
        best = {k: min((final(r) for r in runs
                        if r["n_kv_heads"] == k and r["variant"] != CONTROL), default=None)
                for k in ks}
        for variant in dict.fromkeys(r["variant"] for r in runs if r["variant"] != CONTROL):
            cells = []
            for k in ks:
                r = next((r for r in runs if r["variant"] == variant and r["n_kv_heads"] == k),
                         None)
                if r is None:
                    cells.append("")
                    continue
                def num(x):
                    text = f"{x:.2f}"
                    return f"**{text}**" if x == final(r) and final(r) == best[k] else text
                if r["perplexity_uptrained"] is None:  # not uptrained
                    cells.append(f"{num(r['perplexity'])} ({r['mean_layer_error']:.3f})")
                else:
                    cells.append(f"{r['perplexity']:.2f} → {num(r['perplexity_uptrained'])} "
                                 f"({r['mean_layer_error']:.3f})")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    checked = [r["pallas_rel_error"] for r in res["runs"] if "pallas_rel_error" in r]
    if checked:
        lines += [f"Pallas kernels: each of the {len(checked)} uptrained reference-model "
                  "conversions ran its forward pass on the kernels (padded groups where unequal); "
                  f"largest relative logit difference from the jnp reference {max(checked):.2e} "
                  "(bfloat16).", ""]
    if res.get("decode"):
        base = res["decode"][0]["tokens_per_s"]
        lines += ["## Decode throughput (reference model, engine, bfloat16)", "",
                  f"{ab['decode_requests']} requests of {ab.get('decode_prompt', 32)} random "
                  f"prompt tokens, {ab['decode_tokens']} greedy tokens each (prefill included); "
                  "tokens/s counts generated tokens.", "",
                  "| KV heads | groups | KV bytes/token | tokens/s | vs MHA |",
                  "| ---: | --- | ---: | ---: | ---: |"]
        for d in res["decode"]:
            lines.append(f"| {d['n_kv_heads']} | {d['groups']} | {d['kv_bytes_per_token']:,} | "
                         f"{d['tokens_per_s']:,.0f} | {d['tokens_per_s'] / base:.2f}× |")
        lines.append("")
    if m.get("note"):
        lines += [m["note"], ""]
    secs = m.get("case_seconds") or {}
    if secs:
        lines += ["Wall time of the study: " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                       secs.items())
                  + f"; {sum(secs.values()):.0f} s in all (compilation included).", ""]
    return "\n".join(lines)


def plot(res: dict, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if r["variant"] != CONTROL]
    cases = list(dict.fromkeys(r["case"] for r in runs))
    if not cases:
        return
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(VARIANTS)}
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for variant in dict.fromkeys(r["variant"] for r in runs if r["case"] == case):
            rs = sorted((r for r in runs if r["case"] == case and r["variant"] == variant),
                        key=lambda r: r["n_kv_heads"])
            ks = [r["n_kv_heads"] for r in rs]
            color = colors.get(variant)
            ax.plot(ks, [r["perplexity"] for r in rs], "o--", alpha=0.45, color=color,
                    label=None if all(r["perplexity_uptrained"] is not None for r in rs)
                    else variant)
            if all(r["perplexity_uptrained"] is not None for r in rs):
                ax.plot(ks, [r["perplexity_uptrained"] for r in rs], "o-", color=color,
                        label=variant)
        for c in (r for r in res["runs"] if r["case"] == case and r["variant"] == CONTROL):
            ax.axhline(c["perplexity"], color="k", ls="--", lw=0.8,
                       label=f"unconverted ({c['n_kv_heads']} KV heads)")
            if c["perplexity_uptrained"] is not None:
                ax.axhline(c["perplexity_uptrained"], color="k", lw=0.8,
                           label="unconverted, uptrained")
        ax.set(title=case, xlabel="KV heads",
               ylabel="test perplexity (dashed: before uptraining)", yscale="log")
        ax.set_xticks(sorted({r["n_kv_heads"] for r in runs if r["case"] == case}))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "perplexity.png"), dpi=120)
    plt.close(fig)
    for case in cases:  # each layer's group map, per variant, at the case's smallest K > 1
        ks = sorted({r["n_kv_heads"] for r in runs if r["case"] == case and r["n_kv_heads"] > 1})
        if not ks:
            continue
        rs = [r for r in runs if r["case"] == case and r["n_kv_heads"] == ks[0]]
        fig, axes = plt.subplots(1, len(rs), figsize=(2.2 * len(rs), 3.2), squeeze=False)
        for ax, r in zip(axes[0], rs):
            ax.imshow(np.asarray(r["groups"]), aspect="auto", cmap="tab10", vmin=0, vmax=9,
                      interpolation="nearest")
            ax.set(title=r["variant"], xlabel="query head", ylabel="layer")
            ax.title.set_fontsize(7)
        fig.suptitle(f"{case}: KV head of each query head, K={ks[0]}")
        fig.tight_layout()
        slug = "".join(c if c.isascii() and c.isalnum() else "_"
                       for c in case.replace("π", "pi").replace("→", "_to_"))
        fig.savefig(os.path.join(out_dir, f"groups_{slug}.png"), dpi=110)
        plt.close(fig)


def main(argv=None) -> None:
    d = Ablation()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", default=d.reference, help="reference MHA checkpoint ('' to skip)")
    p.add_argument("--no-smollm2", action="store_true")
    p.add_argument("--variants", type=lambda s: tuple(s.split(",")), default=d.variants)
    p.add_argument("--reference-kv-heads", type=lambda s: tuple(int(x) for x in s.split(",")),
                   default=d.reference_kv_heads)
    for name in ("uptrain_steps", "uptrain_batch", "smollm2_uptrain_steps",
                 "smollm2_uptrain_batch", "eval_windows", "calibration_windows", "seqlen",
                 "decode_requests", "decode_prompt", "decode_tokens", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--tokens", default=None, help="token ids written by train_reference.py "
                   "--save-tokens (then SmolLM2's files are needed only for the SmolLM2 cases)")
    p.add_argument("--pallas-check", action="store_true",
                   help="also run each converted model's forward on the Pallas kernels (GPU)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of an existing --out/ablate_grouping.json made with the "
                        "same settings and run only the missing ones")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "grouping"))
    a = p.parse_args(argv)
    for v in a.variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: {v!r} is not one of {list(VARIANTS)}")
    ab = dataclasses.replace(d, reference=a.reference or None, smollm2=not a.no_smollm2,
                             variants=a.variants, reference_kv_heads=a.reference_kv_heads,
                             **{n: getattr(a, n) for n in (
                                 "uptrain_steps", "uptrain_batch", "smollm2_uptrain_steps",
                                 "smollm2_uptrain_batch", "eval_windows", "calibration_windows",
                                 "seqlen", "decode_requests", "decode_prompt", "decode_tokens",
                                 "seed")})
    os.makedirs(a.out, exist_ok=True)
    smol = og.load_model("smollm2-135m") if ab.smollm2 or not a.tokens else None
    if a.tokens:  # ids tokenised by SmolLM2's tokenizer (train_reference.py --save-tokens)
        ids = {s: np.load(os.path.join(a.tokens, f"{ab.corpus}-{s}.npy"))
               for s in ("calibration", "test")}
    else:  # SmolLM2's tokenizer serves the reference models too
        ids = {s: data.encode_split(smol.tokenizer, ab.corpus, s) for s in ("calibration", "test")}
    calib = data.ids_windows(ids["calibration"], ab.seqlen, ab.calibration_windows,
                             seed=ab.seed + 1)
    train_w = data.ids_windows(ids["calibration"], ab.seqlen)
    test = data.ids_windows(ids["test"], ab.seqlen)[:ab.eval_windows]
    res = {"meta": dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                        commit=source_commit(), eval_windows=int(test.shape[0]),
                        ablation=dataclasses.asdict(ab), case_seconds={}),
           "runs": [], "decode": []}
    path = os.path.join(a.out, "ablate_grouping.json")
    if a.resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        mine = json.loads(json.dumps(res["meta"]["ablation"]))
        if old["meta"]["ablation"] != mine:
            diff = sorted(k for k in mine if old["meta"]["ablation"].get(k) != mine[k])
            raise ValueError(f"--resume: {path} was made with other settings ({diff}); use "
                             "another --out or the same settings")
        res["runs"], res["decode"] = old["runs"], old["decode"]
        res["meta"]["case_seconds"] = old["meta"].get("case_seconds", {})
        res["meta"]["commits"] = sorted({old["meta"]["commit"], res["meta"]["commit"]}
                                        | set(old["meta"].get("commits", [])))
        if "smollm2_permutation" in old["meta"]:
            res["meta"]["smollm2_permutation"] = old["meta"]["smollm2_permutation"]

    def timed(case, fn, *args, **kw):  # wall seconds of one case, summed over resumed runs
        t0 = time.perf_counter()
        fn(*args, **kw)
        secs = res["meta"]["case_seconds"]
        secs[case] = secs.get(case, 0.0) + time.perf_counter() - t0

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, "ablate_grouping.md"), "w") as f:
            f.write(markdown(res))
        plot(res, a.out)

    windows = (calib, train_w, test)
    if ab.reference:
        ref = og.load_model(ab.reference)
        timed("reference", run_case, ab, "reference", ref.cfg, ref.params, ab.reference_kv_heads,
              windows, ab.uptrain_steps, ab.uptrain_batch, res, save,
              check_pallas=a.pallas_check)
        if not a.skip_decode and not res["decode"]:
            t0 = time.perf_counter()
            variants = [("mean_pool", True), ("activation", False)]
            for K in (ref.cfg.n_kv_heads,) + tuple(ab.reference_kv_heads):
                plain = K in (1, ref.cfg.n_kv_heads)  # one grouping only: no unequal row
                for strategy, equal in variants[:1] if plain else variants:
                    if K == ref.cfg.n_kv_heads:
                        cfg2, params2 = ref.cfg, ref.params
                    else:
                        cfg2, params2, _ = convert_to_gqa(ref.cfg, ref.params, K, strategy,
                                                          calibration=calib, equal_groups=equal,
                                                          compute_layer_error=False)
                    sizes = sorted({int(c) for i in range(cfg2.n_layers) for c in
                                    np.bincount(cfg2.layer_kv_head_map(i))})
                    groups = "equal" if len(sizes) == 1 else f"unequal {sizes}"
                    res["decode"].append(dict(n_kv_heads=K, strategy=strategy, groups=groups,
                                              **decode_throughput(cfg2, params2, ab)))
                    save()
            res["meta"]["case_seconds"]["decode"] = time.perf_counter() - t0
    if ab.smollm2:
        cfg, params = smol.cfg, smol.params
        timed("smollm2 9/3→9/1", run_case, ab, "smollm2 9/3→9/1", cfg, params, (1,), windows,
              ab.smollm2_uptrain_steps, ab.smollm2_uptrain_batch, res, save)
        pcfg, pparams, perm = permuted_mha(cfg, params, ab.seed)
        res["meta"]["smollm2_permutation"] = perm.tolist()
        timed("smollm2 9/9π→9/3", run_case, ab, "smollm2 9/9π→9/3", pcfg, pparams, (3,),
              windows, ab.smollm2_uptrain_steps, ab.smollm2_uptrain_batch, res, save)
    save()
    print(markdown(res))


if __name__ == "__main__":
    main()
