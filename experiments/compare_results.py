"""Compare two runs of one benchmark row by row: is anything slower at the new commit?

Reads two JSON files written by the same benchmark script and matches their rows by what
they measured (not by position):

* ``bench_kernels.py``: rows keyed by kernel, shape, implementation, dtype, ALiBi and note;
  the metric is milliseconds (lower is better).
* ``bench_engine.py``: runs keyed by implementation, model, heads and quantization; the
  metric is total tokens/s (higher is better).

Each matched row gets old, new and ``new / old`` of the time (for engine rows, of the
time per token, ``old tok/s / new tok/s``), so a ratio above 1 is always slower. Rows
present in one run only are listed apart. A peer row (XLA, cuDNN, JAX's Pallas kernels)
measured in both runs shows how far the two machines differ on code that did not
change: read the project's ratios beside the peers' before calling a row slower.

Usage::

    python experiments/compare_results.py OLD.json NEW.json --out comparison.md \\
        [--threshold 0.05]

Writes markdown (``--out``, else stdout); exits 0 either way: the table is the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Dict, List, Optional, Tuple

OURS = ("optgqa", "optgqa-engine")


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "meta" not in data or not ("rows" in data or "runs" in data):
        raise ValueError(f"{path}: expected a bench_kernels.py or bench_engine.py JSON file "
                         "(an object with 'meta' and 'rows' or 'runs')")
    return data


def keyed(data: dict) -> Dict[Tuple, Tuple[float, str]]:
    """``key -> (seconds-like cost, implementation)``: lower cost is faster."""
    out = {}
    if "rows" in data:
        for r in data["rows"]:
            if "ms" not in r:
                continue  # a failed row has no time
            key = (r["kernel"], r["shape"], r["impl"], r.get("dtype", ""), str(r["alibi"]),
                   r.get("note", ""))
            out[key] = (float(r["ms"]), r["impl"])
    else:
        for r in data["runs"]:
            if not r.get("total_tokens_per_s"):
                continue
            key = ("engine", f"{r.get('model', '')} {r.get('n_heads')}/{r.get('n_kv_heads')}",
                   r["impl"], r.get("quantize") or "bf16", "", "")
            out[key] = (1.0 / float(r["total_tokens_per_s"]), r["impl"])
    return out


def compare(old: dict, new: dict, threshold: float) -> Tuple[List[dict], List[Tuple], List[Tuple]]:
    a, b = keyed(old), keyed(new)
    rows = []
    for key in [k for k in b if k in a]:
        ratio = b[key][0] / a[key][0]
        ours = b[key][1] in OURS
        rows.append(dict(key=key, old=a[key][0], new=b[key][0], ratio=ratio, ours=ours,
                         slower=ours and ratio > 1 + threshold))
    return rows, [k for k in a if k not in b], [k for k in b if k not in a]


def _fmt(key: Tuple, cost: float) -> str:
    if key[0] == "engine":
        return f"{1.0 / cost:,.0f} tok/s"
    return f"{cost:.3f} ms"


def markdown(old: dict, new: dict, rows: List[dict], only_old, only_new, threshold: float,
             title: Optional[str] = None) -> str:
    mo, mn = old["meta"], new["meta"]
    peers = [r["ratio"] for r in rows if not r["ours"]]
    ours = [r for r in rows if r["ours"]]
    slower = [r for r in ours if r["slower"]]
    lines = [f"# {title or 'Row-by-row comparison'}", "",
             f"- old: commit {mo.get('commit')}, {mo.get('device')}, jax {mo.get('jax')}, "
             f"{mo.get('date', '')}",
             f"- new: commit {mn.get('commit')}, {mn.get('device')}, jax {mn.get('jax')}, "
             f"{mn.get('date', '')}",
             f"- ratio = new time / old time (engine rows: old tok/s / new tok/s): above 1 is "
             f"slower; a row of ours is flagged slower above {1 + threshold:.2f}",
             f"- rows matched: {len(rows)} ({len(ours)} of ours, {len(peers)} peers)"]
    if peers:
        lines.append(f"- peers (code unchanged between the runs): median ratio "
                     f"{statistics.median(peers):.3f}, range {min(peers):.3f}–{max(peers):.3f}"
                     " — how much the two machines differ")
    lines.append(f"- rows of ours slower by more than {threshold:.0%}: {len(slower)}")
    lines += ["", "| what | impl | ALiBi | dtype / format | note | old | new | ratio | |",
              "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        k = r["key"]
        flag = "**slower**" if r["slower"] else ""
        lines.append(f"| {k[0]} {k[1]} | {k[2]} | {k[4]} | {k[3]} | {k[5][:40]} | "
                     f"{_fmt(k, r['old'])} | {_fmt(k, r['new'])} | {r['ratio']:.3f} | {flag} |")
    for label, keys in (("only in the old run", only_old), ("only in the new run", only_new)):
        if keys:
            lines += ["", f"Rows {label}:", ""]
            lines += [f"- {' · '.join(x for x in k if x)}" for k in keys]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--out", help="markdown file to write (default: stdout)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="flag rows of ours slower by more than this fraction (default 0.05)")
    p.add_argument("--title")
    args = p.parse_args(argv)
    if not 0 <= args.threshold < 1:
        p.error(f"--threshold={args.threshold} must be in [0, 1)")
    old, new = load(args.old), load(args.new)
    if ("rows" in old) != ("rows" in new):
        p.error("OLD and NEW must come from the same benchmark script")
    rows, only_old, only_new = compare(old, new, args.threshold)
    text = markdown(old, new, rows, only_old, only_new, args.threshold, args.title)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
