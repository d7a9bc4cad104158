"""GQSA group sparsity: prune whole quantization groups, quantize the rest, store them as BSR.

* :class:`SparsityConfig` — fraction, score and scope of the pruning;
* :mod:`~optgqa_jax.sparse.prune` — group scores (magnitude, Hessian), masks, GPTQ on the
  pruned layer;
* :mod:`~optgqa_jax.sparse.bsr` — the Block Sparse Row format, conversions, the product and
  orbax save/load;
* :mod:`~optgqa_jax.sparse.calibrate` — the two calibration stages, BQPO and E2E-OQP;
* :mod:`~optgqa_jax.sparse.group_major` — the BSR blocks reordered by group, the serving
  layout of the group-major decode kernel;
* :mod:`~optgqa_jax.sparse.packed` — a row-scope BSR layer's arrays packed into one, the
  serving layout with one argument buffer per layer;
* :mod:`~optgqa_jax.sparse.row_block` — layers whose blocks of output features share one
  mask, as compacted dense blocks multiplied by the dense W4 kernel;
* :mod:`~optgqa_jax.sparse.reorder` — the MLP's hidden features reordered (an exact identity
  of the model) so that such shared masks cost less.
"""

from optgqa_jax.sparse.config import NMSparsity, SparsityConfig
from optgqa_jax.sparse.prune import (canonical_pruned, expand_mask, group_mask, group_scores,
                                     gptq_pruned, layer_output_error, nm_mask,
                                     prune_float, prune_nm_params, prune_quantized)
from optgqa_jax.sparse.bsr import (BSRQuantizedLinear, bsr_matmul, check_bsr, dequantize_bsr,
                                   from_arrays, is_bsr, kept_mask, load_bsr, save_bsr, to_bsr,
                                   to_bsr_params, to_dense)

__all__ = ["NMSparsity", "nm_mask", "prune_nm_params", "SparsityConfig", "canonical_pruned",
           "expand_mask", "group_mask", "group_scores",
           "gptq_pruned", "layer_output_error", "prune_float", "prune_quantized",
           "BSRQuantizedLinear", "bsr_matmul", "check_bsr", "dequantize_bsr", "from_arrays",
           "is_bsr", "kept_mask", "load_bsr", "save_bsr", "to_bsr", "to_bsr_params", "to_dense"]
from optgqa_jax.sparse.calibrate import CalibrationConfig, bqpo, calibrate, e2e_oqp  # noqa: E402
from optgqa_jax.sparse.group_major import (GroupMajorLinear, dequantize_group_major,  # noqa: E402
                                           group_major_matmul, is_group_major, to_group_major,
                                           to_group_major_params)

__all__ += ["CalibrationConfig", "bqpo", "calibrate", "e2e_oqp", "GroupMajorLinear",
            "dequantize_group_major", "group_major_matmul", "is_group_major", "to_group_major",
            "to_group_major_params"]
from optgqa_jax.sparse.packed import (PackedBSRLinear, is_packed_bsr,  # noqa: E402
                                      packed_bsr_matmul, to_packed_bsr, to_packed_bsr_params,
                                      unpack_bsr)

__all__ += ["PackedBSRLinear", "is_packed_bsr", "packed_bsr_matmul", "to_packed_bsr",
            "to_packed_bsr_params", "unpack_bsr"]
from optgqa_jax.sparse.row_block import (RowBlockQuantizedLinear,  # noqa: E402
                                         dequantize_row_block, is_row_block, row_block_matmul,
                                         row_block_to_dense, to_row_block, to_row_block_params)

__all__ += ["RowBlockQuantizedLinear", "dequantize_row_block", "is_row_block",
            "row_block_matmul", "row_block_to_dense", "to_row_block", "to_row_block_params"]
from optgqa_jax.sparse.reorder import reorder_mlp_for_row_blocks, row_block_order  # noqa: E402

__all__ += ["reorder_mlp_for_row_blocks", "row_block_order"]
