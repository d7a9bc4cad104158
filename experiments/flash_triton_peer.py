"""A causal flash-attention forward written in Triton itself: the peer that says how close
Triton-generated code comes to cuDNN, the bar of issue 13's item 4.

``pallas_kernels.flash_attention`` runs at 0.80-0.83x cuDNN's speed on an H100 (B=4 T=4096,
GQA 32/8 and MHA, D=128; ``experiments/results/h100/rerun_5035b23/``). Pallas' Triton
lowering hands XLA a Triton module, and XLA's bundled Triton compiles it; whether the gap is
the lowering's or Triton's own is what this peer separates. The kernel below is the same
algorithm as ours (FlashAttention-2's forward: one program per ``block_m`` queries of one
head, scores in base 2, a running max and sum, the blocks below the diagonal unmasked and the
diagonal ones masked), written against ``triton.language`` with nothing Pallas cannot
express, so that it meets Triton's compiler directly; ``--descriptors`` loads K and V
through tensor descriptors (TMA on Hopper), which Pallas' Triton lowering does not emit.

Two modes:

* on a GPU (``torch`` and ``triton`` installed): correctness against float32 attention for
  one batch row, then µs and TFLOP/s of the Triton kernel's configurations, of PyTorch's
  SDPA backends (cuDNN, flash), of JAX's cuDNN and of ``pallas_kernels.flash_attention``,
  in interleaved rounds; the ratio of each to JAX's cuDNN.
* ``--sass-only`` (no GPU: a Python with the ``triton`` package, ``--triton-python``): the
  kernel compiled for sm_90 and its SASS counted (wgmma, barriers, registers), beside the
  Pallas kernel's (its Triton module captured from the lowering, ``experiments/triton_ir``).

Axis legend: B batch, H query heads, Hk KV heads, T tokens, D head dim.

Usage:
  python experiments/flash_triton_peer.py --out DIR [--rounds 3]
  python experiments/flash_triton_peer.py --sass-only --triton-python PY --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

# (B, T, H, Hk, D): issue 13's two shapes
SHAPES = ((4, 4096, 32, 8, 128), (4, 4096, 32, 32, 128))
# (block_m, block_n, num_warps, num_stages, heavy_first, descriptors, warp_specialize); the
# first is the tile pallas_kernels.flash_attention uses for GQA at D = 128
CONFIGS = ((256, 64, 8, 3, True, False, False), (128, 64, 4, 3, True, False, False),
           (128, 64, 8, 3, True, False, False), (128, 128, 8, 2, True, False, False),
           (128, 64, 8, 3, False, False, False), (128, 64, 8, 3, True, True, False),
           (128, 128, 8, 2, True, True, False), (256, 64, 8, 3, True, True, False),
           (128, 64, 8, 3, True, True, True))
RTOL = 2e-2      # max error over the output's scale, bfloat16 inputs and output


def _pallas_configs():
    """pallas_kernels.flash_attention tiles timed beside its default (256 x 64, 8 warps, 3
    stages at D = 128 on CUDA; timed again here under its tile name): 128-query tiles with
    and without ``prefetch_scores`` (the next tile's scores under this tile's softmax),
    256-query tiles with fewer stages or 32-key tiles, and the default's tiles launched with
    the q-blocks varying fastest (``q_blocks_fastest``)."""
    from pallas_kernels.flash_attention import FlashAttentionConfig
    q128 = [FlashAttentionConfig(block_q=128, block_k=bk, num_warps=8, num_stages=st,
                                 heavy_first=True, prefetch_scores=pf)
            for bk, st in ((64, 3), (128, 2)) for pf in (False, True)]
    q256 = [FlashAttentionConfig(block_q=256, block_k=bk, num_warps=8, num_stages=st,
                                 heavy_first=True) for bk, st in ((64, 3), (64, 2), (32, 3))]
    # the default's tiles with the q-blocks varying fastest in the launch order (the native
    # kernel's order), heaviest first within each head
    qfast = [FlashAttentionConfig(block_q=256, block_k=64, num_warps=8, num_stages=3,
                                  heavy_first=True, q_blocks_fastest=True)]
    return q128 + q256 + qfast


def pallas_name(c) -> str:
    return (f"optgqa pallas {c.block_q}x{c.block_k} w{c.num_warps} s{c.num_stages}"
            f"{' heavy' if c.heavy_first else ''}{' prefetch' if c.prefetch_scores else ''}"
            f"{' qfast' if c.q_blocks_fastest else ''}")


def config_name(c) -> str:
    bm, bn, w, st, heavy, desc, ws = c
    return (f"triton {bm}x{bn} w{w} s{st}{' heavy' if heavy else ''}"
            f"{' tma' if desc else ''}{' ws' if ws else ''}")


def causal_flops(B, T, H, D) -> float:
    """Two products of 2 T^2 D flops per head, half of each under the causal mask."""
    return 2.0 * B * H * T * T * D


# ----------------------------------------------------------------------------- SASS (CPU)
_COMPILE_NATIVE = r"""
import collections, json, os, re, subprocess, sys
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
import triton.backends.nvidia as nv
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flash_triton_kernel import flash_fwd, signature
H, GROUP, D, bm, bn, w, st, heavy, desc, ws, path = json.loads(sys.argv[2])
# pointers and T 16-divisible, as Triton's launcher specializes them at run time
attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
src = ASTSource(flash_fwd, signature(), constexprs=dict(
    H=H, GROUP=GROUP, D=D, BLOCK_M=bm, BLOCK_N=bn, HEAVY_FIRST=heavy, DESC=desc, WARP_SPEC=ws), attrs=attrs)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=w,
                                                                        num_stages=st))
