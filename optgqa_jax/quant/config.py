"""QuantConfig: every setting of weight quantization, frozen and hashable (a static jit argument)."""

from __future__ import annotations

import dataclasses
import json

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize the weights of linear layers.

    Attributes:
      bits: code width, one of 2, 3, 4, 8.
      group_size: input rows that share one scale and zero point; -1 for one group
        spanning all of a layer's inputs (one grid per output channel). Must divide
        each quantized layer's input dimension.
      sym: symmetric grid (zero point fixed at ``2**(bits-1)``) instead of asymmetric min-max.
      act_order: GPTQ's "act-order" / ``desc_act``: quantize inputs in order of decreasing
        Hessian diagonal; groups are formed in that order and ``g_idx`` records them.
      static_groups: compute every group's grid from the unquantized weights before GPTQ
        starts (groups stay in the original row order even with ``act_order``, so
        ``g_idx`` is monotone and a kernel needs no reordering).
      damp: relative dampening, ``damp * mean(diag H)`` is added to the Hessian diagonal
        (the reference implementation's ``percdamp``).
      block_size: columns per lazy batch update (the reference's ``blocksize``).
      max_damp_tries: how often the dampening is multiplied by 10 when the Cholesky
        factorisation fails before the layer is reported as not positive definite.
      scale_dtype: dtype of the stored scales. float16 is what the Hugging Face GPTQ
        format stores; the scale is rounded to it as soon as it is found, so the codes
        are computed with the very scale that is stored.
      grad_hessian: weight each calibration token's contribution to a layer's Hessian by
        the squared norm of the next-token loss gradient with respect to that layer's
        output (see ``optgqa_jax.quant.calibration``).
      learn_scales: after GPTQ, train the per-group scales with optax against the
        layer-output reconstruction error (straight-through rounding).
      learn_steps, learn_lr: optimisation steps and Adam learning rate of ``learn_scales``.
      quantize_lm_head: also quantize the LM head (an untied one, by the method asked for,
        calibrated on the final norm's outputs).
      quantize_embedding: also quantize the token embedding table, by round-to-nearest with
        this grid (a lookup's error is the row's own error: GPTQ with the identity Hessian is
        RTN). The table is stored as the LM head is, a ``[D, V]`` ``QuantizedLinear`` whose
        groups run along the model dimension; a lookup dequantizes only the looked-up
        columns (:func:`optgqa_jax.quant.linear.lookup_columns`). A tied LM head shares the
        quantized table. The blocks are then calibrated on the quantized table's outputs.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    max_damp_tries: int = 6
    scale_dtype: str = "float16"
    grad_hessian: bool = False
    learn_scales: bool = False
    learn_steps: int = 200
    learn_lr: float = 5e-3
    quantize_lm_head: bool = False
    quantize_embedding: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; expected one of {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size >= 1):
            raise ValueError(f"group_size={self.group_size!r} must be -1 (one group per output "
                             "channel) or a positive integer")
        if not (0.0 <= self.damp < 1e3):
            raise ValueError(f"damp={self.damp!r} must be a non-negative number (0.01 is usual)")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive integer")
        if self.max_damp_tries < 1:
            raise ValueError(f"max_damp_tries={self.max_damp_tries!r} must be >= 1")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r}; expected one of {SCALE_DTYPES}")
        if self.learn_steps < 1 or not self.learn_lr > 0:
            raise ValueError(f"learn_steps={self.learn_steps!r} must be >= 1 and "
                             f"learn_lr={self.learn_lr!r} > 0")

    @property
    def maxq(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def check_layer(self, d_in: int, name: str = "layer") -> None:
        """Raise ValueError when this config cannot quantize a layer of `d_in` inputs."""
        if self.group_size != -1 and d_in % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the input dimension "
                             f"D_in={d_in} of {name}")
        per_word = 32 if self.bits == 3 else 32 // self.bits
        if d_in % per_word:
            raise ValueError(f"{name}: D_in={d_in} must be a multiple of {per_word} to pack "
                             f"{self.bits}-bit codes into int32 words")

    def groups(self, d_in: int) -> int:
        """Number of groups of a layer with `d_in` inputs."""
        return 1 if self.group_size == -1 else d_in // self.group_size

    def grid_only(self) -> "QuantConfig":
        """This config with every field that does not shape the quantization grid or GPTQ's
        loop reset to its default: the key under which jitted kernels are compiled, so that
        runs differing only in damping or in the calibration parts share one compile."""
        keep = ("bits", "group_size", "sym", "static_groups", "block_size", "scale_dtype")
        return QuantConfig(**{name: getattr(self, name) for name in keep})

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """A config from :meth:`to_dict`'s dict; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def tag(self) -> str:
        """Short name such as ``w4g128`` or ``w3g-1-act``."""
        return (f"w{self.bits}g{self.group_size}" + ("" if self.sym else "-asym")
                + ("-act" if self.act_order else "") + ("-static" if self.static_groups else ""))
