"""Pallas (Triton-lowering) attention kernels for optgqa-jax.

Every kernel module holds the kernel, a jitted wrapper that validates its
inputs, and a pure-jnp reference beside it. The kernels target Pallas' Triton
lowering so that they run on JAX's CUDA and ROCm backends alike.
"""

from pallas_kernels.alibi import alibi_slopes, alibi_slopes_np

__all__ = ["alibi_slopes", "alibi_slopes_np"]
