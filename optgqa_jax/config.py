"""Model architecture configuration.

`ModelConfig` holds architecture fields only; everything derived from them is a
property. It is frozen and hashable, so it can be a static argument of
``jax.jit``.

The query-head -> KV-head map
-----------------------------
Grouped-query attention (GQA) lets several query heads share one key/value
head. ``kv_head_map`` makes that sharing explicit, per layer: entry ``h`` of a
layer's tuple is the KV head that query head ``h`` reads. The default
(``kv_head_map=None``) is the usual contiguous grouping, query head ``h`` reads
KV head ``h // (n_heads // n_kv_heads)``; MHA (``n_kv_heads == n_heads``) and
MQA (``n_kv_heads == 1``) are its two ends. A model converted from MHA with a
similarity-based grouping (the Opt-GQA "dynamic grouping") carries an arbitrary
map, possibly different in every layer and with groups of unequal size.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Optional

import jax.numpy as jnp
import numpy as np

Position = Literal["rope", "alibi", "none"]

_DTYPES = ("float32", "bfloat16", "float16")
_POSITIONS = ("rope", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder.

    Attributes:
      vocab_size: number of token ids; valid ids are ``0 .. vocab_size - 1``.
      d_model: residual stream width D.
      n_layers: number of transformer blocks.
      n_heads: number of query heads N.
      n_kv_heads: number of key/value heads K (1 <= K <= N).
      head_dim: per-head width H (need not equal d_model / n_heads).
      ffn_dim: hidden width of the SwiGLU MLP.
      norm_eps: RMSNorm epsilon.
      position: ``"rope"`` (rotary, Hugging Face half-split convention),
        ``"alibi"`` (linear biases per query head, no positional embedding) or
        ``"none"``.
      rope_theta: RoPE base frequency (ignored unless ``position == "rope"``).
      tie_embeddings: if true the LM head reuses the token embedding matrix.
      dtype: parameter and activation dtype, ``"float32"``, ``"bfloat16"`` or
        ``"float16"``. Norms, softmax and logits are always float32.
      max_seq_len: longest sequence (prompt plus generated tokens) accepted.
      kv_head_map: ``None`` for contiguous equal groups, or one tuple per layer
        of ``n_heads`` KV-head indices (see the module docstring).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    position: Position = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: str = "float32"
    max_seq_len: int = 2048
    kv_head_map: Optional[tuple[tuple[int, ...], ...]] = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads > self.n_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads ({self.n_kv_heads}) must not exceed n_heads ({self.n_heads})")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"ModelConfig.norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.position not in _POSITIONS:
            raise ValueError(f"ModelConfig.position must be one of {_POSITIONS}, got {self.position!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"ModelConfig.rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.kv_head_map is None:
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                    f"({self.n_kv_heads}) for the default contiguous grouping; pass kv_head_map "
                    "for any other grouping")
        else:
            # Normalise lists (e.g. from JSON) to tuples so the config stays hashable.
            try:
                layers = tuple(tuple(int(k) for k in layer) for layer in self.kv_head_map)
            except TypeError as e:
                raise ValueError(
                    "ModelConfig.kv_head_map must be None or a sequence of per-layer sequences "
                    f"of ints, got {self.kv_head_map!r}") from e
            object.__setattr__(self, "kv_head_map", layers)
            if len(layers) != self.n_layers:
                raise ValueError(
                    f"ModelConfig.kv_head_map has {len(layers)} layers, expected n_layers={self.n_layers}")
            for i, layer in enumerate(layers):
                if len(layer) != self.n_heads:
                    raise ValueError(
                        f"ModelConfig.kv_head_map[{i}] has {len(layer)} entries, expected "
                        f"n_heads={self.n_heads}")
                if any(k < 0 or k >= self.n_kv_heads for k in layer):
                    raise ValueError(
                        f"ModelConfig.kv_head_map[{i}] = {layer} has entries outside "
                        f"[0, n_kv_heads={self.n_kv_heads})")
                if len(set(layer)) != self.n_kv_heads:
                    unused = sorted(set(range(self.n_kv_heads)) - set(layer))
                    raise ValueError(
                        f"ModelConfig.kv_head_map[{i}] leaves KV heads {unused} unused; every KV "
                        "head must serve at least one query head")

    # ----------------------------------------------------------------- derived
    @property
    def group_size(self) -> int:
        """Query heads per KV head under the default contiguous grouping (N // K)."""
        return self.n_heads // self.n_kv_heads

    @property
    def jnp_dtype(self):
        """The parameters' and activations' dtype as a ``jnp.dtype``."""
        return jnp.dtype(self.dtype)

    def layer_kv_head_map(self, layer: int) -> tuple[int, ...]:
        """The query-head -> KV-head map of one layer (length n_heads)."""
        if self.kv_head_map is None:
            return tuple(h // self.group_size for h in range(self.n_heads))
        return self.kv_head_map[layer]

    def has_contiguous_groups(self, layer: int) -> bool:
        """True if the layer's map equals the default contiguous equal grouping."""
        if self.n_heads % self.n_kv_heads:
            return False
        g = self.n_heads // self.n_kv_heads
        return self.layer_kv_head_map(layer) == tuple(h // g for h in range(self.n_heads))

    @property
    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        d, h = self.d_model, self.head_dim
        attn = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * per_layer + embed + head + d

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V cache one token occupies across all layers, in `dtype`."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.jnp_dtype.itemsize

    # ------------------------------------------------------------- conversions
    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict (``kv_head_map`` as lists)."""
        d = dataclasses.asdict(self)
        if d["kv_head_map"] is not None:
            d["kv_head_map"] = [list(layer) for layer in d["kv_head_map"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A config from :meth:`to_dict`'s dict; unknown keys raise ``ValueError``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        """The config as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """A config from :meth:`to_json`'s text."""
        return cls.from_dict(json.loads(text))

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named architecture, optionally with fields overridden.

        Presets: ``"tiny"`` (float32, 2 layers, GQA 4/2, for tests),
        ``"tiny-alibi"``, ``"smollm2-135m"``, ``"llama3-8b"`` (32 query / 8 KV
        heads), ``"llama3-8b-mha"`` (its MHA twin, 32 / 32) and ``"llama3-70b"`` (64 query
        / 8 KV heads, 80 layers: 70.6B parameters, for tensor-parallel serving).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=258, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 ffn_dim=128, position="rope", rope_theta=10000.0, dtype="float32",
                 max_seq_len=256),
    "tiny-alibi": dict(vocab_size=258, d_model=64, n_layers=2, n_heads=6, n_kv_heads=2,
                       head_dim=16, ffn_dim=128, position="alibi", dtype="float32",
                       max_seq_len=256),
    "smollm2-135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, ffn_dim=1536, norm_eps=1e-5, position="rope",
                         rope_theta=100000.0, tie_embeddings=True, dtype="float32",
                         max_seq_len=8192),
    "llama3-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, ffn_dim=14336, norm_eps=1e-5, position="rope",
                      rope_theta=500000.0, tie_embeddings=False, dtype="bfloat16",
                      max_seq_len=8192),
    "llama3-70b": dict(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       head_dim=128, ffn_dim=28672, norm_eps=1e-5, position="rope",
                       rope_theta=500000.0, tie_embeddings=False, dtype="bfloat16",
                       max_seq_len=8192),
    "llama3-8b-mha": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                          n_kv_heads=32, head_dim=128, ffn_dim=14336, norm_eps=1e-5,
                          position="rope", rope_theta=500000.0, tie_embeddings=False,
                          dtype="bfloat16", max_seq_len=8192),
}