open(path, "wb").write(k.asm["cubin"])
tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
out = {flag: subprocess.run([tool, flag, path], capture_output=True, text=True).stdout
       for flag in ("-sass", "-res-usage")}
print(json.dumps(dict(sass=out["-sass"], res=out["-res-usage"], shared=k.metadata.shared,
                      triton=triton.__version__)))
"""

SASS_OPS = ("HGMMA", "WARPGROUP", "BAR", "SYNCS", "UTMALDG", "LDGSTS", "LDG", "STS", "LDS",
            "LDSM", "MUFU", "FFMA", "FMUL")


def sass_row(name: str, sass: str, res: str, shared) -> dict:
    from triton_ir import sass_op_counts
    ops = sass_op_counts(sass)
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    row = dict(name=name, sass=sum(ops.values()), registers=int(reg.group(1)) if reg else None,
               stack_bytes=int(stack.group(1)) if stack else None, shared_bytes=shared)
    row.update({op: ops.get(op, 0) for op in SASS_OPS})
    row["first_loop"] = first_loop_sequence(sass)
    return row


def first_loop_sequence(sass: str) -> str:
    """The order of the first loop's tensor-core products (HGMMA), waits for them
    (WARPGROUP.DEPBAR) and exponentials (MUFU), runs counted: e.g. ``HGMMA x8, DEPBAR x1,
    MUFU x34`` waits for the scores before any exponential; HGMMA runs between MUFU runs
    before the wait mean a product in flight under the exponentials."""
    from ptx_mix import sass_instructions, sass_loops
    loops = sass_loops(sass)
    if not loops:
        return ""
    lo, hi = loops[0]["start"], loops[0]["end"]
    seq = []
    for addr, op, _ in sass_instructions(sass):
        key = ("DEPBAR" if op.startswith("WARPGROUP.DEPBAR") else
               op.split(".")[0] if op.startswith(("HGMMA", "MUFU")) else None)
        if key is None or not lo <= addr <= hi:
            continue
        if seq and seq[-1][0] == key:
            seq[-1][1] += 1
        else:
            seq.append([key, 1])
    return ", ".join(f"{k} x{n}" for k, n in seq)


def sass_main(a) -> list:
    """Both kernels compiled for sm_90 without a GPU; one SASS row each."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.flash_attention import FlashAttentionConfig, flash_attention
    from triton_ir import capture_ttir, compile_ttir
    rows = []
    B, T, H, Hk, D = 1, 4096, 32, 8, 128
    tmp = tempfile.mkdtemp()
    cfg = FlashAttentionConfig.for_backend("cuda", D, Hk)
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, Hk, D), jnp.bfloat16)
    for c in [cfg] + _pallas_configs():
        name = pallas_name(c).replace("optgqa pallas", "pallas_kernels.flash_attention")
        try:
            path = os.path.join(tmp, "pallas_flash.ttir")
            with open(path, "w") as f:
                f.write(capture_ttir(lambda q, k, v, c=c: flash_attention(q, k, v, causal=True,
                                                                           config=c),
                                     q, kv, kv)[0])
            out = compile_ttir(path, c.num_warps, c.num_stages, a.triton_python)
            # the dynamic shared memory a block asks for, as for the native kernel's rows
            rows.append(sass_row(name, out["sass"], out["res"], out["shared"]))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(name=name, error=str(e)[:300]))
    for c in CONFIGS:
        bm, bn, w, st, heavy, desc, ws = c
        args = json.dumps([H, H // Hk, D, bm, bn, w, st, heavy, desc, ws,
                           os.path.join(tmp, "native.cubin")])
        run = subprocess.run([a.triton_python, "-c", _COMPILE_NATIVE, HERE, args],
                             capture_output=True, text=True)
        if run.returncode:
            rows.append(dict(name=config_name(c), error=run.stderr.strip()[-300:]))
            continue
        got = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append(sass_row(config_name(c), got["sass"], got["res"], got["shared"]))
        rows[-1]["triton"] = got["triton"]
    return rows


