"""GQSA speed per layer: bfloat16, dense W4/W2 g128 and the BSR formats on the Llama-3-8B
linear shapes, with the BSR kernels' tile searches (the ``--part speed`` of
``experiments/gqsa_eval.py``, which runs it and writes its files).

Rows per shape and row count of x: ``bf16``; ``w4g128`` and ``w2g128`` (dense kernel);
``w4g128sNN`` (``bsr_quant_matmul``: its best tiles at one row, with each option tried on
them, and the block-list schedule); at one row ``w4g128sNN packed``, ``w4g128sNN packed sm``
and ``w4g128sNN packed sm f32`` (the packed layout's kernel on stream-order and shift-major
codes, the latter with bfloat16 and with float32 x, each with its own tile search,
:func:`packed_row`); at more than one row the repacked routes
(scatter and gather) and the block-map kernel (``bsr_gather_quant_matmul``, a few tile settings); and the
group-major kernel unless turned off. Times are µs per product with the weights rotated past
the L2 cache (``bench_quant.arg_sets``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from optgqa_jax import benchmark as B  # noqa: E402
from optgqa_jax import quant, sparse  # noqa: E402
from optgqa_jax.sparse.synthetic import random_bsr_linear  # noqa: E402
from optgqa_jax.timing import confirm_finalists, source_commit  # noqa: E402
from pallas_kernels import compiler_options  # noqa: E402
from pallas_kernels import _common as kc, tuning  # noqa: E402
from pallas_kernels.bsr_gather_quant_matmul import (BSRGatherConfig,  # noqa: E402
                                                    bsr_gather_quant_matmul)
from pallas_kernels.bsr_gm_quant_matmul import (GroupMajorConfig,  # noqa: E402
                                                bsr_gm_quant_matmul, group_major_blocks)
from pallas_kernels.bsr_quant_matmul import (BSRMatmulConfig, bsr_quant_matmul,  # noqa: E402
                                              bsr_quant_matmul_packed)
from pallas_kernels.bsr_quant_matmul import tuning_key as bsr_tuning_key  # noqa: E402
from pallas_kernels.bsr_quant_matmul_config import PACKED_KERNEL  # noqa: E402
from pallas_kernels.quant_matmul import quant_matmul  # noqa: E402
from bench_quant import arg_sets  # noqa: E402  (the same L2 rotation)

W4G128 = quant.QuantConfig(bits=4, group_size=128)
SHAPES = {"gate_up 4096x28672": (4096, 28672), "down 14336x4096": (14336, 4096),
          "qkv 4096x6144": (4096, 6144), "o 4096x4096": (4096, 4096)}


def time_config(T, f, sets, cfg, tried: list, **record):
    """``T(f, sets)`` in seconds, or None where the config fails (a failing config is a
    result); either way a record of ``cfg`` (with ``record``'s fields) is appended to `tried`."""
    try:
        t = T(f, sets)
    except Exception as e:  # noqa: BLE001
        tried.append(dict(record, config=dataclasses.asdict(cfg), error=repr(e)[-200:]))
        return None
    tried.append(dict(record, config=dataclasses.asdict(cfg), us=t * 1e6))
    return t


def confirm_best(T, sets, tried: list, make_f, default, dense_case, rounds: int,
                 finalists: int = 3):
    """Time the `finalists` fastest distinct settings of `tried`, the rules' tiles `default`
    and dense W4 (``dense_case``: its function and argument sets) again in `rounds`
    interleaved rounds. Returns (seconds, config, function) of the lowest median, and the
    record: every setting's round times, the rules' and dense W4's medians (µs) and the
    best median over dense W4's."""
    cfgs, times, dense, med = confirm_finalists(
        tried, BSRMatmulConfig, default, lambda c: T(make_f(c), sets),
        lambda: T(*dense_case), rounds, finalists)
    best = min(cfgs, key=med.get)
    d = float(np.median(dense))
    rec = dict(rounds=rounds, dense_w4_us=[t * 1e6 for t in dense],
               settings=[dict(config=dataclasses.asdict(c), us=[t * 1e6 for t in times[c]])
                         for c in cfgs],
               best_us=med[best] * 1e6, rules_us=med[default] * 1e6, dense_w4_median_us=d * 1e6,
               time_vs_dense_w4=med[best] / d)
    return med[best], best, make_f(best), rec


def speed_rows(ceiling: float, rows, out: list, save, shapes=None, sparsities=(0.3, 0.5),
               group_major: bool = True, table: Optional[str] = None,
               all_options: bool = False, confirm_rounds: int = 0) -> None:
    """Time every format on `shapes` (short names: gate_up, down, qkv, o; default all): the
    BSR formats at each of `sparsities`, and their group-major twins unless `group_major` is
    off. With `table`, each BSR case's best tiles go into that ``bsr_quant_matmul`` tuning
    table (:mod:`pallas_kernels.tuning`) when they beat the rules' tiles. At one row the BSR
    kernel's best tiles are tried with ``runtime_magic`` and ``code_zeros``; `all_options`
    adds the options that were timed slower (``raw_x``, ``bf16_x``, ``index_magic``,
    ``row_loop``). With `confirm_rounds`, the search's best settings, the rules' tiles and
    dense W4 are timed again in that many interleaved rounds (:func:`confirm_best`) and the
    row reports the lowest median (``confirm``)."""
    opts = compiler_options()
    T = lambda fn, sets: B.timeit_rotating(fn, sets, compiler_options=opts)
    picked = {n: kn for n, kn in SHAPES.items() if shapes is None or n.split()[0] in shapes}
    for (name, (K, N)), M in ((s, m) for s in picked.items() for m in rows):
        key = jax.random.PRNGKey(M * 7 + K + N)
        base = dict(shape=name, M=M, K=K, N=N)
        dense_w4 = None

        def add(fmt, t, wbytes, err, **extra):
            nonlocal dense_w4
            nbytes = wbytes + 2 * M * (K + N)
            row = dict(base, format=fmt, us=t * 1e6, weight_bytes=wbytes,
                       gb_per_s=nbytes / t / 1e9, pct_ceiling=100 * nbytes / t / ceiling,
                       speedup_vs_bf16=t_bf16 / t, rel_error=err, **extra)
            if fmt == "w4g128":
                dense_w4 = t
            row["time_vs_dense_w4"] = None if dense_w4 is None else t / dense_w4
            out.append(row)
            print(f"{name} M={M} {fmt}: {row['us']:.1f} us ({row['pct_ceiling']:.0f}% of copy, "
                  f"{row['speedup_vs_bf16']:.2f}x bf16"
                  + ("" if row["time_vs_dense_w4"] is None
                     else f", {row['time_vs_dense_w4']:.2f}x dense w4 time")
                  + ("" if err is None else f", rel err {err:.1e}") + ")", flush=True)
            save()

        def rel_err(y, want):
            y = np.asarray(y, np.float32)
            if not np.isfinite(y).all():
                return float("inf")
            return float(np.abs(y - want).max() / np.abs(want).max())

        sets = arg_sets(key, M, K, N, lambda k: (0.02 * jax.random.normal(
            jax.random.fold_in(k, 1), (K, N))).astype(jnp.bfloat16))
        t_bf16 = T(lambda x, w: x @ w, sets)
        del sets
        add("bf16", t_bf16, 2 * K * N, None)
        for fmt in ("w4g128", "w2g128"):
            qc = quant.parse_spec(fmt)
            sets = arg_sets(key, M, K, N, lambda k: quant.synthetic.random_quantized_linear(
                jax.random.fold_in(k, 2), K, N, qc, "bfloat16"))
            x, ql = sets[0]
            want = np.asarray(jnp.dot(x.astype(jnp.float32), quant.dequantize(ql, jnp.float32)))
            f = lambda x, ql: quant.matmul(x, ql, "pallas")
            add(fmt, T(f, sets), ql.nbytes - ql.g_idx.size * 4, rel_err(jax.jit(f)(x, ql), want))
            if fmt == "w4g128":
                dense_case = (f, sets)   # timed again beside the BSR finalists
            del sets
        for s in sparsities:
            sets = arg_sets(key, M, K, N, lambda k: random_bsr_linear(
                int(jax.random.randint(k, (), 0, 2 ** 31 - 1)), K, N, W4G128, s, "bfloat16"))
            x, b = sets[0]
            want = np.asarray(jnp.dot(x.astype(jnp.float32), sparse.dequantize_bsr(b, jnp.float32)))
            best = None
            default = BSRMatmulConfig.for_shape("cuda", M, b.nnz)
            tried = []
            # the tile search only where the engine runs this kernel (one row; more rows take
            # the repacked dense kernel)
            candidates = [default] + [BSRMatmulConfig(block_t=bt, block_m=default.block_m,
                                                      num_warps=nw, num_stages=ns)
                                      for bt in (32, 64, 128, 256) for nw in (2, 4, 8)
                                      for ns in (2,)
                                      if M <= sparse.bsr.KERNEL_MAX_ROWS]

            def make_f(cfg):
                return lambda x, b, cfg=cfg: bsr_quant_matmul(
                    x, b.codes, b.scales, b.zeros, b.col_idx, b.row_ids, out_features=N,
                    bits=4, group_size=128, row_blocks=b.row_blocks, config=cfg)

            def try_cfg(cfg):
                nonlocal best, t_default
                f = make_f(cfg)
                t = time_config(T, f, sets, cfg, tried)
                if t is None:
                    return
                if best is None or t < best[0]:
                    best = (t, cfg, f)
                if t_default is None:
                    t_default = t

            t_default = None
            for cfg in candidates:
                try_cfg(cfg)
            # the options only where the engine runs this kernel (more rows: default tiles)
            searched = M <= sparse.bsr.KERNEL_MAX_ROWS
            if best is not None and searched:
                base_cfg = best[1]
                # the best tiles with 2^23's pattern read at run time (one logic instruction
                # per code instead of two in these loop-free programs), with the zero points on
                # the codes (no group sums: one launch fewer), and both
                for extra in (dict(runtime_magic=True), dict(code_zeros=True),
                              dict(runtime_magic=True, code_zeros=True)):
                    try_cfg(dataclasses.replace(base_cfg, **extra))
                if all_options:   # the options timed slower on the H100 and the H200
                    # (gqsa_tune_{544c0a0,7364f16}.md, gqsa_tune_b226bd5.md): x as given (no
                    # wrapper launch, strided reads of x), x's copy in bfloat16, 2^23's pattern
                    # from the group indices, several chunks of rows per program
                    for extra in (dict(raw_x=True), dict(bf16_x=True),
                                  dict(bf16_x=True, runtime_magic=True),
                                  dict(bf16_x=True, code_zeros=True), dict(index_magic=True),
                                  dict(index_magic=True, code_zeros=True)):
                        try_cfg(dataclasses.replace(base_cfg, **extra))
                    if b.row_blocks > 0 and best[1].row_aligned:
                        for loop in (4, 16):
                            try_cfg(dataclasses.replace(best[1], row_loop=loop))
            t, cfg, f = best
            confirm = None
            if searched and confirm_rounds:
                # the search's single timings of near-identical settings spread by up to 2x
                # on small products (gqsa_tune_5a44a83.json, H200): the best few settings,
                # the rules' tiles and dense W4 timed again, interleaved, and the best is the
                # lowest median of those rounds
                t, cfg, f, confirm = confirm_best(T, sets, tried, make_f, default, dense_case,
                                                  confirm_rounds)
                t_default = confirm["rules_us"] / 1e6
            block_list = None
            if b.row_blocks > 0 and searched:   # the same tiles on the block-list schedule
                # (partials added by a second launch): what whole-row programs save
                n_tried = len(tried)
                try_cfg(dataclasses.replace(cfg, row_aligned=False))
                block_list = tried[n_tried].get("us")
                if confirm is None:
                    t, cfg, f = best
            add(f"w4g128s{round(100 * s)}", t, b.nbytes, rel_err(jax.jit(f)(x, b), want),
                config=dataclasses.asdict(cfg), default_us=t_default * 1e6, tried=tried,
                density=b.density, block_list_us=block_list, confirm=confirm)
            if table and searched and t < t_default:   # (confirmed medians when confirming)
                tuning.write_entries(table, "bsr_quant_matmul", [dict(
                    device=kc.device_kind(),
                    key=bsr_tuning_key(M, K, N, 4, 128, b.row_blocks),
                    config=dataclasses.asdict(cfg), us=round(t * 1e6, 2),
                    rules_us=round(t_default * 1e6, 2),
                    source=f"experiments/gqsa_eval.py --part speed, commit {source_commit()}")])
            if searched and b.row_blocks > 0:   # the batch-1 serving layout (packed arrays)
                for order, x_dtype in (("stream", None), ("shift_major", None),
                                       ("shift_major", "float32")):
                    packed_row(add, T, sets, want, rel_err, M, K, N, s, cfg, dense_case,
                               confirm_rounds, table, order, x_dtype)
            if M > 1:              # what the engine runs at 2-64 rows: the kept codes repacked
                # into the dense layout on the device, then the dense W4 kernel
                f = lambda x, b: sparse.bsr_matmul(x, b, impl="repack")  # noqa: E731
                add(f"w4g128s{round(100 * s)} repack", T(f, sets), b.nbytes,
                    rel_err(jax.jit(f)(x, b), want))
                if b.row_blocks > 0:   # the same route with the gather repack

                    def f(x, b):
                        qw, sc, z = sparse.bsr.repacked_dense(b, method="gather")
                        return quant_matmul(x, qw, sc, z, bits=4, group_size=128,
                                            interpret=kc.backend() == "cpu")

                    add(f"w4g128s{round(100 * s)} repack (gather)", T(f, sets), b.nbytes,
                        rel_err(jax.jit(f)(x, b), want))
                # the block-map kernel: the kept blocks read in place on the dense kernel's
                # tensor-core tiles (no repacked layout written): its default tiles, then a
                # few others
                gathered_row(add, T, sets, want, rel_err, M, K, N, s)
            if group_major:
                group_major_row(add, T, sets, want, rel_err, N, K, s)
            del sets


def packed_table_path(table: str) -> str:
    """The packed layout's tuning table beside the four-array one at `table`."""
    return os.path.join(os.path.dirname(os.path.abspath(table)), f"{PACKED_KERNEL}.json")


def packed_row(add, T, sets, want, rel_err, M: int, K: int, N: int, s: float, best_cfg,
               dense_case, confirm_rounds: int, table: Optional[str],
               code_order: str = "stream", x_dtype: Optional[str] = None) -> None:
    """The same layers packed into one array each (``sparse.to_packed_bsr`` with
    ``code_order``), on ``bsr_quant_matmul_packed``: its default tiles
    (``BSRMatmulConfig.for_packed``), the four-array search's best tiles, and 12
    blocks-per-program and warp settings, each with ``code_zeros`` (stream codes) or ``raw_x``
    (shift-major codes: x read as given); the best (confirmed in interleaved rounds with
    `confirm_rounds`) is one row (``packed``, or ``packed sm`` for shift-major codes, ``packed
    sm f32`` with ``x_dtype="float32"``: x handed to the kernel in float32, as a model does,
    the cast not timed since a model fuses it into x's producer), and with `table` it goes
    into the packed tuning table (:func:`packed_table_path`) when it beats the default tiles."""
    psets = [(x if x_dtype is None else x.astype(x_dtype),
              sparse.to_packed_bsr(b, code_order=code_order, x_dtype=x_dtype)) for x, b in sets]
    p0 = psets[0][1]
    default = BSRMatmulConfig.for_packed("cuda", M, p0.nnz, K=K, N=N, row_blocks=p0.row_blocks,
                                         device=kc.device_kind(), code_order=code_order,
                                         x_dtype=x_dtype)
    how = (dict(code_zeros=True) if code_order == "stream"
           else dict(raw_x=True, code_zeros=False, index_magic=False, runtime_magic=False))

    def make_f(cfg):
        return lambda x, p, cfg=cfg: bsr_quant_matmul_packed(
            x, p.packed, nnz=p.nnz, scale_dtype=p.scale_dtype, out_features=N, bits=4,
            group_size=128, row_blocks=p.row_blocks, code_order=code_order, config=cfg,
            interpret=kc.backend() == "cpu")

    candidates = [default, dataclasses.replace(best_cfg, **how)] + [
        BSRMatmulConfig(block_t=bt, block_m=default.block_m, num_warps=nw, num_stages=2, **how)
        for bt in (32, 64, 128, 256) for nw in (2, 4, 8)]
    candidates = list(dict.fromkeys(candidates))       # distinct, in order
    tried, best = [], None
    for cfg in candidates:
        t = time_config(T, make_f(cfg), psets, cfg, tried)
        if t is not None and (best is None or t < best[0]):
            best = (t, cfg, make_f(cfg))
    if best is None:
        print(f"packed s{round(100 * s)}: every config failed: {tried}", flush=True)
        return
    t, cfg, f = best
    t_default = tried[0].get("us", float("nan")) / 1e6
    confirm = None
    if confirm_rounds:
        t, cfg, f, confirm = confirm_best(T, psets, tried, make_f, default, dense_case,
                                          confirm_rounds)
        t_default = confirm["rules_us"] / 1e6
    x = psets[0][0]
    label = ("packed" if code_order == "stream"
             else "packed sm" + (" f32" if x_dtype == "float32" else ""))
    add(f"w4g128s{round(100 * s)} {label}", t, p0.nbytes, rel_err(jax.jit(f)(x, p0), want),
        config=dataclasses.asdict(cfg), default_us=t_default * 1e6, tried=tried,
        confirm=confirm)
    if table and t < t_default:
        tuning.write_entries(packed_table_path(table), PACKED_KERNEL, [dict(
            device=kc.device_kind(),
            key=dict(bsr_tuning_key(M, K, N, 4, 128, p0.row_blocks),
                     **({} if code_order == "stream" else dict(code_order=code_order)),
                     **({} if x_dtype is None else dict(x_dtype=x_dtype))),
            config=dataclasses.asdict(cfg), us=round(t * 1e6, 2),
            default_us=round(t_default * 1e6, 2),
            source=f"experiments/gqsa_eval.py --part speed, commit {source_commit()}")])


def gathered_row(add, T, sets, want, rel_err, M: int, K: int, N: int, s: float) -> None:
    """Time ``bsr_gather_quant_matmul`` on its default tiles and on wider/narrower feature
    tiles, more warps and twice the group splits; add the best as one row with every tried
    setting (``tried``)."""
    default = BSRGatherConfig.for_shape("cuda", M, K // 128, N)
    candidates = [default] + [dataclasses.replace(default, block_n=bn, num_warps=nw)
                              for bn, nw in ((128, 4), (128, 8), (32, 4))]
    tried, best = [], None
    for cfg in candidates + [None]:
        if cfg is None:    # twice the splits on the best tiles so far
            if best is None:
                break
            cfg = dataclasses.replace(best[1], split_k=2 * best[1].split_k)

        def f(x, b, cfg=cfg):
            return bsr_gather_quant_matmul(x, b.codes, b.scales, b.zeros, b.col_idx, b.row_ids,
                                           out_features=N, bits=4, group_size=128, config=cfg)
        t = time_config(T, f, sets, cfg, tried)
        if t is None:
            continue
        if best is None or t < best[0]:
            best = (t, cfg, f)
    if best is None:
        return
    t, cfg, f = best
    x, b = sets[0]
    add(f"w4g128s{round(100 * s)} gathered", t, b.nbytes, rel_err(jax.jit(f)(x, b), want),
        config=dataclasses.asdict(cfg), tried=tried)


def group_major_row(add, T, sets, want, rel_err, N: int, K: int, s: float) -> None:
    """The same BSR weights in group-major order (``pallas_kernels.bsr_gm_quant_matmul``):
    the best of a few blocks-per-program and warp counts, on registers and as tensor-core
    products (``mma``); the reordering is not timed (it runs once per layer, on the host)."""
    best, tried = None, []
    for bt in (32, 64, 128):
        gm_sets = [(x, group_major_blocks(b.codes, b.scales, b.zeros, b.col_idx, b.row_ids,
                                          out_features=N, groups=K // 128, block_t=bt))
                   for x, b in sets]
        for nw, mma in itertools.product((4, 8), (False, True)):
            cfg = GroupMajorConfig(block_m=GroupMajorConfig.for_shape("cuda", sets[0][0].shape[0])
                                   .block_m, num_warps=nw, num_stages=2, mma=mma)
            f = lambda x, g, cfg=cfg: bsr_gm_quant_matmul(x, g, out_features=N, bits=4,
                                                          group_size=128, config=cfg)
            t = time_config(T, f, gm_sets, cfg, tried, block_t=bt)
            if t is None:
                continue
            if best is None or t < best[0]:
                best = (t, bt, cfg, f, gm_sets[0])
        del gm_sets
    if best is None:
        print(f"group-major s{round(100 * s)}: every config failed: {tried}", flush=True)
        return
    t, bt, cfg, f, (x, g) = best
    nbytes = sum(int(a.nbytes) for a in g)
    add(f"w4g128s{round(100 * s)} group-major", t, nbytes, rel_err(jax.jit(f)(x, g), want),
        config=dict(dataclasses.asdict(cfg), block_t=bt), tried=tried)


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# GQSA: group-sparse W4 (BSR) against dense quantization", "",
             f"Device {m['device']}, jax {m['jax']}, commit {m['commit']}. Copy ceiling "
             f"{m['ceiling'] / 1e9:,.0f} GB/s. µs per product with weights rotated past the L2 "
             "cache; sNN = NN% of each row's groups removed, kept groups in BSR form; "
             "× dense W4 = time relative to dense W4 g128 (target for s50: ≤ 0.65). Block "
             "list: the same tiles with partials added by a second launch instead of whole-row "
             "programs; `repack`: the kept codes scattered into the dense layout on the device, "
             "then the dense W4 kernel (the engine's route at 2-64 rows); `gathered`: the "
             "kept blocks read in place through a block map on the dense kernel's "
             "tensor-core tiles (`bsr_gather_quant_matmul`). Interleaved: with "
             "`--confirm-rounds`, the best settings, the rules' tiles and dense W4 timed again "
             "in alternating rounds; the BSR row's µs is then the lowest of those medians, "
             "and the ratio is over dense W4's median in the same rounds.", "",
             "| shape | M | format | weight MiB | µs | % ceiling | × bf16 speed | × dense W4 "
             "time | × dense W4, interleaved | block list µs | rel err |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["speed"]:
        v, bl = r["time_vs_dense_w4"], r.get("block_list_us")
        c = r.get("confirm")
        vi = "" if not c else f"{c['time_vs_dense_w4']:.2f} ({c['dense_w4_median_us']:.1f} µs)"
        lines.append(f"| {r['shape']} | {r['M']} | {r['format']} | "
                     f"{r['weight_bytes'] / 2 ** 20:.1f} | {r['us']:.1f} | "
                     f"{r['pct_ceiling']:.0f}% | {r['speedup_vs_bf16']:.2f} | "
                     f"{'' if v is None else format(v, '.2f')} | {vi} | "
                     f"{'' if bl is None else format(bl, '.1f')} | "
                     f"{'' if r['rel_error'] is None else format(r['rel_error'], '.1e')} |")
    return "\n".join(lines) + "\n"
