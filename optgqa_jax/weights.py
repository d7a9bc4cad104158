"""Map Hugging Face Llama tensor names and layouts onto our parameter pytree.

Hugging Face ``nn.Linear`` weights are [out, in]; our Dense kernels are
[in, out], so every projection is transposed. Both real-checkpoint loaders
(safetensors and GGUF) first produce tensors under Hugging Face names and
layouts, then call :func:`params_from_hf_tensors`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.config import ModelConfig
from optgqa_jax.model import abstract_params

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
    check_params_match(cfg, params)
    return params


def check_params_match(cfg: ModelConfig, params: dict, what: str = "checkpoint") -> None:
    """Raise ValueError listing every leaf whose path, shape or dtype differs from `cfg`'s."""
    expected = abstract_params(cfg)
    flat_exp = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_got = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = []
    for key in sorted(set(flat_exp) | set(flat_got)):
        if key not in flat_got:
            problems.append(f"{key}: missing")
        elif key not in flat_exp:
            problems.append(f"{key}: not part of this config")
        else:
            e, g = flat_exp[key], flat_got[key]
            if tuple(e.shape) != tuple(np.shape(g)):
                problems.append(f"{key}: shape {tuple(np.shape(g))}, config expects {tuple(e.shape)}")
            elif jnp.dtype(e.dtype) != jnp.dtype(g.dtype):
                problems.append(f"{key}: dtype {g.dtype}, config expects {e.dtype}")
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ValueError(f"{what} parameters do not match the config:\n  {shown}{more}")
