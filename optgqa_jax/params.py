"""The model's parameter trees: the kinds of kernel leaves, random and abstract parameters,
and the checks that params and token arrays fit a config.

``optgqa_jax.model`` imports everything here and re-exports the public names
(``init_params``, ``abstract_params``, ``check_params_match``, ``is_quantized`` ...), so
``from optgqa_jax.model import init_params`` keeps working.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.config import ModelConfig
from optgqa_jax.fused import fuse_layers, is_fused
from optgqa_jax.quant.linear import is_quantized as _is_dense_quantized
from optgqa_jax.quant.weights_left import is_weights_left
from optgqa_jax.sparse.bsr import dequantize_bsr, is_bsr
from optgqa_jax.sparse.group_major import dequantize_group_major, is_group_major
from optgqa_jax.sparse.packed import is_packed_bsr, unpack_bsr
from optgqa_jax.sparse.row_block import dequantize_row_block, is_row_block
from optgqa_jax.weight_layout import is_output_major


def is_quantized(x) -> bool:
    """Whether a kernel leaf is quantized: a dense ``QuantizedLinear``, a group-sparse
    ``optgqa_jax.sparse.BSRQuantizedLinear`` or its serving layout
    ``optgqa_jax.sparse.GroupMajorLinear``, its row-block form
    ``optgqa_jax.sparse.RowBlockQuantizedLinear``, or the dense one's weights-left layout
    ``optgqa_jax.quant.WeightsLeftLinear`` (used as ``is_leaf`` in tree maps)."""
    return (_is_dense_quantized(x) or is_bsr(x) or is_group_major(x) or is_packed_bsr(x)
            or is_row_block(x) or is_weights_left(x))


# (is it, its float weight) of each group-sparse layout (the LM head's dequantized product)
_SPARSE_DEQUANTIZE = ((is_bsr, dequantize_bsr), (is_group_major, dequantize_group_major),
                      (is_packed_bsr, lambda w: dequantize_bsr(unpack_bsr(w))),
                      (is_row_block, dequantize_row_block))


def _is_kernel_leaf(x) -> bool:
    """A kernel that parameter checks read whole (its ``shape`` the logical [D_in, D_out]):
    a quantized kernel or an output-major float one (``optgqa_jax.weight_layout``)."""
    return is_quantized(x) or is_output_major(x)


_INIT = nn.initializers.normal(stddev=0.02)


def init_params(cfg: ModelConfig, key: jax.Array, fused: bool = False) -> dict:
    """Randomly initialised parameters (normal, std 0.02; norm scales 1).

    Returns:
      A plain nested dict: ``embed/embedding [V, D]``, ``layer_{i}/attn/{q,k,v,o}_proj/kernel``
      ([D, N*H], [D, K*H], [D, K*H], [N*H, D]), ``layer_{i}/mlp/{gate,up,down}_proj/kernel``,
      ``layer_{i}/{attn,mlp}_norm/scale``, ``final_norm/scale`` and, unless the
      embeddings are tied, ``lm_head [D, V]``. With ``fused=True``, the serving
      layout of ``optgqa_jax.fused`` (``qkv_proj``, ``gate_up_proj``), drawn
      directly so that no unfused copy ever exists. Quantized params
      (``optgqa_jax.quant``) hold a ``QuantizedLinear`` in place of a kernel or the LM
      head, and in place of the token table a ``QuantizedLinear`` of the transposed table,
      ``[D, V]`` (``QuantConfig.quantize_embedding``).
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    # Leaf by leaf from the abstract tree: no forward pass is traced or compiled, so an
    # 8B-parameter model initialises in seconds (flax's own init compiles the whole model).
    return init_abstract_leaves(abstract_params(cfg, fused), key)


