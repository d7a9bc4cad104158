"""Host time to launch one jitted program, against the number of argument buffers it takes.

A batch-1 decode step is short on the device (3-4 ms on the Llama-3-8B shape at 4 bits) and
takes every weight array of the model as an argument: 517 buffers for dense W4 g128 with fused
projections, 645 for BSR W4S50 (one ``col_idx`` array more per projection). The step traces of
``profile_decode.py`` put the host's dispatch of the W4S50 step about 1 ms above dense W4's
(``results/h200/batch1/``), which is as long as W4S50 saves on the device. This script
measures that cost alone: a jitted function of ``n`` small arrays (each used, so none is
pruned) that does a fixed amount of device work, for several ``n``:

* ``dispatch``: seconds for the call to return (the host's work; the device runs behind);
* ``pipelined``: seconds per call of many calls issued back to back, then one wait (what a
  decode loop that keeps the device busy sees);
* ``per buffer``: the slope of ``pipelined`` over ``n``.

The same with the ``n`` arrays packed into one buffer (sliced inside the program) shows what
packing would save, and ``donated`` (the ``n`` arrays donated and returned updated, as the
engine's step does with its 64 KV-pool arrays) what donation adds.

    python experiments/dispatch_cost.py --out DIR [--counts 8,64,256,512,1024]

Writes ``dispatch_cost.{json,md}``. Runs anywhere (on a CPU the per-buffer cost is the CPU
client's, much lower than a GPU's).
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
from optgqa_jax.timing import source_commit  # noqa: E402


def time_calls(f, args, iters: int = 200, trials: int = 5,
               donating: bool = False) -> tuple[float, float]:
    """(median seconds for one call to return, median seconds per call of `iters` calls
    issued back to back and waited for once). With `donating`, `f` donates its arguments and
    returns their successors (as the engine's step does with the KV pool): each call then
    takes the previous call's outputs."""
    def call(a):
        y = f(*a)
        return (y if donating else a), y

    args, y = call(args)
    jax.block_until_ready(y)
    ret, pipe = [], []
    for _ in range(trials):
        args, y = call(args)
        jax.block_until_ready(y)
        t0 = time.perf_counter()
        args, y = call(args)
        ret.append(time.perf_counter() - t0)
        jax.block_until_ready(y)
        t0 = time.perf_counter()
        for _ in range(iters):
            args, y = call(args)
        jax.block_until_ready(y)
        pipe.append((time.perf_counter() - t0) / iters)
    return float(np.median(ret)), float(np.median(pipe))


def measure(counts, size: int = 256) -> list[dict]:
    """Rows of every kind at each count: ``buffers`` (n arguments, each read), ``packed``
    (the same values in one [n, size] argument) and ``donated`` (n arguments donated and
    returned updated, like the engine's KV pool)."""
    rows = []
    for n in counts:
        arrs = [jnp.full((size,), i, jnp.float32) for i in range(n)]
        many = jax.jit(lambda *a: sum(x[0] for x in a))            # every buffer used
        packed = jnp.stack(arrs)                                    # one buffer [n, size]
        one = jax.jit(lambda p: jnp.sum(p[:, 0]))
        donating = jax.jit(lambda *a: [x.at[0].add(1.0) for x in a],
                           donate_argnums=tuple(range(n)))
        for kind, f, args in (("buffers", many, arrs), ("packed", one, (packed,)),
                              ("donated", donating, [a + 0 for a in arrs])):
            d, p = time_calls(f, args, donating=kind == "donated")
            rows.append(dict(n=n, kind=kind, dispatch_us=d * 1e6, pipelined_us=p * 1e6))
            print(f"n={n} {kind}: dispatch {d * 1e6:.1f} us, pipelined {p * 1e6:.1f} us/call",
                  flush=True)
    return rows


def slope(rows, kind: str, key: str = "pipelined_us") -> float:
    """Least-squares slope of `key` over n for the rows of `kind` (µs per buffer or row)."""
    xs = np.array([r["n"] for r in rows if r["kind"] == kind], np.float64)
    ys = np.array([r[key] for r in rows if r["kind"] == kind], np.float64)
    return float(np.polyfit(xs, ys, 1)[0]) if len(xs) > 1 else float("nan")


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# Host dispatch cost per argument buffer", "",
             f"Device {m['device']}, jax {m['jax']}, commit {m['commit']}. One jitted program "
             "of n float32 arrays of 256 elements (each read), against the same arrays packed "
             "into one buffer, and the n arrays donated and returned updated. Dispatch: µs for the call to return; pipelined: µs per call of "
             "200 calls issued back to back, one wait. Medians of 5 trials.", "",
             f"Slope of the dispatch time over n: **{res['per_buffer_dispatch_us']:.2f} µs per "
             f"buffer** (the host's launch work). Slope of the pipelined time: "
             f"{res['per_buffer_us']:.2f} µs per buffer (it includes the device's work, "
             f"which grows with n here); packed: {res['per_packed_row_us']:.3f} µs per row."
             + ("" if res.get("per_donated_dispatch_us") is None else
                f" Donated and returned (as the engine's KV pool): "
                f"{res['per_donated_dispatch_us']:.2f} µs per buffer of dispatch."),
             "",
             "| n | kind | dispatch µs | pipelined µs per call |",
             "| ---: | --- | ---: | ---: |"]
    for r in res["rows"]:
        lines.append(f"| {r['n']} | {r['kind']} | {r['dispatch_us']:.1f} | "
                     f"{r['pipelined_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", default="8,64,256,512,1024",
                   help="comma-separated numbers of argument buffers")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    try:
        counts = [int(c) for c in a.counts.split(",") if c]
    except ValueError:
        p.error(f"--counts {a.counts!r}: expected comma-separated positive integers")
    if not counts or min(counts) < 1:
        p.error(f"--counts {a.counts!r}: expected comma-separated positive integers")
    rows = measure(counts)
    res = dict(meta=dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                         commit=source_commit()),
               rows=rows, per_buffer_us=slope(rows, "buffers"),
               per_buffer_dispatch_us=slope(rows, "buffers", "dispatch_us"),
               per_donated_dispatch_us=slope(rows, "donated", "dispatch_us"),
               per_packed_row_us=slope(rows, "packed"))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "dispatch_cost.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "dispatch_cost.md"), "w") as f:
        f.write(markdown(res))
    print(f"per buffer {res['per_buffer_dispatch_us']:.2f} us dispatch, "
          f"{res['per_buffer_us']:.2f} us pipelined; wrote {a.out}/dispatch_cost.{{json,md}}")


if __name__ == "__main__":
    main()
