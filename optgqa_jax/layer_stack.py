"""Layer-stacked serving params: one argument buffer per weight kind for all layers.

Launching a jitted program costs the host time for every argument buffer (an H100 with jax
0.11.2: 1.77 µs each, ``experiments/results/h100/batch1/dispatch_cost_1e1715e.md``), and a
batch-1 decode step of a 4-bit Llama-3-8B takes 517 of them: 3.6 ms of dispatch against 3.5 ms
of kernels on the device (``experiments/results/h100/batch1/profile_batch1_w4g128_544c0a0.md``),
so the step is bound by the host. Most of those buffers are the same few arrays once per layer.

:func:`stack_layers` (host side, once) stacks every per-layer leaf that a step can read in place
into one ``[L, ...]`` array (L = the model's layers), under the key :data:`STACKED`:

* dense ``QuantizedLinear`` layers with contiguous groups (its ``qweight``, ``scales``, ``zeros``
  and ``g_idx`` each stacked): the dequantizing kernel takes the stack and the layer's index
  (``pallas_kernels.quant_matmul.quant_matmul``'s ``layer``);
* ``PackedBSRLinear`` layers (``optgqa_jax.sparse.packed``): likewise
  (``bsr_quant_matmul_packed``'s ``layer``);
* one-dimensional arrays (the norm scales): a static slice of the stack, which XLA fuses into
  the norm.

Other leaves (float kernels, BSR layers as four arrays, group-major layers) stay per layer: a
slice of a stack handed to a library matmul or a kernel without a ``layer`` argument could be
copied on every call. Inside the jitted program, :func:`layer_views` rebuilds the tree the
model expects, with each stacked quantized layer as a :class:`LayerView` (the stack and the
layer's index); the model's linear layers multiply by it (:func:`layer_matmul`): through the
kernel's ``layer`` argument where the kernel runs, and through the layer's own slice of the
stack on the other routes (a jnp dequantization on CPUs, which XLA fuses with the slice). On
GPUs, products of more than 64 rows (prefill) take the streaming dequantize kernel, whose
operands are the slice's own buffers, so XLA may copy the layer's packed codes, scales and zero
points (a quarter of the bfloat16 bytes that kernel writes) once per call; not measured. The
stacking is meant for decode-bound serving (batch 1 and small batches), where it removes launch
work. Measured on an H100 (0b38b02,
``experiments/results/h100/batch1/bench_quant_batch1_stacked_0b38b02.md``) the engine's
batch-1 W4 decode, which runs with command buffers, did not get faster (282 against 291
tokens/s; 294 against 292 with the LM head and token table quantized): the host replays one
graph per step there, and the step's time is its kernels'.

``EngineConfig(stack_layers=True)`` serves a model this way. The stacked arrays are a copy:
drop other references to the unstacked params to free theirs.

Axis legend: L layers; the other axes as in each leaf's own layout.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

STACKED = "stacked_layers"     # the key of the stacked leaves in a stacked params tree


@flax.struct.dataclass
class LayerView:
    """Layer ``layer`` of a stacked quantized layer: ``stack`` is a ``QuantizedLinear`` or a
    ``PackedBSRLinear`` whose arrays carry a leading layer axis [L, ...]."""

    stack: Any
    layer: int = flax.struct.field(pytree_node=False, default=0)


def is_layer_view(x) -> bool:
    """Whether `x` is a :class:`LayerView` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, LayerView)


def take_layer(stack, layer):
    """Layer `layer` of a stacked leaf (a pytree whose array leaves carry a leading layer axis):
    the same type with each array sliced, static fields kept."""
    return jax.tree_util.tree_map(lambda a: a[layer], stack)


def layer_matmul(x: jax.Array, view: LayerView, impl: str = "auto") -> jax.Array:
    """``x @ W`` for the layer `view` names, in x's dtype: ``optgqa_jax.quant.matmul`` or
    ``optgqa_jax.sparse.packed_bsr_matmul`` (same ``impl``) with the stack and its index."""
    from optgqa_jax.quant.linear import is_quantized, matmul
    from optgqa_jax.sparse.packed import is_packed_bsr, packed_bsr_matmul
    if is_quantized(view.stack):
        return matmul(x, view.stack, impl, layer=view.layer)
    if is_packed_bsr(view.stack):
        return packed_bsr_matmul(x, view.stack, impl, layer=view.layer)
    raise ValueError(f"a LayerView holds a QuantizedLinear or a PackedBSRLinear stack, got "
                     f"{type(view.stack).__name__}")


