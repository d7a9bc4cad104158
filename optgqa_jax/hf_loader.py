"""Load Hugging Face Llama-family checkpoints (config.json + safetensors shards).

Float checkpoints and GPTQ-quantized ones (``quantization_config`` with ``quant_method``
``"gptq"``, formats ``gptq``/``gptq_v2``; see ``optgqa_jax.quant.hf_gptq``) are read.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

from safetensors import safe_open

from optgqa_jax.config import ModelConfig
from optgqa_jax.quant.hf_gptq import quant_config_from_hf
from optgqa_jax.weights import params_from_hf_tensors

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path!r} could not be read as JSON: {e}") from e


def config_from_hf(hf: dict, *, dtype: Optional[str] = None) -> ModelConfig:
    """Translate a Hugging Face Llama ``config.json`` dict into a :class:`ModelConfig`.

    Raises:
      ValueError: unsupported architecture or features (biases, rope scaling,
        activations other than SiLU).
    """
    archs = hf.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and hf.get("model_type") != "llama":
        raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r} in "
                         f"config.json; supported: {SUPPORTED_ARCHITECTURES}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json asks for attention_bias/mlp_bias, which Llama models "
                         "here do not support")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} in config.json; only 'silu'")
    # transformers >= 5 keeps rope settings in rope_parameters; older versions use
    # rope_theta / rope_scaling at the top level.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"unsupported rope scaling {rope_type!r} in config.json; only plain RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_heads = hf["num_attention_heads"]
    if dtype is None:
        dtype = _TORCH_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
                                  "float32")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        position="rope", rope_theta=float(theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype,
        max_seq_len=hf.get("max_position_embeddings", 2048))


def load_hf_llama(path: str, *, dtype: Optional[str] = None) -> tuple[ModelConfig, dict]:
    """Load a Hugging Face Llama-family checkpoint directory.

    Args:
      path: directory holding ``config.json`` and one or several ``*.safetensors``
        files (sharded checkpoints are found through ``model.safetensors.index.json``
        when present, else by globbing).
      dtype: parameter dtype; default: the checkpoint's ``torch_dtype``.

    Returns:
      (config, params). The linear layers of a GPTQ checkpoint are ``QuantizedLinear``
      leaves (bits, group size and symmetry from its ``quantization_config``; the
      packed codes kept as stored, the zero points unpacked once).

    Raises:
      FileNotFoundError: the directory, config.json or weights are missing.
      ValueError: unsupported architecture or quantization (a method other than GPTQ,
        bits outside {2, 3, 4, 8}, an unknown checkpoint format), or tensors that do not
        fit the config.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    hf = _read_json(os.path.join(path, "config.json"), "config file")
    cfg = config_from_hf(hf, dtype=dtype)
    gptq = None
    if hf.get("quantization_config") is not None:
        gptq = quant_config_from_hf(hf["quantization_config"])
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path, "safetensors index")["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r}")
    where: dict[str, str] = {}
    handles = {}
    for name in files:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"weight shard {full!r} listed in the index does not exist")
        try:
            handles[name] = safe_open(full, framework="flax")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"weight shard {full!r} could not be read: {e}") from e
        for key in handles[name].keys():
            where[key] = name
    params = params_from_hf_tensors(cfg, lambda k: handles[where[k]].get_tensor(k),
                                    lambda k: k in where, gptq=gptq)
    return cfg, params
