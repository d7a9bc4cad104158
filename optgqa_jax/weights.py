"""Map Hugging Face Llama tensor names and layouts onto our parameter pytree.

Hugging Face ``nn.Linear`` weights are [out, in]; our Dense kernels are
[in, out], so every projection is transposed. Both real-checkpoint loaders
(safetensors and GGUF) first produce tensors under Hugging Face names and
layouts, then call :func:`params_from_hf_tensors`.

A GPTQ-quantized linear layer has no ``<module>.weight`` but ``<module>.qweight``,
``.qzeros``, ``.scales`` and ``.g_idx`` (``optgqa_jax.quant.hf_gptq``); it becomes a
``QuantizedLinear`` leaf.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.traverse_util
import jax.numpy as jnp

from optgqa_jax.config import ModelConfig
from optgqa_jax.model import abstract_params, check_params_match

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def hf_linear_names(cfg: ModelConfig) -> dict[str, str]:
    """Our unfused kernel paths -> Hugging Face module names, for every linear layer.

    ``{"layer_0/attn/q_proj/kernel": "model.layers.0.self_attn.q_proj", ...,
    "lm_head": "lm_head"}`` (no LM head when the embeddings are tied). A module's
    float weight is ``<module>.weight``; a GPTQ layer's tensors are ``<module>.qweight`` etc.
    """
    names = {}
    for i in range(cfg.n_layers):
        for p in _ATTN:
            names[f"layer_{i}/attn/{p}/kernel"] = f"model.layers.{i}.self_attn.{p}"
        for p in _MLP:
            names[f"layer_{i}/mlp/{p}/kernel"] = f"model.layers.{i}.mlp.{p}"
    if not cfg.tie_embeddings:
        names["lm_head"] = "lm_head"
    return names


def hf_norm_names(cfg: ModelConfig) -> dict[str, str]:
    """Our embedding and norm paths -> Hugging Face tensor names (stored untransposed)."""
    names = {"embed/embedding": "model.embed_tokens.weight",
             "final_norm/scale": "model.norm.weight"}
    for i in range(cfg.n_layers):
        names[f"layer_{i}/attn_norm/scale"] = f"model.layers.{i}.input_layernorm.weight"
        names[f"layer_{i}/mlp_norm/scale"] = f"model.layers.{i}.post_attention_layernorm.weight"
    return names


def params_from_hf_tensors(cfg: ModelConfig, get: Callable[[str], object],
                           has: Callable[[str], bool], *, gptq: Optional[tuple] = None) -> dict:
    """Build our parameter pytree from Hugging Face-named tensors.

    Args:
      cfg: the target configuration.
      get: returns the tensor (numpy/jax array) of a Hugging Face parameter name.
      has: whether a name exists.
      gptq: ``(QuantConfig, checkpoint_format)`` of a GPTQ checkpoint
        (``optgqa_jax.quant.hf_gptq.quant_config_from_hf``), or None for float weights.

    Raises:
      ValueError: a tensor is missing or its shape does not match `cfg`; GPTQ tensors
        without a GPTQ ``quantization_config``, or ones that do not fit it.
    """
    dtype = cfg.jnp_dtype
    expected = flax.traverse_util.flatten_dict(abstract_params(cfg), sep="/")

    def fetch(name: str, transpose: bool = False):
        if not has(name):
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        x = jnp.asarray(get(name))
        return (x.T if transpose else x).astype(dtype)

    def linear(path: str, module: str):
        if not has(module + ".qweight"):
            return fetch(module + ".weight", True)
        if gptq is None:
            raise ValueError(f"checkpoint has GPTQ tensor {module + '.qweight'!r} but config.json "
                             "has no GPTQ quantization_config")
        from optgqa_jax.quant.hf_gptq import quantized_from_hf  # hf_gptq imports this module

        qc, checkpoint_format = gptq
        tensors = {k: get(f"{module}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")
                   if has(f"{module}.{k}")}
        return quantized_from_hf(tensors, qc, checkpoint_format, tuple(expected[path].shape),
                                 cfg.dtype, name=module)

    flat = {path: fetch(name) for path, name in hf_norm_names(cfg).items()}
    flat.update({path: linear(path, module) for path, module in hf_linear_names(cfg).items()})
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    check_params_match(cfg, params, what="checkpoint tensors")
    return params
