"""Pallas (Triton-lowering) kernels for optgqa-jax: attention and quantized matmul.

Every kernel module holds the kernel, a jitted wrapper that validates its
inputs, a frozen tuning-config dataclass with per-backend defaults, and a
pure-jnp reference beside it. The kernels use only Pallas' Triton lowering
(explicit ``triton.CompilerParams``), so they run on JAX's CUDA and ROCm
backends alike; on CPU pass ``interpret=True``.

* :func:`paged_attention` — decode over a paged KV cache (GQA sharing, split-K, ALiBi).
* :func:`flash_attention` — dense causal prefill / training forward (GQA, ALiBi).
* :func:`paged_prefill_attention` — ragged packed prefill over a paged cache.
* :func:`quant_matmul` — ``x @ dequant(W)`` for 2/4/8-bit GPTQ-packed weights.
* :func:`bsr_quant_matmul` — the same for group-sparse (GQSA, BSR-stored) weights, blocks in
  row-major order; :func:`bsr_gm_quant_matmul` — over blocks reordered by group
  (:func:`group_major_blocks`), x read once per program; :func:`bsr_gather_quant_matmul` —
  a few rows of x on the dense kernel's tensor-core tiles, the kept blocks read through a
  dense block map (batched decode); :func:`row_block_quant_matmul` — group-sparse weights whose
  blocks of output features share one mask, on the dense kernel's tiles.
* :func:`alibi_slopes` — per-head ALiBi slopes.
* :func:`compiler_options` — XLA options for the ``jax.jit`` that calls the kernels
  (on CUDA: flush float32 denormals, a few percent faster).
* :mod:`pallas_kernels.tuning` — tables of tiles measured on one device kind, looked up by
  shape (``QuantMatmulConfig.for_shape`` reads them; ``OPTGQA_TUNING`` adds or disables them).
"""

from pallas_kernels._common import compiler_options

from pallas_kernels.alibi import alibi_slopes, alibi_slopes_np
from pallas_kernels.flash_attention import (FlashAttentionConfig, flash_attention,
                                            flash_attention_reference)
from pallas_kernels.paged_attention import (PagedAttentionConfig, paged_attention,
                                            paged_attention_reference)
from pallas_kernels.paged_prefill_attention import (PagedPrefillConfig, paged_prefill_attention,
                                                    paged_prefill_attention_reference)
from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul, quant_matmul_reference
from pallas_kernels.bsr_quant_matmul import (BSRMatmulConfig, bsr_quant_matmul,
                                             bsr_quant_matmul_reference)
from pallas_kernels.bsr_gm_quant_matmul import (GroupMajorBlocks, GroupMajorConfig,
                                                bsr_gm_quant_matmul, group_major_blocks)
from pallas_kernels.bsr_gather_quant_matmul import (BSRGatherConfig, bsr_gather_quant_matmul,
                                                    bsr_gather_quant_matmul_reference)
from pallas_kernels.row_block_quant_matmul import (row_block_quant_matmul,
                                                   row_block_quant_matmul_reference)
from pallas_kernels.kv_write import KVWriteConfig, kv_write, kv_write_reference
from pallas_kernels.rope_kv_write import (RopeKVWriteConfig, rope_kv_write,
                                          rope_kv_write_reference)
from pallas_kernels.add_rms_norm import AddRMSNormConfig, add_rms_norm, add_rms_norm_reference

__all__ = [
    "alibi_slopes", "alibi_slopes_np", "compiler_options",
    "FlashAttentionConfig", "flash_attention", "flash_attention_reference",
    "PagedAttentionConfig", "paged_attention", "paged_attention_reference",
    "PagedPrefillConfig", "paged_prefill_attention", "paged_prefill_attention_reference",
    "QuantMatmulConfig", "quant_matmul", "quant_matmul_reference",
    "BSRMatmulConfig", "bsr_quant_matmul", "bsr_quant_matmul_reference",
    "GroupMajorBlocks", "GroupMajorConfig", "bsr_gm_quant_matmul", "group_major_blocks",
    "BSRGatherConfig", "bsr_gather_quant_matmul", "bsr_gather_quant_matmul_reference",
    "row_block_quant_matmul", "row_block_quant_matmul_reference",
    "KVWriteConfig", "kv_write", "kv_write_reference",
    "RopeKVWriteConfig", "rope_kv_write", "rope_kv_write_reference",
    "AddRMSNormConfig", "add_rms_norm", "add_rms_norm_reference",
]
