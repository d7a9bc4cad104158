"""Output-major float kernels: a projection's weight stored ``[D_out, D_in]`` for serving.

The model's float projections are stored input-major (``kernel`` [D_in, D_out], ``x @ kernel``).
The same product with the weight stored transposed, ``x @ kernel_t.T``, is one
``dot_general`` contracting both operands' last axis; cuBLAS then picks from its ``T..``
(transposed-operand) algorithms. On an H100 (jax 0.11.2, commit 5b427eb,
``experiments/results/h100/step_gemms_5b427eb/product_probe_5b427eb.md``) the fused gate/up
product ``[4096, 28672]`` with a bfloat16 result took 174.3 against 177.8 µs at 482 rows and
1,397.8 against 1,472.5 µs at 4,096 rows stored that way, q/k/v 281.7 against 293.4 µs at
4,096 rows; o and down were no faster. The engine can serve chosen projections in this layout
(``EngineConfig.output_major``); the function computed is the same.

:class:`OutputMajorKernel` is a pytree holding the transposed array; ``shape`` and ``dtype``
report the logical ``[D_in, D_out]`` kernel, as ``QuantizedLinear`` does, so parameter checks
and byte counts read it as the kernel it stands for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# the projections of a layer (unfused and fused names) and the untied LM head (``lm_head``
# [D, V], a top-level leaf) that may be stored output-major
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj",
               "gate_up_proj", "down_proj", "lm_head")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutputMajorKernel:
    """A float projection kernel stored transposed.

    Attributes:
      kernel_t: [D_out, D_in] float array, the kernel's transpose.
    """

    kernel_t: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        """The logical kernel's shape ``(D_in, D_out)``."""
        d_out, d_in = self.kernel_t.shape
        return (d_in, d_out)

    @property
    def dtype(self):
        return self.kernel_t.dtype


def is_output_major(x) -> bool:
    """Whether a kernel leaf is an :class:`OutputMajorKernel`."""
    return isinstance(x, OutputMajorKernel)


def to_output_major(kernel: jax.Array) -> OutputMajorKernel:
    """The output-major form of a float kernel [D_in, D_out] (a new, transposed array; for a
    shape-only ``jax.ShapeDtypeStruct``, the transposed shape, so that an abstract tree such
    as ``model.abstract_params`` can be drawn output-major from the start).

    Raises:
      ValueError: `kernel` is not a 2-D float array.
    """
    if not hasattr(kernel, "ndim") or kernel.ndim != 2 or \
            not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"an output-major kernel is made from a 2-D float array [D_in, D_out], "
                         f"got {type(kernel).__name__} "
                         f"{getattr(kernel, 'shape', '')} {getattr(kernel, 'dtype', '')}")
    if isinstance(kernel, jax.ShapeDtypeStruct):
        return OutputMajorKernel(jax.ShapeDtypeStruct(kernel.shape[::-1], kernel.dtype))
    return OutputMajorKernel(jnp.asarray(kernel).T)


def matmul(x: jax.Array, kernel: OutputMajorKernel) -> jax.Array:
    """``x @ kernel_t.T``: x [..., D_in] -> [..., D_out] in x's dtype (the kernel cast to it)."""
    w_t = kernel.kernel_t.astype(x.dtype)                                  # [D_out, D_in]
    return jax.lax.dot_general(x, w_t, (((x.ndim - 1,), (1,)), ((), ())))


def check_projection_names(names: Sequence[str], what: str = "output_major") -> tuple[str, ...]:
    """`names` as a tuple, each one of :data:`PROJECTIONS`, without repeats.

    Raises:
      ValueError: naming `what`, for a name outside :data:`PROJECTIONS`, a repeat, or a plain
        string (which would be read letter by letter).
    """
    if isinstance(names, str):
        raise ValueError(f"{what} must be a sequence of projection names, got the string "
                         f"{names!r} (write ({names!r},))")
    names = tuple(names)
    for n in names:
        if n not in PROJECTIONS:
            raise ValueError(f"{what}: {n!r} is not a projection; expected names from "
                             f"{PROJECTIONS}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names a projection twice: {names}")
    return names


def _is_float_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jnp.issubdtype(x.dtype,
                                                                             jnp.floating)


def output_major_params(params: dict, names: Sequence[str]) -> dict:
    """A copy of the model's `params` with the float kernels of the projections in `names`
    (e.g. ``("gate_up_proj",)``, in every layer; ``"lm_head"``: the untied head) stored
    output-major. Quantized kernels and
    projections not named are kept as they are (shared, not copied).

    Raises:
      ValueError: a name outside :data:`PROJECTIONS`, or a named projection that no layer of
        `params` has as a float kernel (e.g. ``"gate_up_proj"`` on unfused params, or
        ``"lm_head"`` with tied embeddings).
    """
    names = check_projection_names(names)
    found = set()
    out = dict(params)
    head = params.get("lm_head")
    if "lm_head" in names and (is_output_major(head) or _is_float_array(head)):
        out["lm_head"] = head if is_output_major(head) else to_output_major(head)
        found.add("lm_head")
    for key, layer in params.items():
        if not key.startswith("layer_"):
            continue
        layer = dict(layer)
        for part in ("attn", "mlp"):
            mods = dict(layer.get(part, {}))
            for n in names:
                kernel = mods.get(n, {}).get("kernel")
                if is_output_major(kernel):
                    found.add(n)
                elif _is_float_array(kernel):
                    mods[n] = {**mods[n], "kernel": to_output_major(kernel)}
                    found.add(n)
            if part in layer:
                layer[part] = mods
        out[key] = layer
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"output_major: no layer has a float kernel for {missing} (fused names "
                         "need fused params, unfused names unfused ones; quantized kernels keep "
                         "their own layout)")
    return out
