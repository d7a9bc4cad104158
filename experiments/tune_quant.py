"""Tile search for ``pallas_kernels.quant_matmul`` on one GPU (the data behind
``QuantMatmulConfig.for_shape``).

For each case (a Llama-3-8B linear shape, a row count M and a weight format), in two stages:
first the unpacking scheme (register multiply-adds, one product per shift, or one product per
tile with the shifts joined), tile sizes and warps with split-K from a rule; then the grid
size (the best three tiles at every split-K giving 1 to 16 programs per SM, at one row also one
K step per program), and around the best the register path's ``runtime_magic`` and
``wrapper_sums`` and ``raw_x`` (or the shift-by-shift path's ``shift_patterns``), the register prefetch of
the next K tile and the pipeline depth. Every candidate is timed with
``optgqa_jax.benchmark.timeit_rotating`` over enough independent weight copies to overflow the
L2 cache; the default config of ``for_shape`` is timed too, so the table shows what tuning
would gain. Cases run in priority order under a time budget; the JSON is rewritten after each.
With ``--confirm-rounds N`` each case's three best tiles, the rules' tiles and the bfloat16
product are timed again in N interleaved rounds, and the case reports (and tables) the
medians of those rounds. With ``--descend`` a descent takes the search's place: from this
device's tuning-table tiles and the rules' tiles to faster neighbours (each option of the path
flipped, split-K, ``block_n`` and ``block_k`` halved and doubled, warps and stages;
:func:`descent_moves`), then every combination of the best tiles' options
(:func:`descend`), for re-tuning a table after new options are added. Above
``quant.linear.KERNEL_MAX_ROWS`` rows the route
``quant.matmul`` takes there (the streaming dequantize kernel, then the float product) is
timed too (``dequantize_us``). With ``--table`` the cases whose best tiles beat the rules by
more than 2% (and, above ``KERNEL_MAX_ROWS`` rows, that route by more than 2%) are merged into a
tuning table (``pallas_kernels.tuning``), which ``QuantMatmulConfig.for_shape`` then reads on
that device kind (and ``quant.matmul`` for its route above ``KERNEL_MAX_ROWS`` rows):
``pallas_kernels/tuning/quant_matmul.json`` is the packaged one.

Usage::

    python experiments/tune_quant.py [--budget-s 400] [--rows 1,16] [--formats w4g128,w8]
                                     [--shapes gate_up,down] [--table PATH]
                                     [--confirm-rounds 3] [--descend]
                                     [--out experiments/results/quant]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import quant  # noqa: E402
from optgqa_jax.timing import confirm_finalists  # noqa: E402
from optgqa_jax.quant.linear import KERNEL_MAX_ROWS  # noqa: E402
from pallas_kernels import compiler_options  # noqa: E402
from pallas_kernels import dequant as kdq  # noqa: E402
from pallas_kernels import tuning  # noqa: E402
from pallas_kernels.quant_matmul import (QuantMatmulConfig, quant_matmul,  # noqa: E402
                                         tuning_key)
from bench_quant import arg_sets, io_bytes  # noqa: E402  (the same rotation and byte count)

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}


def cases():
    """(shape, M, format) in priority order (qkv last: it resembles o)."""
    for M, fmt in ((1, "w4g128"), (16, "w4g128"), (1, "w8"), (16, "w8"), (64, "w4g128"),
                   (2048, "w4g128"), (256, "w4g128"), (512, "w4g128"), (1, "w4"),
                   (16, "w8g128")):
        for shape in ("gate_up", "o", "down"):
            yield shape, M, fmt
    for M, fmt in ((1, "w4g128"), (16, "w4g128"), (2048, "w4g128"), (256, "w4g128"),
                   (512, "w4g128")):
        yield "qkv", M, fmt


def candidates(M, K, bits, group_size):
    """Tensor-core tiles with the shifts joined (for M <= 4 taking turns with register
    multiply-add tiles), then the shift-by-shift tensor-core tiles.

    Joined tiles come first so that the budget reaches them: in SASS their loop costs fewer
    instructions per code than the register path's at one row (2.5-3.8 against 5.5-7.7,
    ``results/cpu/quant/ptx_per_code.md``). K steps past the group size run as one-group
    sub-tiles."""
    P = 32 // bits
    deep = [16 * P, 32 * P]       # past the group size: one-group sub-tiles (k_tiles)
    first = [c for pair in itertools.zip_longest(_joined(M, group_size), _register(M, P))
             for c in pair if c is not None]
    yield from first
    if M <= 64:
        bm = max(16, 1 << (M - 1).bit_length())
        for bk, bn, warps in itertools.product(deep, (32, 64, 128, 256), (4, 8)):
            yield QuantMatmulConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                                    num_stages=3)
    else:
        for bm, bn, bk, warps in itertools.product((64, 128), (64, 128, 256), deep, (4, 8)):
            yield QuantMatmulConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                                    num_stages=3)


def _joined(M, group_size):
    """Joined tensor-core tiles, widest columns first."""
    # From 32 rows on, each tile dequantized before its product (dequant_tiles) is tried first:
    # its per-output correction disappears, which costs block_m * block_n per sub-tile.
    joined_bk = [bk for bk in (128, 256, 64)
                 if group_size == -1 or group_size % bk == 0 or bk % group_size == 0]
    # from 256 rows whole 256-row tiles first: each weight tile dequantized once per 256 rows
    # (compare_variants.py notes their sm_90 register and instruction counts)
    bms = ((max(16, 1 << (M - 1).bit_length()),) if M <= 64
           else (256, 128, 64) if M >= 256 else (64, 128))
    dequant = (True, False) if M >= 32 else (False,)
    for bm, bn, bk, warps in itertools.product(bms, (256, 128, 64), joined_bk, (4, 8)):
        for dq in dequant:
            yield QuantMatmulConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                                    num_stages=3, joined=True, dequant_tiles=dq)


def _register(M, P):
    """Register multiply-add tiles (M <= 4 only: one [block_k / P, block_n] accumulator per
    row), deep K steps first (fewest instructions per code in SASS)."""
    if M > 4:
        return
    bm = 1 << (M - 1).bit_length()
    for bk, bn, warps in itertools.product((64 * P, 32 * P, 16 * P), (128, 64, 256), (8, 4)):
        yield QuantMatmulConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                                num_stages=3, fma=True)


def with_split(cfg, M, K, N, sms=132):
    """split_k so that the grid has about two programs per SM."""
    programs = -(-M // cfg.block_m) * -(-N // cfg.block_n)
    split = 1
    while programs * split < 2 * sms and K // cfg.block_k >= 2 * split * 2:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


def split_variants(cfg, M, K, N, sms=132):
    """cfg at every power-of-two split_k whose grid has 1 to 16 programs per SM (and at one
    K step per program for one row), each split keeping at least one K step."""
    programs = -(-M // cfg.block_m) * -(-N // cfg.block_n)
    steps = max(1, K // cfg.block_k)
    splits = {s for s in (1 << i for i in range(12))
              if s <= steps and sms <= programs * s <= 16 * sms}
    if M == 1:
        splits.add(steps)
    return [dataclasses.replace(cfg, split_k=s) for s in sorted(splits) if s != cfg.split_k]


def descent_moves(cfg: QuantMatmulConfig, K: int, N: int, bits: int = 4) -> list:
    """The neighbours of `cfg` that ``--descend`` tries: each option of its path flipped
    (register path: ``runtime_magic``, ``wrapper_sums``, ``kernel_sums``, ``half_pairs``,
    ``raw_x`` and the register ``prefetch``, where ``half_pairs`` and ``raw_x`` exclude each
    other, as do the two sums options, so turning one on turns the other off; shift-by-shift
    path: ``shift_patterns``), then ``split_k`` and
    ``block_n`` halved and doubled, ``block_k`` halved (at least 16 codes per shift) and
    doubled (with ``split_k`` halved where the splits would otherwise outgrow K), the other
    warp count (4 or 8) and every other pipeline depth from 1 to 4. Only settings that pass
    ``QuantMatmulConfig.validate`` and keep at least one K step per split; options first,
    since they change the instructions per code."""
    R = dataclasses.replace
    flips = []
    if cfg.fma:
        exclusive = {"half_pairs": "raw_x", "raw_x": "half_pairs",
                     "wrapper_sums": "kernel_sums", "kernel_sums": "wrapper_sums"}
        for f in ("runtime_magic", "wrapper_sums", "kernel_sums", "half_pairs", "raw_x",
                  "prefetch"):
            on = not getattr(cfg, f)
            extra = {exclusive[f]: False} if on and f in exclusive else {}
            flips.append(R(cfg, **{f: on}, **extra))
    elif not cfg.joined:
        flips.append(R(cfg, shift_patterns=not cfg.shift_patterns))
    grid = [R(cfg, split_k=cfg.split_k * 2), R(cfg, split_k=cfg.split_k // 2),
            R(cfg, block_n=cfg.block_n * 2), R(cfg, block_n=cfg.block_n // 2),
            R(cfg, block_k=cfg.block_k * 2, split_k=(
                cfg.split_k if cfg.split_k * cfg.block_k * 2 <= K else max(1, cfg.split_k // 2)))]
    if cfg.block_k // 2 >= 16 * (32 // bits):
        grid.append(R(cfg, block_k=cfg.block_k // 2))
    grid += [R(cfg, num_warps=12 - cfg.num_warps if cfg.num_warps in (4, 8) else 4)]
    grid += [R(cfg, num_stages=s) for s in (1, 2, 3, 4) if s != cfg.num_stages]
    out = []
    for c in flips + grid:
        try:
            c.validate()
        except ValueError:
            continue
        if c.split_k < 1 or c.split_k * c.block_k > max(K, c.block_k) or c.block_n > max(N, 16):
            continue
        if c != cfg and c not in out:
            out.append(c)
    return out


def flag_combinations(cfg: QuantMatmulConfig) -> list:
    """`cfg`'s tiles under every valid combination of its path's options (register path:
    ``runtime_magic`` and ``prefetch`` each on or off, with at most one of ``wrapper_sums``
    and ``kernel_sums`` and at most one of ``half_pairs`` and ``raw_x``; shift-by-shift path:
    ``shift_patterns`` on or off)."""
    R = dataclasses.replace
    one_of = ((False, False), (True, False), (False, True))
    if cfg.fma:
        out = [R(cfg, runtime_magic=rm, prefetch=pf, wrapper_sums=ws, kernel_sums=ks,
                 half_pairs=hp, raw_x=rx)
               for rm, pf in itertools.product((False, True), repeat=2)
               for ws, ks in one_of for hp, rx in one_of]
    elif not cfg.joined:
        out = [R(cfg, shift_patterns=sp) for sp in (False, True)]
    else:
        out = [cfg]
    return out


def descend(seeds: list, time_cfg, K: int, N: int, deadline: float, min_gain: float = 0.02,
            bits: int = 4):
    """First-improvement descent from the fastest of `seeds`: time `cfg`'s
    :func:`descent_moves` in turn and move to the first that is faster by more than
    `min_gain`, until no neighbour is; then every :func:`flag_combinations` of the best tiles
    (options that pay only together), and, if one is faster by more than `min_gain`, the
    descent goes on from it. Stops when `deadline` (``time.perf_counter()`` seconds) passes.
    ``time_cfg(cfg)`` returns seconds or None for a failed config; each config is timed once.
    Returns (seconds, config) of the best found."""
    seen, best = {}, None
    for c in seeds:
        if c not in seen:
            seen[c] = time_cfg(c)
            if seen[c] is not None and (best is None or seen[c] < best[0]):
                best = (seen[c], c)
    if best is None:
        return float("inf"), seeds[0]

    def first_better(configs):
        for c in configs:
            if time.perf_counter() >= deadline:
                return None
            if c in seen:
                continue
            seen[c] = t = time_cfg(c)
            if t is not None and t < (1 - min_gain) * best[0]:
                return t, c
        return None

    while time.perf_counter() < deadline:
        step = first_better(descent_moves(best[1], K, N, bits))
        if step is None:
            step = first_better(flag_combinations(best[1]))
            if step is None:
                break
        best = step
    return best


def full_search(M, K, N, qc, default, t_def, time_cfg, elapsed, budget_s):
    """The full search of one case: (seconds, config) of the best found. Stage 1 times
    :func:`candidates` (split-K from :func:`with_split`) for half of `budget_s`; stage 2 the
    best three at every :func:`split_variants`; then around the best its path's options,
    the register prefetch and other pipeline depths. ``time_cfg(cfg)`` returns seconds or None
    (a failed config); ``elapsed()`` the case's seconds so far; `default` (the rules' tiles)
    was timed already (`t_def`, None if it failed)."""
    timed = [] if t_def is None else [(t_def, default)]
    for cfg in candidates(M, K, qc.bits, qc.group_size):
        if elapsed() > budget_s * 0.5:
            break
        cfg = with_split(cfg, M, K, N)
        t = time_cfg(cfg)
        if t is not None:
            timed.append((t, cfg))
    # Second stage: the grid size. A decode-sized product has few programs per SM, each
    # with a long K loop, so how many loads are in flight decides its speed: the best
    # three tiles are timed at every split_k that gives 1 to 16 programs per SM, then the
    # best of all with prefetch and other pipeline depths.
    timed.sort(key=lambda tc: tc[0])
    tops = [c for _, c in timed[:3]]
    for cfg in [c2 for c in tops for c2 in split_variants(c, M, K, N)]:
        if elapsed() > budget_s * 0.85:
            break
        if any(c == cfg for _, c in timed):
            continue
        t = time_cfg(cfg)
        if t is not None:
            timed.append((t, cfg))
    timed.sort(key=lambda tc: tc[0])
    best = timed[0] if timed else (float("inf"), default)
    b = best[1]
    # register path: 2^23's pattern from memory (a loop-free program otherwise spends two
    # logic instructions per code on it) and x's sums from the wrapper (sm_90 SASS at one
    # row, loop-free gate/up tiles: 1536 -> 1312 -> 1216 instructions per 256 codes)
    # shift-by-shift tensor-core path: the codes as bit patterns (sm_90 SASS, the tuned
    # 16-row gate/up tiles: 5.34 -> 3.28 instructions per code)
    # register path reading x as given (raw_x): no shift-major copy of x per call
    options = ([dataclasses.replace(b, runtime_magic=True),
                dataclasses.replace(b, wrapper_sums=True),
                dataclasses.replace(b, runtime_magic=True, wrapper_sums=True)]
               + ([dataclasses.replace(b, raw_x=True)] if not b.half_pairs else [])
               if b.fma else [] if b.joined else [dataclasses.replace(b, shift_patterns=True)])
    for cfg in (options + [dataclasses.replace(b, prefetch=True)]
                + [dataclasses.replace(b, num_stages=s) for s in (2, 4)
                   if s != b.num_stages]):
        if elapsed() > budget_s:
            break
        t = time_cfg(cfg)
        if t is not None and t < best[0]:
            best = (t, cfg)
    return best


def confirm_case(case: dict, default, T, matmul_fn, sets, bf16_sets, rounds: int,
                 finalists: int = 3):
    """Time the `finalists` fastest distinct tiles of ``case["tried"]``, the rules' tiles
    `default` (None where they failed) and the bfloat16 product (``bf16_sets``) again in
    `rounds` interleaved rounds (``T(f, sets)`` seconds each). Records the rounds as
    ``case["confirm"]``, replaces ``case["bf16_us"]`` and ``case["default"]["us"]`` by their
    medians (the single timings kept as ``search_us``), and returns (seconds, config,
    bfloat16 seconds) of the lowest median."""
    cfgs, times, bf16, med = confirm_finalists(
        case["tried"], QuantMatmulConfig, default, lambda c: T(matmul_fn(c), sets),
        lambda: T(lambda x, w: x @ w, bf16_sets), rounds, finalists)
    best = min(cfgs, key=med.get)
    t_bf16 = float(np.median(bf16))
    case["confirm"] = dict(rounds=rounds, bf16_us=[t * 1e6 for t in bf16],
                           settings=[dict(config=dataclasses.asdict(c),
                                          us=[t * 1e6 for t in times[c]]) for c in cfgs])
    case["bf16_search_us"], case["bf16_us"] = case["bf16_us"], t_bf16 * 1e6
    if default is not None:
        case["default"]["search_us"] = case["default"]["us"]
        case["default"]["us"] = med[default] * 1e6
    return med[best], best, t_bf16


def table_entries(res: dict, source: str) -> list:
    """Tuning-table entries (``pallas_kernels.tuning``) of the cases whose best tiles beat the
    rules' default by more than 2% (elsewhere the rules stay). Above ``KERNEL_MAX_ROWS`` rows,
    where ``quant.matmul`` takes the streaming dequantize + float product unless the table
    says otherwise, only cases whose best tiles also beat that route (``dequantize_us``,
    timed in the same run) by more than 2%; their entries carry ``dequantize_us``, which
    ``quant_matmul_config.fused_measured_faster`` reads."""
    out = []
    for c in res["cases"]:
        d, b = c["default"]["us"], c["best"]
        if not b["us"] < float("inf") or (d is not None and b["us"] > 0.98 * d):
            continue
        dq = c.get("dequantize_us")
        if c["M"] > KERNEL_MAX_ROWS and not (dq is not None and b["us"] < 0.98 * dq):
            continue
        qc = quant.parse_spec(c["format"])
        entry = dict(device=res["device"],
                     key=tuning_key(c["M"], c["K"], c["N"], qc.bits, qc.group_size),
                     config=b["config"], us=round(b["us"], 2), rules_us=d and round(d, 2),
                     bf16_us=round(c["bf16_us"], 2), commit=res["commit"], source=source)
        if dq is not None:
            entry["dequantize_us"] = round(dq, 2)
        out.append(entry)
    return out


def markdown(res: dict) -> str:
    """The best tiles of every case against bfloat16 and the default config."""
    lines = [f"# Quantized matmul tile search", "",
             f"Device {res['device']}, jax {res['jax']}, commit {res['commit']}. Copy ceiling "
             f"{res['ceiling'] / 1e9:,.0f} GB/s. µs per product over weight copies that "
             "overflow the L2 cache (`timeit_rotating`); % = bytes moved / time / ceiling.", "",
             "| shape | M | format | bf16 µs | rules µs | best µs | best % ceiling | "
             "best × bf16 | best tiles (bm, bn, bk, split, warps, stages, fma, prefetch, "
             "joined, dequant_tiles; options) | "
             "tried |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for c in res["cases"]:
        b, d = c["best"], c["default"]
        t = b["config"]
        tiles = (f"{t['block_m']}, {t['block_n']}, {t['block_k']}, {t['split_k']}, "
                 f"{t['num_warps']}, {t['num_stages']}, {'yes' if t.get('fma') else 'no'}, "
                 f"{'yes' if t.get('prefetch') else 'no'}, "
                 f"{'yes' if t.get('joined') else 'no'}, "
                 f"{'yes' if t.get('dequant_tiles') else 'no'}"
                 + "".join(f"; {k}" for k in ("runtime_magic", "wrapper_sums", "kernel_sums", "half_pairs",
                                              "shift_patterns", "raw_x")
                           if t.get(k)))
        lines.append(f"| {c['shape']} {c['K']}×{c['N']} | {c['M']} | {c['format']} | "
                     f"{c['bf16_us']:.1f} | "
                     f"{'fails' if d['us'] is None else format(d['us'], '.1f')} | "
                     f"{b['us']:.1f} | {b['pct_ceiling']:.0f}% | {b['speedup_vs_bf16']:.2f} | "
                     f"{tiles} | {len(c['tried'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--case-budget-s", type=float, default=30)
    p.add_argument("--rows", default=None,
                   help="comma-separated row counts M to search (default: every case)")
    p.add_argument("--formats", default=None,
                   help="comma-separated weight formats, e.g. w4g128,w8 (default: every case)")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated shapes of {sorted(SHAPES)} (default: all)")
    p.add_argument("--table", default=None,
                   help="merge the cases whose best tiles beat the rules into this tuning "
                        "table (pallas_kernels.tuning), e.g. pallas_kernels/tuning/"
                        "quant_matmul.json")
    p.add_argument("--confirm-rounds", type=int, default=0, metavar="N",
                   help="time each case's three best tiles, the rules' tiles and the bfloat16 "
                        "product again in N interleaved rounds; report and table the medians")
    p.add_argument("--descend", action="store_true",
                   help="instead of the full search, start each case from this device's "
                        "tuning-table tiles and the rules' tiles and move to faster "
                        "neighbours (options flipped, split-K, block_n, block_k, warps, "
                        "stages; then every combination of the best tiles' options) within "
                        "--case-budget-s")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quant"))
    a = p.parse_args(argv)
    if a.confirm_rounds < 0:
        p.error(f"--confirm-rounds {a.confirm_rounds}: expected an integer >= 0")
    shapes = None if a.shapes is None else set(a.shapes.split(","))
    if shapes and not shapes <= set(SHAPES):
        p.error(f"--shapes: unknown {sorted(shapes - set(SHAPES))}; choose from {sorted(SHAPES)}")
    os.makedirs(a.out, exist_ok=True)
    opts = compiler_options()
    ceiling = B.copy_bandwidth()
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
               commit=B.source_commit(), ceiling=ceiling, cases=[])
    t_start = time.perf_counter()
    rows = None if a.rows is None else {int(r) for r in a.rows.split(",")}
    formats = None if a.formats is None else set(a.formats.split(","))
    for shape, M, fmt in cases():
        if ((rows and M not in rows) or (formats and fmt not in formats)
                or (shapes and shape not in shapes)):
            continue
        if time.perf_counter() - t_start > a.budget_s:
            break
        K, N = SHAPES[shape]
        qc = quant.parse_spec(fmt)
        key = jax.random.PRNGKey(M + K + N)
        qsets = arg_sets(key, M, K, N, lambda k: quant.synthetic.random_quantized_linear(
            k, K, N, qc, "bfloat16"))
        copies, one = len(qsets), qsets[0][1]
        sets = [(x, ql.qweight, ql.scales, ql.zeros) for x, ql in qsets]
        del qsets
        nbytes = io_bytes(M, K, N, one)
        wbf = arg_sets(key, M, K, N, lambda k: jnp.zeros((K, N), jnp.bfloat16)
                       + jax.random.uniform(k, (), jnp.bfloat16))
        t_bf16 = B.timeit_rotating(lambda x, w: x @ w, wbf, compiler_options=opts)
        if not a.confirm_rounds:
            del wbf
        case = dict(shape=shape, M=M, K=K, N=N, format=fmt, copies=copies, bytes=nbytes,
                    bf16_us=t_bf16 * 1e6, tried=[])

        def matmul_fn(cfg):
            return lambda x, q, s, z: quant_matmul(x, q, s, z, bits=qc.bits,
                                                   group_size=qc.group_size, config=cfg)

        def time_cfg(cfg):
            f = matmul_fn(cfg)
            try:
                t = B.timeit_rotating(f, sets, compiler_options=opts)
            except Exception as e:  # noqa: BLE001 - a failing config is a result
                case["tried"].append(dict(config=dataclasses.asdict(cfg), error=repr(e)[-200:]))
                return None
            case["tried"].append(dict(config=dataclasses.asdict(cfg), us=t * 1e6))
            return t

        t_case = time.perf_counter()
        if M > KERNEL_MAX_ROWS and kdq.supported(qc.bits, qc.group_size):
            # the route quant.matmul takes here unless the table holds faster fused tiles
            case["dequantize_us"] = 1e6 * B.timeit_rotating(
                lambda x, q, s, z: jnp.dot(x, kdq.dequantize_packed(
                    q, s, z, bits=qc.bits, group_size=qc.group_size, K=K, dtype=x.dtype)),
                sets, compiler_options=opts)
        default = QuantMatmulConfig.for_shape("cuda", M, K, N, qc.group_size)   # the rules
        t_def = time_cfg(default)
        case["default"] = dict(config=dataclasses.asdict(default),
                               us=None if t_def is None else t_def * 1e6)
        if a.descend:   # from this device's table entry and the rules, to better neighbours
            seeds = [QuantMatmulConfig.for_shape("cuda", M, K, N, qc.group_size,
                                                 bits=qc.bits, device=res["device"]), default]
            best = descend(seeds, lambda c: t_def if c == default else time_cfg(c), K, N,
                           t_case + a.case_budget_s, bits=qc.bits)
        else:
            best = full_search(M, K, N, qc, default, t_def, time_cfg,
                               lambda: time.perf_counter() - t_case, a.case_budget_s)
        t, b = best
        if a.confirm_rounds and any(r.get("us") is not None for r in case["tried"]):
            # single timings of one setting move by up to 2x between calls on the small
            # products: the three best settings, the rules' tiles and bfloat16 timed again in
            # turn; the case then reports medians of these rounds
            t, b, t_bf16 = confirm_case(case, default if t_def is not None else None,
                                        lambda f, st: B.timeit_rotating(
                                            f, st, compiler_options=opts),
                                        matmul_fn, sets, wbf, a.confirm_rounds)
            del wbf
        case["best"] = dict(config=dataclasses.asdict(b), us=t * 1e6,
                            pct_ceiling=100 * nbytes / t / ceiling, speedup_vs_bf16=t_bf16 / t)
        case["seconds"] = time.perf_counter() - t_case
        res["cases"].append(case)
        print(f"{shape} M={M} {fmt}: bf16 {t_bf16 * 1e6:.1f} us; default "
              f"{case['default']['us'] or float('nan'):.1f} us; best {t * 1e6:.1f} us "
              f"({case['best']['pct_ceiling']:.0f}% of copy, {t_bf16 / t:.2f}x bf16) "
              f"{b} [{len(case['tried'])} tried, {case['seconds']:.0f} s]", flush=True)
        with open(os.path.join(a.out, "tune_quant.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, "tune_quant.md"), "w") as f:
            f.write(markdown(res))
        if a.table:
            tuning.write_entries(a.table, "quant_matmul", table_entries(
                res, f"tune_quant.py at {res['commit']} on {res['device']}"))


if __name__ == "__main__":
    main()
