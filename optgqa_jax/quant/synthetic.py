"""Random quantized weights of any architecture, for speed and memory benchmarks.

Benchmarks of quantized serving need a quantized Llama-3-8B, and no such checkpoint exists
here; GPTQ of random weights would only spend time producing other random weights. So
:func:`random_quantize` replaces every linear kernel of a params tree by a
:class:`QuantizedLinear` of the same shape with random codes, grids scaled like the float
initialisation (dequantized weights of standard deviation about ``std``), and contiguous groups.
The model's outputs are meaningless, but every byte and every kernel launch is that of a real
GPTQ model of the same configuration. Quantization specs read like ``"w4g128"`` (4 bits,
groups of 128) or ``"w8"`` (8 bits, one group per output channel), optionally followed by
``+head`` (an untied LM head quantized too) and ``+emb`` (the token table too, and with it a
tied head): ``"w4g128+head+emb"``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.quant.config import QuantConfig
from optgqa_jax.quant.linear import QuantizedLinear
from optgqa_jax.quant.packing import packed_rows

# Leaves that stay float: embeddings, norms and the LM head (as in GPTQ practice).
_LINEAR_PARENTS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
                   "down_proj", "gate_up_proj")


EXTRAS = r"((?:\+(?:head|emb))*)"   # spec suffixes: the LM head, the token table


def parse_spec(spec: str) -> QuantConfig:
    """``"w4g128"`` -> QuantConfig(bits=4, group_size=128); ``"w8"`` -> per channel;
    ``"w4g128+head+emb"`` also sets ``quantize_lm_head`` and ``quantize_embedding``.

    Raises:
      ValueError: a spec not of the form ``w<bits>[g<group size>][+head][+emb]``, or
        bits/group size that QuantConfig rejects.
    """
    m = re.fullmatch(r"w(\d+)(?:g(-1|\d+))?" + EXTRAS, spec or "")
    if m is None:
        raise ValueError(f"quantization spec {spec!r} must look like 'w4g128' (bits, group size) "
                         "or 'w8' (one group per output channel), optionally with '+head' "
                         "(the LM head) and '+emb' (the token table)")
    extras = m.group(3).split("+")[1:]
    return QuantConfig(bits=int(m.group(1)), group_size=int(m.group(2) or -1),
                       quantize_lm_head="head" in extras, quantize_embedding="emb" in extras)


def random_quantized_linear(key: jax.Array, d_in: int, d_out: int, qc: QuantConfig,
                            dtype: str, std: float = 0.02, name: str = "the layer"
                            ) -> QuantizedLinear:
    """A QuantizedLinear [d_in, d_out] with uniform random codes and contiguous groups."""
    qc.check_layer(d_in, name)
    rows = packed_rows(d_in, qc.bits)
    G = 1 if qc.group_size == -1 else d_in // qc.group_size
    levels = 2 ** qc.bits
    k1, k2 = jax.random.split(key)
    # Uniform codes over `levels` values, centred by the zero point: w ~ U(-L/2, L/2) * s,
    # whose std is s * L / sqrt(12); pick s so that it is `std`.
    scale = std * np.sqrt(12.0) / levels
    qweight = jax.random.randint(k1, (rows, d_out), jnp.iinfo(jnp.int32).min,
                                 jnp.iinfo(jnp.int32).max, dtype=jnp.int32)
    scales = (scale * jax.random.uniform(k2, (G, d_out), minval=0.8, maxval=1.2)
              ).astype(qc.scale_dtype)
    zeros = jnp.full((G, d_out), levels // 2, jnp.uint8)
    g_idx = jnp.arange(d_in, dtype=jnp.int32) // (d_in if qc.group_size == -1 else qc.group_size)
    return QuantizedLinear(qweight=qweight, scales=scales, zeros=zeros, g_idx=g_idx,
                           bits=qc.bits, group_size=qc.group_size, sym=qc.sym,
                           dtype=jnp.dtype(dtype).name, groups_contiguous=True)


def random_quantize(params: dict, qc: QuantConfig, seed: int = 0, dtype=None) -> dict:
    """`params` with every linear kernel replaced by a random :class:`QuantizedLinear`.

    Args:
      params: float params of any layout (unfused or fused); norms are kept, and the
        embeddings and the LM head unless ``qc`` asks for them
        (:func:`random_quantize_table_and_head`).
      qc: bits and group size (``parse_spec`` builds one from ``"w4g128"``).
      seed: the codes' and scales' seed.
      dtype: the model dtype the quantized kernels replace (default: each kernel's dtype).

    Returns:
      A new params tree (the float kernels are dropped from it).

    Raises:
      ValueError: a group size that does not divide a layer's input dimension, or params
        without linear kernels.
    """
    out = replace_linear_kernels(
        params, lambda i, name, leaf: random_quantized_linear(
            jax.random.fold_in(jax.random.PRNGKey(seed), i), *leaf.shape, qc,
            dtype or leaf.dtype, name=name), what="quantize")
    return random_quantize_table_and_head(out, qc, seed, dtype)


def random_quantize_table_and_head(params: dict, qc: QuantConfig, seed: int = 0,
                                   dtype=None) -> dict:
    """`params` with the LM head (``qc.quantize_lm_head``) and the token table
    (``qc.quantize_embedding``, stored ``[D, V]`` as the head) replaced by random
    :class:`QuantizedLinear` layers; unchanged when neither is asked for.

    Raises:
      ValueError: ``quantize_lm_head`` on a model that ties its head to the table.
    """
    out = dict(params)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1 << 20)
    if qc.quantize_lm_head:
        if "lm_head" not in params:
            raise ValueError("+head: this model ties its LM head to the token table; +emb "
                             "quantizes the shared table")
        w = params["lm_head"]                                   # [D, V]
        out["lm_head"] = random_quantized_linear(jax.random.fold_in(key, 0), *w.shape, qc,
                                                 dtype or w.dtype, name="lm_head")
    if qc.quantize_embedding:
        table = params["embed"]["embedding"]                    # [V, D]
        v, d = table.shape
        out["embed"] = {**params["embed"], "embedding": random_quantized_linear(
            jax.random.fold_in(key, 1), d, v, qc, dtype or table.dtype, name="embed/embedding")}
    return out


def replace_linear_kernels(params: dict, make, what: str = "replace") -> dict:
    """`params` with every float linear kernel (``…/q_proj/kernel`` etc.; not embeddings,
    norms or the LM head) replaced by ``make(index, name, leaf)``.

    Raises:
      ValueError: params that are already quantized, or that hold no linear kernel.
    """
    from optgqa_jax.model import is_quantized as any_quantized   # dense or group-sparse
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=any_quantized)[0]
    if any(any_quantized(leaf) for _, leaf in flat):
        raise ValueError(f"params are already quantized; {what} takes float params")
    out = {}
    count = 0
    for i, (path, leaf) in enumerate(flat):
        names = [getattr(p, "key", str(p)) for p in path]
        target = out
        for n in names[:-1]:
            target = target.setdefault(n, {})
        if len(names) >= 2 and names[-1] == "kernel" and names[-2] in _LINEAR_PARENTS:
            target[names[-1]] = make(i, "/".join(names[:-1]), leaf)
            count += 1
        else:
            target[names[-1]] = leaf
    if not count:
        raise ValueError(f"params hold no linear kernels (…/q_proj/kernel etc.) to {what}")
    return out
