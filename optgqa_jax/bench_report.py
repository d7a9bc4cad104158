"""The engine benchmark's report: the markdown table of runs (and their comparison) and the
bar chart, written by :func:`optgqa_jax.benchmark.run_suite`."""

from __future__ import annotations


def _fmt(x, scale=1.0, digits=0):
    return "—" if x is None else f"{x * scale:,.{digits}f}"


def markdown(meta: dict, runs: list[dict]) -> str:
    lines = ["# Engine benchmark", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["| run | heads (q/kv) | req/s | total tok/s | output tok/s | mean latency s | "
              "p99 latency s | mean TTFT s | mean TPOT ms | peak mem GiB | KV pool GiB | "
              "decode MBU | decode MBU (gathered rows) | compiles in run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
              "| --- |"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['impl']} {r['model']} | fails: {r['error'][-150:]!r} |" + " |" * 12)
            continue
        mbu = r.get("decode_mbu")
        mbu_text = f"{100 * mbu['mean']:.0f}%" if mbu else "—"
        mbu_g = r.get("decode_mbu_gathered")
        mbu_g_text = f"{100 * mbu_g['mean']:.0f}%" if mbu_g else "—"
        lines.append(
            f"| {r['impl']} {r['model']} ({r['num_requests']} req) | {r['n_heads']}/{r['n_kv_heads']} | "
            f"{r['requests_per_s']:.2f} | {r['total_tokens_per_s']:,.0f} | "
            f"{r['output_tokens_per_s']:,.0f} | {r['latency_s']['mean']:.2f} | "
            f"{r['latency_s']['p99']:.2f} | "
            f"{_fmt(r.get('ttft_s', {}).get('mean'), 1, 2)} | "
            f"{_fmt(r.get('tpot_s', {}).get('mean'), 1e3, 1)} | "
            f"{r['peak_memory_bytes'] / 2**30:.1f} | "
            f"{_fmt(r.get('kv_pool_bytes'), 2**-30, 1)} | "
            f"{mbu_text} | {mbu_g_text} | "
            f"{r.get('compiles_during_run', '—')} |")
    split = [r for r in runs if "error" not in r and "time_in_mixed_steps_s" in r]
    if split:
        lines += ["", "## Where the time goes (decode-only steps against mixed prefill steps)", "",
                  "| run | steps | decode steps: count, s, mean ms, sequences | mixed steps: count, "
                  "s, mean ms, tokens | outside steps s | launched ahead (decode, mixed) | "
                  "elapsed s |", "| --- | ---: | --- | --- | ---: | --- | ---: |"]
        for r in split:
            d_ms, m_ms = r.get("decode_step_ms") or {}, r.get("mixed_step_ms") or {}
            lines.append(
                f"| {r['impl']} {r['model']} | {r['steps']} | {r['decode_steps']}, "
                f"{r['time_in_decode_steps_s']:.1f}, {_fmt(d_ms.get('mean'), 1, 1)}, "
                f"{_fmt(r.get('decode_seqs_per_step'), 1, 0)} | {r['mixed_steps']}, "
                f"{r['time_in_mixed_steps_s']:.1f}, {_fmt(m_ms.get('mean'), 1, 1)}, "
                f"{_fmt(r.get('mixed_tokens_per_step'), 1, 0)} | "
                f"{_fmt(r.get('time_outside_steps_s'), 1, 1)} | "
                f"{r.get('speculative_decode_steps', '—')}, {r.get('speculative_mixed_steps', '—')} | "
                f"{r['elapsed_s']:.1f} |")
    gqa = next((r for r in runs if r.get("impl") == "optgqa-engine" and "error" not in r
                and r["n_kv_heads"] < r["n_heads"]), None)
    mha = next((r for r in runs if r.get("impl") == "optgqa-engine" and "error" not in r
                and r["n_kv_heads"] == r["n_heads"]), None)
    if gqa and mha:
        lines += ["", "## GQA against its MHA twin (the paper's comparison)", "",
                  "| metric | MHA | GQA | change |", "| --- | --- | --- | --- |"]
        for name, key, scale in [("latency (mean, s)", ("latency_s", "mean"), 1),
                                 ("requests/s", ("requests_per_s",), 1),
                                 ("total tokens/s", ("total_tokens_per_s",), 1),
                                 ("generation tokens/s", ("output_tokens_per_s",), 1),
                                 ("peak memory (GiB)", ("peak_memory_bytes",), 2**-30),
                                 ("KV memory used at peak (GiB)", ("kv_peak_bytes_used",), 2**-30)]:
            a, b = mha, gqa
            for k in key:
                a, b = a[k], b[k]
            change = f"{100 * (b / a - 1):+.0f}%" if a else "—"
            lines.append(f"| {name} | {a * scale:,.2f} | {b * scale:,.2f} | {change} |")
    return "\n".join(lines) + "\n"


def bar_chart(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if "error" not in r]
    labels = [f"{r['impl']}\n{r['n_heads']}/{r['n_kv_heads']} heads" for r in ok]
    metrics = [("total tokens/s", lambda r: r["total_tokens_per_s"]),
               ("generation tokens/s", lambda r: r["output_tokens_per_s"]),
               ("requests/s", lambda r: r["requests_per_s"]),
               ("peak memory (GiB)", lambda r: r["peak_memory_bytes"] / 2**30)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, (title, fn) in zip(axes, metrics):
        values = [fn(r) for r in ok]
        ax.bar(range(len(ok)), values, color=["#4C72B0", "#DD8452", "#55A868"][:len(ok)])
        ax.set_xticks(range(len(ok)), labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}" if v >= 100 else f"{v:.1f}", ha="center", va="bottom",
                    fontsize=7)
    fig.suptitle(f"{ok[0]['model'] if ok else ''} on {ok[0]['device'] if ok else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