def init_abstract_leaves(tree, key: jax.Array):
    """`tree` with every ``jax.ShapeDtypeStruct`` leaf drawn as :func:`init_params` draws it
    (normal, std 0.02; leaves named ``scale`` set to 1) and every other leaf kept as it is.

    For trees built partly by hand: e.g. :func:`abstract_params` with its linear kernels
    already replaced by random quantized layers, so that no float copy of them ever exists.
    Leaf ``i`` (in flattening order, quantized layers counted as one leaf) takes the key
    ``fold_in(key, i)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    values = []
    for i, (path, leaf) in enumerate(leaves):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            values.append(leaf)
        elif getattr(path[-1], "key", None) == "scale":  # RMSNorm scales start at 1
            values.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            values.append(_normal_leaf(jax.random.fold_in(key, i), leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal_leaf(key, shape, dtype):
    return _INIT(key, shape, dtype)


def abstract_params(cfg: ModelConfig, fused: bool = False) -> dict:
    """Shapes and dtypes of the parameters of `cfg` (jax.ShapeDtypeStruct leaves), no memory.

    ``fused=True`` gives the layout of ``optgqa_jax.fused`` instead.
    """
    # a fresh tree of containers each call (callers may edit it); the leaves are immutable
    return jax.tree_util.tree_map(lambda leaf: leaf, _abstract_params(cfg, bool(fused)))


@functools.lru_cache(maxsize=32)
def _abstract_params(cfg: ModelConfig, fused: bool) -> dict:
    # Tracing flax's init takes ~0.1 s per layer (3 s for a 30-layer model) and loaders,
    # checkpoint restores and init_params each ask for the same tree: trace it once per config.
    from optgqa_jax.model import Transformer   # the model imports this module
    tokens = jnp.zeros((1, 1), jnp.int32)
    tree = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens,
                                                        tokens)["params"])
    return jax.eval_shape(functools.partial(fuse_layers, cfg), tree) if fused else tree


def check_params_match(cfg: ModelConfig, params: dict, what: str = "params") -> None:
    """Raise ValueError listing every leaf whose path, shape or dtype differs from `cfg`'s.

    Either layout is accepted: unfused, or fused (``optgqa_jax.fused``).
    """
    expected = abstract_params(cfg, fused=is_fused(params))
    params = _logical_embedding(params)
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    flat_exp = {name(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_got = {name(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_kernel_leaf)[0]}
    problems = []
    for key in sorted(set(flat_exp) | set(flat_got)):
        if key not in flat_got:
            problems.append(f"{key}: missing")
        elif key not in flat_exp:
            problems.append(f"{key}: not part of this config")
        else:
            e, g = flat_exp[key], flat_got[key]
            if tuple(e.shape) != _shape(g):
                problems.append(f"{key}: shape {_shape(g)}, config expects {tuple(e.shape)}")
            elif jnp.dtype(e.dtype) != jnp.dtype(g.dtype):
                problems.append(f"{key}: dtype {g.dtype}, config expects {e.dtype}")
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ValueError(f"{what} do not match the config:\n  {shown}{more}")


def _logical_embedding(params):
    """`params` with a quantized token table (stored ``[D, V]``, as the LM head) stood in for by
    a ShapeDtypeStruct of the table's logical shape ``[V, D]``, for the structural checks.

    Raises:
      ValueError: a group-sparse token table (only dense ``QuantizedLinear`` tables are read).
    """
    table = params.get("embed", {}).get("embedding") if isinstance(params, dict) else None
    if table is None or not is_quantized(table):
        return params
    if not _is_dense_quantized(table):
        raise ValueError(f"embed/embedding is a {type(table).__name__}; a quantized token "
                         "table must be a dense QuantizedLinear (QuantConfig.quantize_embedding)")
    d, v = table.shape
    return {**params, "embed": {**params["embed"],
                                "embedding": jax.ShapeDtypeStruct((v, d), jnp.dtype(table.dtype))}}


def _shape(x) -> tuple:
    """Shape of a parameter leaf: an array, or a QuantizedLinear (its logical [D_in, D_out])."""
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


@functools.lru_cache(maxsize=64)
def _expected_leaves(cfg: ModelConfig, fused: bool):
    leaves, treedef = jax.tree_util.tree_flatten(abstract_params(cfg, fused))
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


def _check_params_fast(cfg: ModelConfig, params) -> None:
    """Cheap structural check on every call; the detailed report only on mismatch."""
    treedef, expected = _expected_leaves(cfg, is_fused(params))
    leaves, got_def = jax.tree_util.tree_flatten(_logical_embedding(params),
                                                 is_leaf=_is_kernel_leaf)
    if got_def != treedef or tuple((_shape(x), jnp.dtype(x.dtype)) for x in leaves) != expected:
        check_params_match(cfg, params)
        raise ValueError("params do not match the config (tree structure differs)")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_tokens(cfg: ModelConfig, tokens, name: str = "tokens") -> None:
    """Raise ValueError for a badly shaped token array or ids outside the vocabulary."""
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, seq_len], got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {tokens.dtype}")
    if _is_concrete(tokens) and tokens.size:
        # A batch spread over several processes: each checks the rows it holds.
        shards = (tokens.addressable_shards if not getattr(tokens, "is_fully_addressable", True)
                  else None)
        host = (np.concatenate([np.asarray(s.data).ravel() for s in shards]) if shards
                else np.asarray(tokens))
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains id {bad}, outside the vocabulary "
                             f"[0, vocab_size={cfg.vocab_size})")
