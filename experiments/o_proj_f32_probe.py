"""The o projection as a float32-out dot in large steps: does XLA's choice of GEMM improve?

In traces of the engine's mixed steps (4,096 tokens) on an H100 the o projection ``[T, 4096] @
[4096, 4096]`` ran on cuBLAS's ``128x256 ... NNN`` algorithm at about 290 µs per call, while
the same product timed alone takes about 180 µs (``results/h100/step_gemms_5b427eb/``). XLA
fuses a dot whose float32 result is then rounded (``jnp.dot(..., preferred_element_type=f32)
.astype(bf16)``) as a Triton GEMM instead of a cuBLAS call; numerically the two agree (cuBLAS
also accumulates bfloat16 products in float32 and rounds once).

This script runs another experiment script with the model's products of a ``[4096, 4096]``
weight at ``--min-rows`` rows or more (only the o projection of the Llama-3-8B shape) written
that way, by handing ``optgqa_jax.model`` a ``jax.numpy`` whose ``dot`` does so; every other
product is unchanged. Without ``--patch`` it runs the script as it is, for the same-call
baseline. ``iso`` times the o product alone at 1,024, 2,048 and 4,096 rows both ways
(and with the residual add), with ``product_probe``'s variants.

Usage (one NVIDIA GPU)::

    python experiments/o_proj_f32_probe.py iso
    python experiments/o_proj_f32_probe.py [--patch] mixed  -- <profile_mixed.py arguments>
    python experiments/o_proj_f32_probe.py [--patch] engine -- <bench_engine.py arguments>
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import optgqa_jax.model as model  # noqa: E402

SCRIPTS = {"mixed": "profile_mixed.py", "engine": "bench_engine.py",
           "decode": "profile_decode.py"}


class F32OutNumpy:
    """``jax.numpy`` with ``dot(a, b)`` of a ``weight_shape`` weight at ``min_rows`` rows or
    more computed as a float32-out dot rounded to ``a``'s dtype; everything else unchanged."""

    def __init__(self, weight_shape=(4096, 4096), min_rows: int = 1024):
        self.weight_shape, self.min_rows = tuple(weight_shape), min_rows

    def __getattr__(self, name):
        return getattr(jnp, name)

    def applies(self, a, b) -> bool:
        return (b.ndim == 2 and tuple(b.shape) == self.weight_shape and a.ndim >= 1
                and a.shape[-1] == b.shape[0] and a.size // max(a.shape[-1], 1) >= self.min_rows)

    def dot(self, a, b, **kw):
        if not kw and self.applies(a, b):
            return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
        return jnp.dot(a, b, **kw)


def patch_model(min_rows: int = 1024) -> None:
    """Route ``optgqa_jax.model``'s products through :class:`F32OutNumpy`."""
    model.jnp = F32OutNumpy(min_rows=min_rows)


def time_isolated() -> None:
    """The o product alone at 1,024-4,096 rows in the model's form, as a float32-out dot and
    with the residual add (``product_probe``'s ``kn``, ``kn/f32`` and ``kn+res``)."""
    sys.path.insert(0, HERE)
    import product_probe
    from optgqa_jax import timing
    for rows in (1024, 2048, 4096):
        for variant in ("kn", "kn/f32", "kn+res"):
            sets = product_probe.arg_sets(rows, 4096, 4096, variant, 4, seed=rows)
            t = timing.timeit_rotating(
                lambda *args, v=variant: product_probe.product(v, *args), sets)
            print(f"o rows={rows} {variant}: {t * 1e6:.1f} us, "
                  f"{2 * rows * 4096 * 4096 / t / 1e12:.0f} TFLOP/s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["iso", *SCRIPTS])
    p.add_argument("--patch", action="store_true", help="the float32-out o product")
    p.add_argument("--min-rows", type=int, default=1024)
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="the script's own arguments (this script's options go before WHAT)")
    a = p.parse_args(argv)
    if a.min_rows < 1:
        p.error(f"--min-rows must be >= 1, got {a.min_rows}")
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    if a.what == "iso":
        if rest:
            p.error(f"iso takes no script arguments, got {rest}")
        time_isolated()
        return
    if a.patch:
        patch_model(a.min_rows)
    script = os.path.join(HERE, SCRIPTS[a.what])
    print(("float32-out o product" if a.patch else "unchanged model"), script, rest, flush=True)
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
