"""Hugging Face GPTQ checkpoints: export quantized params, and read their layers back.

Layout of one linear layer (b bits, G groups; our kernel ``w`` [D_in, D_out] is the
transpose of torch's ``nn.Linear.weight``), under ``<module>.`` names such as
``model.layers.0.self_attn.q_proj.``:

* ``qweight`` int32 [D_in * b / 32, D_out]: codes packed along the input dimension,
  exactly our ``QuantizedLinear.qweight``;
* ``qzeros`` int32 [G, D_out * b / 32]: zero points packed along the *output* dimension
  (``optgqa_jax.quant.packing.pack`` of the transposed [D_out, G] zeros);
* ``scales`` float16 [G, D_out];
* ``g_idx`` int32 [D_in]: the group of each input row.

Every ``b`` words along the packed axis hold 32 values as one little-endian bit stream
(value k at stream bits ``[b*k, b*k + b)``): for 2/4/8 bits value j of a word sits at bit
``b*j``; for 3 bits values 10 and 21 straddle two words (the 10|1|10|1|10 scheme).

``checkpoint_format`` says what a ``qzeros`` field holds: ``"gptq"`` (v1, what
AutoGPTQ wrote and GPTQModel still writes by default) stores the zero point *minus one*,
``(zero - 1) & (2**b - 1)`` per field, so a symmetric 4-bit layer (true zero 8) has words
``0x77777777``; ``"gptq_v2"`` stores the true zero. A true zero of 0 (asymmetric grids
only) is stored as ``2**b - 1`` in v1 and read back modulo ``2**b``, as GPTQModel's
``_shift_gptq_qzeros`` does. Other readers disagree on that one case: vLLM's ``gptq_gemm``
adds one without the modulo, and GPTQModel's whole-word v1 -> v2 conversion for 2/4/8 bits
(``qzeros += 0x11111111`` for 4 bits, done on load for some kernels) carries into the next
field. Prefer ``"gptq_v2"`` for asymmetric layers (:func:`export_hf_gptq` warns when a v1
export holds such a zero).

Checked against (stored copies of the sources, read for this module):

* ModelCloud/GPTQModel v7.3.4 (@ f4c327a): ``gptqmodel/nn_modules/qlinear/__init__.py``
  (``pack_block``: qweight [in*b/32, out]; ``_pack_rows_3``, the 10|1|10|1|10 words; the
  qzeros loop packing [G, out] along out; ``dequantize_weight``:
  ``scales[g_idx] * (weight - zeros[g_idx])``), ``gptqmodel/utils/model.py``
  (``convert_gptq_v1_to_v2_format_module`` and its inverse: the +-1 of v1),
  ``gptqmodel/utils/model_dequant.py`` (``_shift_gptq_qzeros``: ``(field + delta) & maxq``),
  ``gptqmodel/quantization/config.py`` (the ``quantization_config`` keys written below)
  and ``gptqmodel/models/loader.py`` (refuses ``sym=False`` in format ``gptq`` unless
  ``meta.quantizer`` names gptqmodel >= 0.9.0: another reason for ``gptq_v2``);
* vLLM ``vllm/model_executor/layers/quantization/gptq.py`` (a 2025 copy with
  ``checkpoint_format``): ``from_config`` reads ``bits``, ``group_size``, ``desc_act``,
  ``lm_head``, ``dynamic``, ``checkpoint_format``; ``use_v2_format = checkpoint_format ==
  "gptq_v2"``; the tensor shapes above. Its ``csrc/quantization/gptq/q_gemm.cu`` has
  ``zero_offset = use_v2_format ? 0 : 1``;
* transformers 5.25.0 (installed here), ``transformers/utils/quantization_config.py``
  ``GPTQConfig``: ``format`` (legacy key ``checkpoint_format``) is ``"gptq"`` or
  ``"gptq_v2"``, bits in {2, 3, 4, 8}, ``damp_percent`` must lie in (0, 1).

``tests/gptq_reference.py`` (an independent numpy (un)packer the tests compare against)
cites the same sources plus AutoGPTQ @ 9f7d370 ``qlinear_cuda_old.py`` (``zeros -= 1``
before packing). ``transformers.AutoConfig`` reads the exported ``config.json`` and
``GPTQConfig.from_dict`` parses its ``quantization_config`` (tested); loading the weights
in transformers needs ``optimum`` (or ``gptqmodel``), not installed here, so that step
is unverified, as is loading in vLLM or GPTQModel.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Optional

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from optgqa_jax.config import ModelConfig
from optgqa_jax.fused import is_fused
from optgqa_jax.model import check_params_match
from optgqa_jax.quant.config import SUPPORTED_BITS, QuantConfig
from optgqa_jax.quant.linear import (QuantizedLinear, contiguous_groups, is_quantized,
                                     split_outputs, unsort_groups)
from optgqa_jax.quant.packing import pack, packed_rows, unpack
from optgqa_jax.weights import hf_linear_names, hf_norm_names

FORMATS = ("gptq", "gptq_v2")
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
# jitted once per shape: the bit loops would otherwise dispatch op by op for every layer
_pack = jax.jit(pack, static_argnums=1)
_unpack = jax.jit(unpack, static_argnums=(1, 2))


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; expected one of {FORMATS}")


# ----------------------------------------------------------------------------- one layer
def stored_zeros(zeros, bits: int, checkpoint_format: str) -> np.ndarray:
    """The zero-point fields a checkpoint stores for true zeros [G, D_out] (int32)."""
    _check_format(checkpoint_format)
    z = np.asarray(zeros, np.int32)
    return (z - 1) & ((1 << bits) - 1) if checkpoint_format == "gptq" else z


def true_zeros(fields, bits: int, checkpoint_format: str) -> np.ndarray:
    """Inverse of :func:`stored_zeros` (v1: ``(field + 1) mod 2**bits``, as GPTQModel reads it)."""
    _check_format(checkpoint_format)
    f = np.asarray(fields, np.int32)
    return (f + 1) & ((1 << bits) - 1) if checkpoint_format == "gptq" else f


def quantized_to_hf(ql: QuantizedLinear, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """The checkpoint tensors ``{"qweight", "qzeros", "scales", "g_idx"}`` of one layer."""
    ql = unsort_groups(ql)  # files hold rows in logical order
    z = stored_zeros(np.asarray(ql.zeros), ql.bits, checkpoint_format)   # [G, D_out]
    qzeros = np.asarray(_pack(jnp.asarray(z.T), ql.bits)).T                # [G, D_out*b/32]
    return {"qweight": np.asarray(ql.qweight, np.int32),
            "qzeros": np.ascontiguousarray(qzeros, np.int32),
            "scales": np.asarray(ql.scales),
            "g_idx": np.asarray(ql.g_idx, np.int32)}


def quantized_from_hf(tensors: dict, qc: QuantConfig, checkpoint_format: str,
                      shape: tuple[int, int], dtype: str, *,
                      name: str = "layer") -> QuantizedLinear:
    """Build a :class:`QuantizedLinear` from one layer's checkpoint tensors.

    ``qweight`` is kept as stored (it is our layout); ``qzeros`` is unpacked once (and,
    for v1, one is added back).

    Args:
      tensors: ``qweight``, ``qzeros``, ``scales`` and, unless the layer has contiguous
        groups (no act-order), ``g_idx``.
      qc: bits, group size and symmetry from the checkpoint's ``quantization_config``.
      checkpoint_format: ``"gptq"`` or ``"gptq_v2"``.
      shape: the logical (D_in, D_out) the model expects.
      dtype: the model dtype the layer replaces.
      name: the module name, for error messages.

    Raises:
      ValueError: a tensor is missing, has the wrong dtype or a shape that does not fit
        `shape` and the config's bits/group size, or ``g_idx`` names a group that does not exist.
    """
    d_in, d_out = shape
    bits = qc.bits
    if qc.group_size != -1 and d_in % qc.group_size:
        raise ValueError(f"{name}: group_size={qc.group_size} of the quantization_config does "
                         f"not divide the input dimension D_in={d_in}")
    try:
        weight_words, zero_words = packed_rows(d_in, bits), packed_rows(d_out, bits)
    except ValueError as e:
        raise ValueError(f"{name}: [D_in={d_in}, D_out={d_out}] cannot hold packed {bits}-bit "
                         f"codes and zero points: {e}") from e
    G = qc.groups(d_in)
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise ValueError(f"checkpoint is missing tensor {name + '.' + key!r}")
    qweight = np.asarray(tensors["qweight"])
    qzeros = np.asarray(tensors["qzeros"])
    scales = jnp.asarray(tensors["scales"])
    want = {"qweight": (weight_words, d_out), "qzeros": (G, zero_words),
            "scales": (G, d_out)}
    for key, arr in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(arr.shape) != want[key]:
            hint = (f" (group_size={qc.group_size} gives {G} groups for D_in={d_in})"
                    if key != "qweight" and arr.ndim == 2 and arr.shape[0] != G else "")
            raise ValueError(f"{name}.{key}: shape {tuple(arr.shape)}, expected {want[key]} for "
                             f"{bits}-bit [D_in={d_in}, D_out={d_out}]{hint}")
    for key, arr in (("qweight", qweight), ("qzeros", qzeros)):
        if arr.dtype != np.int32:
            raise ValueError(f"{name}.{key}: dtype {arr.dtype}, GPTQ packs into int32")
    if not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"{name}.scales: dtype {scales.dtype} is not a float type")
    if "g_idx" in tensors:
        g_idx = np.asarray(tensors["g_idx"])
        if g_idx.shape != (d_in,):
            raise ValueError(f"{name}.g_idx: shape {g_idx.shape}, expected ({d_in},)")
        if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= G):
            raise ValueError(f"{name}.g_idx holds groups in [{g_idx.min()}, {g_idx.max()}], "
                             f"outside the {G} groups of group_size={qc.group_size}")
    elif qc.act_order:
        raise ValueError(f"checkpoint is missing tensor {name + '.g_idx'!r} (desc_act is set)")
    else:
        g_idx = np.arange(d_in) // (d_in // G)
    fields = np.asarray(_unpack(jnp.asarray(qzeros.T), bits, d_out)).T  # [G, D_out]
    zeros = true_zeros(fields, bits, checkpoint_format)
    return QuantizedLinear(qweight=jnp.asarray(qweight), scales=scales,
                           zeros=jnp.asarray(zeros.astype(np.uint8)),
                           g_idx=jnp.asarray(g_idx, jnp.int32), bits=bits,
                           group_size=qc.group_size, sym=qc.sym, dtype=jnp.dtype(dtype).name,
                           groups_contiguous=bool(contiguous_groups(g_idx, qc.group_size)))


# ----------------------------------------------------------------------------- configs
def quantization_config(qc: QuantConfig, checkpoint_format: str = "gptq") -> dict:
    """The ``quantization_config`` of ``config.json`` for layers quantized with `qc`.

    Keys as GPTQModel writes them (``format`` and its legacy alias ``checkpoint_format``,
    ``method``/``quant_method``, ``pack_dtype``, ``lm_head``, ``meta``), plus the
    transformers/optimum ones (``damp_percent``, ``true_sequential``, ``static_groups``).
    ``meta.optgqa_quant_config`` keeps every field of `qc` so that an import recovers it.
    """
    from optgqa_jax import __version__  # the package imports this module

    _check_format(checkpoint_format)
    return {
        "quant_method": "gptq", "method": "gptq", "bits": qc.bits, "group_size": qc.group_size,
        "desc_act": qc.act_order, "sym": qc.sym, "static_groups": qc.static_groups,
        "damp_percent": qc.damp, "true_sequential": True, "act_group_aware": False,
        "lm_head": qc.quantize_lm_head, "format": checkpoint_format,
        "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
        "meta": {"quantizer": [f"optgqa_jax:{__version__}"], "damp_percent": qc.damp,
                 "static_groups": qc.static_groups, "true_sequential": True,
                 "act_group_aware": False, "optgqa_quant_config": qc.to_dict()},
    }


def quant_config_from_hf(quant: dict) -> tuple[QuantConfig, str]:
    """Read a ``quantization_config`` dict: (QuantConfig, checkpoint_format).

    Raises:
      ValueError: not GPTQ, bits outside {2, 3, 4, 8}, an unknown or conflicting
        checkpoint format, per-module ``dynamic`` overrides, or packing other than int32.
    """
    if not isinstance(quant, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(quant).__name__}")
    method = str(quant.get("quant_method", quant.get("method", ""))).lower()
    if method != "gptq":
        raise ValueError(f"unsupported quantization method {method or None!r} in config.json; "
                         "only GPTQ checkpoints (quant_method 'gptq') can be loaded")
    bits = quant.get("bits")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ checkpoint with bits={bits!r}; supported: {SUPPORTED_BITS}")
    formats = {str(quant[k]).lower() for k in ("checkpoint_format", "format") if quant.get(k)}
    if len(formats) > 1:
        raise ValueError(f"quantization_config gives conflicting formats {sorted(formats)}")
    checkpoint_format = formats.pop() if formats else "gptq"
    if checkpoint_format not in FORMATS:
        raise ValueError(f"unsupported GPTQ checkpoint format {checkpoint_format!r}; "
                         f"supported: {FORMATS}")
    if quant.get("dynamic"):
        raise ValueError("quantization_config has per-module 'dynamic' overrides, which are "
                         "not supported")
    if str(quant.get("pack_dtype", "int32")) != "int32":
        raise ValueError(f"pack_dtype={quant['pack_dtype']!r}; only int32 packing is supported")
    meta = quant.get("meta") or {}
    fields = dict(
        bits=bits, group_size=quant.get("group_size", 128), sym=bool(quant.get("sym", True)),
        act_order=bool(quant.get("desc_act", False)),
        static_groups=bool(quant.get("static_groups", meta.get("static_groups", False))),
        damp=float(quant.get("damp_percent", meta.get("damp_percent", 0.01))),
        quantize_lm_head=bool(quant.get("lm_head", False)))
    ours = meta.get("optgqa_quant_config")
    if ours is not None:  # written by export_hf_gptq: the full config, checked against the rest
        qc = QuantConfig.from_dict(ours)
        diffs = [f"{k}: {v!r} vs {getattr(qc, k)!r}" for k, v in fields.items()
                 if getattr(qc, k) != v]
        if diffs:
            raise ValueError("quantization_config contradicts its meta.optgqa_quant_config: "
                             + "; ".join(diffs))
        return qc, checkpoint_format
    return QuantConfig(**fields), checkpoint_format


def hf_config(cfg: ModelConfig, qc: Optional[QuantConfig] = None,
              checkpoint_format: str = "gptq") -> dict:
    """A ``LlamaForCausalLM`` ``config.json`` dict for `cfg` (with `qc`'s quantization_config).

    Raises:
      ValueError: `cfg` is not expressible as a Hugging Face Llama (ALiBi or no positions,
        a non-contiguous KV-head map).
    """
    if cfg.position != "rope":
        raise ValueError(f"position={cfg.position!r}: Hugging Face Llama models use RoPE")
    if not all(cfg.has_contiguous_groups(i) for i in range(cfg.n_layers)):
        raise ValueError("kv_head_map is not the contiguous grouping Hugging Face Llama uses")
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        # transformers >= 5 reads rope_parameters; older readers (and vLLM) rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "dtype": cfg.dtype, "torch_dtype": cfg.dtype,
    }
    if qc is not None:
        out["quantization_config"] = quantization_config(qc, checkpoint_format)
    return out


# ----------------------------------------------------------------------------- export
def _unfused_linears(cfg: ModelConfig, params: dict) -> dict:
    """{our unfused kernel path: kernel} with fused qkv / gate_up split back."""
    out = {}
    N, K, H, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim

    def split(kernel, sizes):
        if is_quantized(kernel):
            return split_outputs(kernel, sizes)
        return jnp.split(kernel, np.cumsum(sizes)[:-1].tolist(), axis=1)

    for i in range(cfg.n_layers):
        attn, mlp = params[f"layer_{i}"]["attn"], params[f"layer_{i}"]["mlp"]
        pre = f"layer_{i}"
        if is_fused(params):
            q, k, v = split(attn["qkv_proj"]["kernel"], [N * H, K * H, K * H])
            gate, up = split(mlp["gate_up_proj"]["kernel"], [F, F])
        else:
            q, k, v = (attn[f"{p}_proj"]["kernel"] for p in "qkv")
            gate, up = mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]
        out.update({f"{pre}/attn/q_proj/kernel": q, f"{pre}/attn/k_proj/kernel": k,
                    f"{pre}/attn/v_proj/kernel": v,
                    f"{pre}/attn/o_proj/kernel": attn["o_proj"]["kernel"],
                    f"{pre}/mlp/gate_proj/kernel": gate, f"{pre}/mlp/up_proj/kernel": up,
                    f"{pre}/mlp/down_proj/kernel": mlp["down_proj"]["kernel"]})
    if not cfg.tie_embeddings:
        out["lm_head"] = params["lm_head"]
    return out


def _check_layer(path: str, ql, qc: QuantConfig) -> None:
    if not is_quantized(ql):
        raise ValueError(f"{path} is not quantized; a GPTQ checkpoint quantizes every linear "
                         "layer of the blocks (and the LM head iff quantize_lm_head)")
    got = (ql.bits, ql.group_size, ql.sym)
    if got != (qc.bits, qc.group_size, qc.sym):
        raise ValueError(f"{path}: (bits, group_size, sym) = {got} contradicts the QuantConfig's "
                         f"{(qc.bits, qc.group_size, qc.sym)}")
    if jnp.dtype(ql.scales.dtype) != jnp.float16:
        raise ValueError(f"{path}: scales are {ql.scales.dtype}; the GPTQ format stores float16 "
                         "scales (quantize with scale_dtype='float16')")
    d_in, d_out = ql.shape
    try:
        packed_rows(d_out, ql.bits)
    except ValueError as e:
        raise ValueError(f"{path}: the GPTQ format packs zero points along D_out={d_out}, "
                         f"which {ql.bits}-bit fields cannot fill: {e}") from e
    if not qc.act_order:
        gs = d_in if qc.group_size == -1 else qc.group_size
        if not np.array_equal(np.asarray(ql.g_idx), np.arange(d_in) // gs):
            raise ValueError(f"{path}: g_idx is not contiguous groups, but act_order (desc_act) "
                             "is off; readers such as vLLM would ignore g_idx")


def export_hf_gptq(path: str, cfg: ModelConfig, qparams: dict, qc: QuantConfig, *,
                   checkpoint_format: str = "gptq", tokenizer_dir: Optional[str] = None,
                   overwrite: bool = False) -> str:
    """Write quantized params as a Hugging Face GPTQ checkpoint directory.

    Writes ``model.safetensors`` (Hugging Face names; GPTQ tensors for every quantized
    layer, float tensors in ``cfg.dtype`` for embeddings, norms and a float LM head),
    ``config.json`` (``LlamaForCausalLM`` with ``quantization_config``), a copy of the
    latter as ``quantize_config.json`` (GPTQModel's file), and the tokenizer files found in
    `tokenizer_dir`. ``og.load_hf_llama(path)`` reads it back bit-exactly.

    Args:
      path: output directory (created).
      cfg: the model configuration.
      qparams: quantized params (``optgqa_jax.quant.quantize``), unfused or fused.
      qc: the settings the params were quantized with; every layer must agree with it.
      checkpoint_format: ``"gptq"`` (v1, zero points minus one) or ``"gptq_v2"``.
      tokenizer_dir: optional directory whose tokenizer files are copied.
      overwrite: replace the weights and configs of an existing directory.

    Returns:
      the absolute path.

    Raises:
      FileExistsError: `path` exists and `overwrite` is false.
      FileNotFoundError: `tokenizer_dir` is missing or holds no tokenizer file.
      ValueError: params that do not match `cfg`; a linear layer of the blocks left
        float, or one whose bits/group size/symmetry/scale dtype contradict `qc`;
        non-contiguous ``g_idx`` without act-order; a `cfg` Hugging Face Llama cannot express.
    """
    _check_format(checkpoint_format)
    path = os.path.abspath(path)
    check_params_match(cfg, qparams, what="params")
    config = hf_config(cfg, qc, checkpoint_format)
    tokenizer_files = []
    if tokenizer_dir is not None:
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir!r} does not exist")
        tokenizer_files = [n for n in TOKENIZER_FILES
                           if os.path.isfile(os.path.join(tokenizer_dir, n))]
        if not tokenizer_files:
            raise FileNotFoundError(f"no tokenizer files {TOKENIZER_FILES} in {tokenizer_dir!r}")
    if qc.quantize_lm_head and cfg.tie_embeddings:
        raise ValueError("quantize_lm_head is set but the model ties its LM head to the embeddings")
    if qc.quantize_embedding or is_quantized(qparams["embed"]["embedding"]):
        raise ValueError("the token table is quantized (quantize_embedding), but the Hugging "
                         "Face GPTQ layout stores embeddings in float; quantize without "
                         "quantize_embedding to export, or save with og.save_checkpoint")
    linears = _unfused_linears(cfg, qparams)
    tensors: dict[str, np.ndarray] = {}
    float_dtype = np.dtype(cfg.jnp_dtype)
    any_zero_zero = False
    for p, module in hf_linear_names(cfg).items():
        kernel = linears[p]
        if p == "lm_head" and not qc.quantize_lm_head:
            if is_quantized(kernel):
                raise ValueError("lm_head is quantized but the QuantConfig has "
                                 "quantize_lm_head=False")
            tensors["lm_head.weight"] = np.ascontiguousarray(np.asarray(kernel).T, float_dtype)
            continue
        _check_layer(p, kernel, qc)
        any_zero_zero |= bool((np.asarray(kernel.zeros) == 0).any())
        for key, value in quantized_to_hf(kernel, checkpoint_format).items():
            tensors[f"{module}.{key}"] = value
    flat = flax.traverse_util.flatten_dict(qparams, sep="/")
    for p, name in hf_norm_names(cfg).items():
        tensors[name] = np.asarray(flat[p], float_dtype)
    if any_zero_zero and checkpoint_format == "gptq":
        warnings.warn("some zero points are 0, stored as 2**bits - 1 in the v1 'gptq' format; "
                      "optgqa_jax reads them back (modulo 2**bits), but vLLM's gptq kernel and "
                      "GPTQModel's whole-word v1 -> v2 conversion do not: export with "
                      "checkpoint_format='gptq_v2' for such layers", stacklevel=2)

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output path {path!r} already exists; pass overwrite=True")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # stale shards would be read together with the new file
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(path, name))
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    for name, content in (("config.json", config),
                          ("quantize_config.json", config["quantization_config"])):
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
    for name in tokenizer_files:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    return path