def _leaves(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) of a nested mapping; a leaf is anything that is not a mapping."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _get(tree: Mapping, path: tuple):
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _without(tree: Mapping, paths: set, prefix: tuple = ()) -> dict:
    """A copy of the nested mapping `tree` without the leaves at `paths` (empty mappings that
    held only removed leaves are dropped)."""
    out = {}
    for k, v in tree.items():
        path = prefix + (k,)
        if isinstance(v, Mapping):
            sub = _without(v, paths, path)
            if sub or not any(p[:len(path)] == path for p in paths):
                out[k] = sub
        elif path not in paths:
            out[k] = v
    return out


def _with(tree: Mapping, path: tuple, leaf) -> dict:
    """A copy of `tree` with `leaf` at `path` (mappings along the path copied, made if absent)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = leaf
    else:
        out[path[0]] = _with(tree.get(path[0], {}), path[1:], leaf)
    return out


def _array_key(a) -> tuple:
    return (tuple(a.shape), jnp.dtype(a.dtype).name)


def _struct_key(leaf) -> tuple:
    """The static fields, tree structure and array shapes of a quantized layer."""
    arrays, treedef = jax.tree_util.tree_flatten(leaf)
    return (type(leaf), treedef, tuple(_array_key(a) for a in arrays))


def stackable(leaves: list) -> bool:
    """Whether the per-layer leaves `leaves` (one per layer, same path) can be served stacked:
    all dense ``QuantizedLinear`` with contiguous groups and no stored permutation, or all
    ``PackedBSRLinear``, of one layout and shape; or all one-dimensional arrays of one shape
    and dtype."""
    from optgqa_jax.quant.linear import is_quantized
    from optgqa_jax.sparse.packed import is_packed_bsr
    first = leaves[0]
    if is_quantized(first):
        if not all(is_quantized(l) and l.groups_contiguous and l.perm is None for l in leaves):
            return False
    elif not is_packed_bsr(first):
        if not all(isinstance(l, (jax.Array, np.ndarray)) and np.ndim(l) == 1 for l in leaves):
            return False
        return len({_array_key(l) for l in leaves}) == 1
    return len({_struct_key(l) for l in leaves}) == 1


def stack_layers(params: Mapping, n_layers: int) -> dict:
    """`params` (a model's params: ``layer_0`` ... ``layer_{L-1}`` subtrees and the others)
    with every per-layer leaf that :func:`stackable` takes moved into one stacked leaf under
    ``params[STACKED]["attn/qkv_proj/kernel"]`` (its path within a layer), and removed from the
    layers. Host side, once; the stacks are new arrays. Leaves at a path that some layer lacks,
    or that differ between layers, stay per layer.

    Raises:
      ValueError: `params` is already stacked, or lacks one of the ``layer_{i}`` subtrees.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping of the model's params, got "
                         f"{type(params).__name__}")
    if STACKED in params:
        raise ValueError("params are already stacked (they hold the key "
                         f"{STACKED!r})")
    names = [f"layer_{i}" for i in range(n_layers)]
    missing = [n for n in names if not isinstance(params.get(n), Mapping)]
    if missing:
        raise ValueError(f"params lack the layer subtrees {missing[:3]} (n_layers={n_layers})")
    layers = [params[n] for n in names]
    stacked = {}
    for path, _ in _leaves(layers[0]):
        leaves = [_get(l, path) for l in layers]
        if any(l is None for l in leaves) or not stackable(leaves):
            continue
        stacked[path] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *leaves)
    out = {k: v for k, v in params.items() if k not in names}
    for n, l in zip(names, layers):
        out[n] = _without(l, set(stacked))
    out[STACKED] = {"/".join(p): s for p, s in stacked.items()}
    return out


def is_stacked(params) -> bool:
    """Whether `params` came from :func:`stack_layers`."""
    return isinstance(params, Mapping) and STACKED in params


def layer_views(params: Mapping, n_layers: int) -> dict:
    """The per-layer params tree the model takes, from :func:`stack_layers`' tree (traceable:
    call it inside the jitted program that takes the stacked tree): each stacked quantized
    layer becomes a :class:`LayerView` of its stack, each stacked one-dimensional array its
    layer's row."""
    from optgqa_jax.quant.linear import is_quantized
    from optgqa_jax.sparse.packed import is_packed_bsr
    stacked = params[STACKED]
    out = {k: v for k, v in params.items() if k != STACKED}
    for i in range(n_layers):
        layer = out[f"layer_{i}"]
        for key, s in stacked.items():
            leaf = LayerView(s, i) if is_quantized(s) or is_packed_bsr(s) else s[i]
            layer = _with(layer, tuple(key.split("/")), leaf)
        out[f"layer_{i}"] = layer
    return out


def argument_buffers(params) -> int:
    """The number of array leaves of `params`: the argument buffers a jitted program that takes
    it receives (None leaves, e.g. an absent permutation, are not buffers)."""
    return len(jax.tree_util.tree_leaves(params))
