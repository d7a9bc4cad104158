"""Weight quantization: the grid, GPTQ, jax.grad-based calibration and checkpoint formats."""

from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.grid import rtn
from optgqa_jax.quant.gptq import HessianAccumulator, gptq, hessian
from optgqa_jax.quant.linear import (QuantizedLinear, concat_outputs, dequantize, from_codes,
                                     is_quantized, lookup_columns, matmul, prepare_for_kernels,
                                     sort_groups, split_outputs, unsort_groups)
from optgqa_jax.quant.packing import pack, unpack

__all__ = ["QuantConfig", "rtn", "HessianAccumulator", "gptq", "hessian", "QuantizedLinear",
           "concat_outputs", "dequantize", "from_codes", "is_quantized", "lookup_columns", "matmul",
           "prepare_for_kernels", "sort_groups", "split_outputs", "unsort_groups", "pack",
           "unpack"]

from optgqa_jax.quant.calibration import learn_scales, token_gradient_weights  # noqa: E402
from optgqa_jax.quant.pipeline import QuantReport, check_calibration, quantize  # noqa: E402

__all__ += ["learn_scales", "token_gradient_weights", "QuantReport", "check_calibration",
            "quantize"]
from optgqa_jax.quant.hf_gptq import export_hf_gptq  # noqa: E402

__all__ += ["export_hf_gptq"]
from optgqa_jax.quant.synthetic import parse_spec, random_quantize  # noqa: E402

__all__ += ["parse_spec", "random_quantize"]
from optgqa_jax.quant.weights_left import (WeightsLeftLinear, is_weights_left,  # noqa: E402
                                           to_weights_left, to_weights_left_params,
                                           weights_left_matmul)

__all__ += ["WeightsLeftLinear", "is_weights_left", "to_weights_left", "to_weights_left_params",
            "weights_left_matmul"]
