"""Map Hugging Face Llama tensor names and layouts onto our parameter pytree.

Hugging Face ``nn.Linear`` weights are [out, in]; our Dense kernels are
[in, out], so every projection is transposed. Both real-checkpoint loaders
(safetensors and GGUF) first produce tensors under Hugging Face names and
layouts, then call :func:`params_from_hf_tensors`.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from optgqa_jax.config import ModelConfig
from optgqa_jax.model import check_params_match

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def params_from_hf_tensors(cfg: ModelConfig, get: Callable[[str], object],
                           has: Callable[[str], bool]) -> dict:
    """Build our parameter pytree from Hugging Face-named tensors.

    Args:
      cfg: the target configuration.
      get: returns the tensor (numpy/jax array) of a Hugging Face parameter name.
      has: whether a name exists.

    Raises:
      ValueError: a tensor is missing or its shape does not match `cfg`.
    """
    dtype = cfg.jnp_dtype

    def fetch(name: str, transpose: bool = False):
        if not has(name):
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        x = jnp.asarray(get(name))
        return (x.T if transpose else x).astype(dtype)

    params: dict = {"embed": {"embedding": fetch("model.embed_tokens.weight")},
                    "final_norm": {"scale": fetch("model.norm.weight")}}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        params[f"layer_{i}"] = {
            "attn": {p: {"kernel": fetch(pre + f"self_attn.{p}.weight", True)} for p in _ATTN},
            "mlp": {p: {"kernel": fetch(pre + f"mlp.{p}.weight", True)} for p in _MLP},
            "attn_norm": {"scale": fetch(pre + "input_layernorm.weight")},
            "mlp_norm": {"scale": fetch(pre + "post_attention_layernorm.weight")},
        }
    if not cfg.tie_embeddings:
        params["lm_head"] = fetch("lm_head.weight", True)
    check_params_match(cfg, params, what="checkpoint tensors")
    return params