# ----------------------------------------------------------------------------- GPU
def torch_timeit(fn, iters: int = 20, trials: int = 5) -> float:
    """Median seconds per call of ``fn()`` over `trials` batches of `iters` calls, after a
    warm-up call, waiting for the device at the end of each batch (``timing.timeit``'s
    method, for PyTorch launches)."""
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def reference_row0(q, k, v):
    """float32 causal attention of batch row 0, [H, T, D] (torch, on the GPU)."""
    import torch
    H, Hk = q.shape[1], k.shape[1]
    q0 = q[0].float()
    k0 = k[0].float().repeat_interleave(H // Hk, 0)
    v0 = v[0].float().repeat_interleave(H // Hk, 0)
    out = []
    for h in range(0, H, 8):     # 8 heads at a time: [8, T, T] float32 scores
        s = q0[h:h + 8] @ k0[h:h + 8].transpose(1, 2) / math.sqrt(q.shape[-1])
        T = s.shape[-1]
        s.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1),
                       float("-inf"))
        out.append(torch.softmax(s, -1) @ v0[h:h + 8])
    return torch.cat(out)


def rel_error(got, want) -> float:
    import torch
    got = got.float()
    if not torch.isfinite(got).all():
        return float("nan")
    return float((got - want).abs().max() / want.abs().max())


def gpu_main(a) -> tuple[list, dict]:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU
    import jax
    import jax.numpy as jnp
    import torch
    import triton
    from flash_triton_kernel import flash_fwd
    from optgqa_jax.timing import interleaved_rounds, timeit
    from pallas_kernels import compiler_options
    from pallas_kernels.flash_attention import flash_attention
    PALLAS_CONFIGS = _pallas_configs()

    try:   # global scratch for the tensor descriptors
        triton.set_allocator(lambda size, align, stream: torch.empty(
            size, dtype=torch.int8, device="cuda"))
    except AttributeError:
        pass
    meta = dict(device=torch.cuda.get_device_name(), jax=jax.__version__,
                torch=torch.__version__, triton=triton.__version__)
    rows = []
    for B, T, H, Hk, D in SHAPES:
        shape = f"B={B} T={T} N={H} K={Hk} D={D}"
        g = torch.Generator(device="cuda").manual_seed(a.seed)
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, Hk, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, Hk, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = reference_row0(q, k, v)                                     # [H, T, D]
        # JAX's copies in its layout [B, T, heads, D] (the same values)
        to_jax = lambda t: jnp.asarray(t.transpose(1, 2).float().cpu().numpy(),  # noqa: E731
                                       jnp.bfloat16)
        jq, jk, jv = to_jax(q), to_jax(k), to_jax(v)
        flops = causal_flops(B, T, H, D)
        scale = 1.0 / math.sqrt(D) * math.log2(math.e)
        timers, errors, notes = {}, {}, {}

        for c in CONFIGS:
            o = torch.empty_like(q)

            def launch(c=c, o=o):
                bm, bn, w, st, heavy, desc, ws = c
                flash_fwd[(T // bm, B * H)](q, k, v, o, T, scale, H=H, GROUP=H // Hk, D=D,
                                            BLOCK_M=bm, BLOCK_N=bn, HEAVY_FIRST=heavy,
                                            DESC=desc, WARP_SPEC=ws, num_warps=w,
                                            num_stages=st)
                return o
            name = config_name(c)
            try:
                launch()
                torch.cuda.synchronize()
                errors[name] = rel_error(o[0], ref)
                timers[name] = lambda f=launch: torch_timeit(f)
            except Exception as e:  # noqa: BLE001
                notes[name] = f"failed: {type(e).__name__}: {str(e)[:160]}"

        kr = k.repeat_interleave(H // Hk, 1)
        vr = v.repeat_interleave(H // Hk, 1)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backends = (("torch sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                        ("torch sdpa flash", SDPBackend.FLASH_ATTENTION))
        except (ImportError, AttributeError) as e:   # an older PyTorch
            backends = ()
            notes["torch sdpa"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        for label, backend in backends:
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, kr, vr, is_causal=True)
            try:
                errors[label] = rel_error(sdpa()[0], ref)
                timers[label] = lambda f=sdpa: torch_timeit(f)
                notes[label] = "K/V repeated to MHA"
            except Exception as e:  # noqa: BLE001
                notes[label] = f"failed: {type(e).__name__}: {str(e)[:160]}"

        want = ref.transpose(0, 1)                                        # [T, H, D]
        jax_fns = {
            "jax cudnn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn")),
            "optgqa pallas": jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True),
                                     compiler_options=compiler_options("cuda")),
        }
        for c in PALLAS_CONFIGS:   # other tiles, prefetch_scores on and off
            jax_fns[pallas_name(c)] = jax.jit(
                lambda q, k, v, c=c: flash_attention(q, k, v, causal=True, config=c),
                compiler_options=compiler_options("cuda"))
        for label, fn in jax_fns.items():
            try:
                out = torch.from_numpy(np.asarray(fn(jq, jk, jv)[0], np.float32)).cuda()
                errors[label] = rel_error(out, want)
                timers[label] = lambda fn=fn: timeit(fn, jq, jk, jv)
            except Exception as e:  # noqa: BLE001
                notes[label] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        for label in jax_fns:
            if label != "jax cudnn":
                notes.setdefault(label, "jit with pallas_kernels.compiler_options()")

        times = interleaved_rounds(timers, a.rounds)
        base = float(np.median(times["jax cudnn"])) if "jax cudnn" in times else None
        for label in list(timers) + [n for n in notes if n not in timers]:
            t = float(np.median(times[label])) if label in times else None
            err = errors.get(label)
            ok = err is not None and np.isfinite(err) and err <= RTOL
            rows.append(dict(shape=shape, impl=label, ms=None if t is None else t * 1e3,
                             tflops=None if t is None else flops / t / 1e12,
                             x_cudnn=None if (t is None or base is None) else base / t,
                             rel_error=err, ok=bool(ok), note=notes.get(label, ""),
                             rounds_ms=[x * 1e3 for x in times.get(label, [])]))
        timers = q = k = v = kr = vr = ref = None   # free the GPU memory before the next shape
        torch.cuda.empty_cache()
    return rows, meta


