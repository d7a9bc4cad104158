"""WeightsLeftLinear: a dense quantized layer with its packed words stored transposed, the
serving layout of the weights-left kernel (``pallas_kernels.quant_matmul_wl``).

:class:`~optgqa_jax.quant.QuantizedLinear` keeps the GPTQ layout, ``qweight`` int32
[D_in * b / 32, D_out]. The weights-left kernel multiplies ``dequant(W)^T x^T``, the weight
tile as the tensor-core instruction's register operand, and reads each program's words as
rows of ``qweight.T`` [D_out, D_in * b / 32]. :func:`to_weights_left` transposes the words
once per layer (the same words, scales and zero points: no byte is added) and
:func:`to_weights_left_params` does it for every layer the kernel takes; the model then
multiplies with :func:`weights_left_matmul`.

An option for experiments, not the default: on an H100 (commit 114cfd3) the kernel on its
rules' tiles was slower than ``quant.matmul``'s at 1 and 16 rows and a little faster at 64
(``experiments/results/h100/quant/quant_wl_probe_114cfd3.md``).

It is a runtime layout, like ``optgqa_jax.sparse.GroupMajorLinear``: checkpoints store the
GPTQ form (convert after loading), and it is not shardable. Layers the kernel does not take
(3 or 8 bits with bfloat16 activations, group sizes below ``16 * 32 / bits``, act-order rows
not sorted by group) stay ``QuantizedLinear``.

Axis legend: K = D_in, N = D_out, G groups, P = 32 / bits codes per int32 word.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from optgqa_jax.quant.linear import QuantizedLinear, is_quantized


@flax.struct.dataclass
class WeightsLeftLinear:
    """A dense quantized layer with its words transposed (module docstring); a pytree."""

    qweight_t: jax.Array   # int32 [N, K * bits / 32]
    scales: jax.Array      # [G, N]
    zeros: jax.Array       # uint8 [G, N]
    # None, or int32 [K]: act-order rows sorted by group (QuantizedLinear.perm): stored row i
    # is logical input row perm[i], so the product reads x[..., perm]
    perm: Optional[jax.Array] = None
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    sym: bool = flax.struct.field(pytree_node=False, default=True)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight shape (D_in, D_out)."""
        return (self.qweight_t.shape[1] * 32 // self.bits, self.qweight_t.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes stored (words, scales, zeros, and perm where present)."""
        arrays = (self.qweight_t, self.scales, self.zeros) + (
            () if self.perm is None else (self.perm,))
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def is_weights_left(x) -> bool:
    """Whether `x` is a :class:`WeightsLeftLinear` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, WeightsLeftLinear)


def unsupported_reason(ql: QuantizedLinear) -> Optional[str]:
    """Why the weights-left kernel cannot take `ql` (None: it can), for the model's dtype."""
    from pallas_kernels.quant_codes import code_pattern
    from pallas_kernels.quant_matmul_wl import tile_rows
    dtype = jnp.dtype(ql.dtype)
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"activations in {dtype.name} (the kernel takes bfloat16 or float16)"
    if ql.bits not in (2, 4, 8) or code_pattern(dtype, ql.bits) is None:
        return f"{ql.bits}-bit codes with {dtype.name} activations"
    K = ql.shape[0]
    bk = tile_rows(ql.bits)
    if K % bk:
        return f"D_in={K} is not a multiple of the kernel's K tile ({bk})"
    if ql.group_size != -1 and ql.group_size % bk:
        return f"group_size={ql.group_size} is not a multiple of {bk}"
    if not ql.groups_contiguous and ql.perm is None:
        return "act-order groups not sorted (quant.sort_groups first)"
    return None


def to_weights_left(ql: QuantizedLinear, name: str = "layer") -> WeightsLeftLinear:
    """Transpose `ql`'s words once (:class:`WeightsLeftLinear`).

    Raises:
      ValueError: `ql` is not a ``QuantizedLinear``, or a format the kernel does not take
        (naming `name` and the reason).
    """
    if not is_quantized(ql):
        raise ValueError(f"{name} must be a QuantizedLinear, got {type(ql).__name__}")
    reason = unsupported_reason(ql)
    if reason is not None:
        raise ValueError(f"{name}: the weights-left kernel does not take {reason}")
    from pallas_kernels.quant_matmul_wl import transpose_words
    return WeightsLeftLinear(qweight_t=transpose_words(ql.qweight), scales=ql.scales,
                             zeros=ql.zeros, perm=ql.perm, bits=ql.bits,
                             group_size=ql.group_size, sym=ql.sym, dtype=ql.dtype)


def to_weights_left_params(params):
    """`params` with every ``QuantizedLinear`` the kernel takes replaced by its
    :func:`to_weights_left` layout (others, and float leaves, unchanged). A quantized token
    table (``QuantConfig.quantize_embedding``, stored [D, V] and looked up by column) stays
    as it is."""
    def convert(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        if not is_quantized(leaf) or "embed" in names or unsupported_reason(leaf):
            return leaf
        return to_weights_left(leaf, "/".join(names))
    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_quantized)


def dequantize_weights_left(w: WeightsLeftLinear, dtype=None) -> jax.Array:
    """The float weight [K, N] in logical row order (jnp; traceable)."""
    from pallas_kernels.quant_codes import unpack_codes
    K, N = w.shape
    codes = unpack_codes(w.qweight_t.T, w.bits, K)                           # [K, N] stored rows
    gs = K if w.group_size == -1 else w.group_size
    s = jnp.repeat(w.scales.astype(jnp.float32), gs, 0)
    z = jnp.repeat(w.zeros.astype(jnp.float32), gs, 0)
    dense = (codes.astype(jnp.float32) - z) * s                                # stored rows
    if w.perm is not None:
        dense = dense[jnp.argsort(w.perm)]
    return dense.astype(jnp.dtype(dtype or w.dtype))


def weights_left_matmul(x: jax.Array, w: WeightsLeftLinear, impl: str = "auto",
                        out_dtype=None) -> jax.Array:
    """``x @ dequantize_weights_left(w)`` for x [..., K], in ``out_dtype`` (default x's).

    ``impl``: ``"pallas"`` runs ``pallas_kernels.quant_matmul_wl`` (interpret mode on a
    CPU), ``"dequantize"`` builds the float weight and multiplies, ``"auto"`` the kernel on
    GPUs for bfloat16/float16 x and the float weight elsewhere. Any number of rows: the
    kernel's tiles come from ``WeightsLeftConfig.for_shape``.
    """
    from pallas_kernels import _common as kc
    from pallas_kernels.quant_matmul_wl import WeightsLeftConfig, quant_matmul_wl
    if impl not in ("auto", "pallas", "dequantize"):
        raise ValueError(f"impl={impl!r} must be 'auto', 'pallas' or 'dequantize'")
    K, N = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last axis must be D_in={K}, got shape {tuple(x.shape)}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    on_gpu = kc.backend() != "cpu"
    kernel = (impl == "pallas" or (impl == "auto" and on_gpu)) and x.dtype in (
        jnp.bfloat16, jnp.float16)
    if not kernel:
        y = jnp.dot(x, dequantize_weights_left(w, x.dtype), preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if w.perm is not None:
        x2 = x2[:, w.perm]
    cfg = WeightsLeftConfig.for_shape(kc.backend(), x2.shape[0], K, N)
    y = quant_matmul_wl(x2, w.qweight_t, w.scales, w.zeros, bits=w.bits,
                        group_size=w.group_size, config=cfg, interpret=not on_gpu)
    return y.reshape(*lead, N).astype(out_dtype)