# ----------------------------------------------------------------------------- report
def write(rows, meta, a, name: str) -> None:
    from optgqa_jax.timing import source_commit
    meta = dict(meta, commit=source_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                 time.gmtime()))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, name + ".json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# {'Flash attention: a native Triton kernel against cuDNN' if not a.sass_only else 'Flash attention: sm_90 SASS of the Pallas kernel and a native Triton one'}", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in meta.items()) + ".")
    lines.append("")
    if a.sass_only:
        lines.append("Static SASS instruction counts by opcode (not times), sm_90, causal, "
                     "bfloat16, GQA 32/8, head dim 128; registers and spilled (stack) bytes "
                     "per thread from cuobjdump; shared bytes: Triton's allocation for the "
                     "native kernel, the static part only for the Pallas one. first_loop: the "
                     "order of products (HGMMA), waits for them (DEPBAR) and exponentials "
                     "(MUFU) in the first (unmasked) loop.")
        lines.append("")
        cols = (["name", "sass", "registers", "stack_bytes", "shared_bytes"] + list(SASS_OPS)
                + ["first_loop"])
    else:
        lines.append(f"Median of {a.rounds} interleaved rounds; `x cuDNN` is JAX's cuDNN "
                     f"time over the row's (above 1: faster). Error: max |out - float32 "
                     f"reference| over the reference's max, batch row 0 (passes at <= {RTOL}).")
        lines.append("")
        cols = ["shape", "impl", "ms", "tflops", "x_cudnn", "rel_error", "ok", "note"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + " --- |" * len(cols))
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        cells = []
        for c in cols:
            x = r.get(c)
            cells.append(f"{x:.3g}" if isinstance(x, float) and c == "rel_error" else
                         f"{x:.3f}" if isinstance(x, float) and c in ("ms", "x_cudnn") else
                         f"{x:.0f}" if isinstance(x, float) else "" if x is None else str(x))
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(a.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "latest"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sass-only", action="store_true",
                   help="no GPU: compile both kernels for sm_90 and count their SASS")
    p.add_argument("--triton-python", default=sys.executable,
                   help="with --sass-only: a Python with the triton package")
    a = p.parse_args(argv)
    if a.sass_only:
        write(sass_main(a), {}, a, "flash_triton_sass")
    else:
        rows, meta = gpu_main(a)
        write(rows, meta, a, "flash_triton_peer")


if __name__ == "__main__":
    main()
