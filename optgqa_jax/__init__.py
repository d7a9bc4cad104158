"""optgqa-jax: grouped-query attention, paged KV memory and quantization for LLM inference in JAX.

Typical use::

    import optgqa_jax as og

    cfg, params, tok = og.load_pretrained("smollm2-135m")
    logits = og.forward(cfg, params, [tok.encode("Hello")])        # [1, T, vocab] float32
    ids = og.generate_simple(cfg, params, tok.encode("The capital of France is"), 16)
    print(tok.decode(ids))
"""

from pallas_kernels.alibi import alibi_slopes

from optgqa_jax import quant
from optgqa_jax.attention import attention, attention_reference
from optgqa_jax.checkpoint import load_checkpoint, load_quant_config, save_checkpoint
from optgqa_jax.config import PRESETS, ModelConfig
from optgqa_jax.engine import Completion, Engine, EngineConfig, EngineStats, SamplingParams
from optgqa_jax.evaluate import perplexity, token_nll
from optgqa_jax.fused import fuse_projections
from optgqa_jax.generate import generate_simple
from optgqa_jax.grouping import GroupingReport, convert_to_gqa, expand_to_mha
from optgqa_jax.grouping.uptrain import uptrain
from optgqa_jax.gguf_loader import load_gguf, load_pretrained
from optgqa_jax.hf_loader import load_hf_llama
from optgqa_jax.quant import QuantConfig, QuantizedLinear, quantize
from optgqa_jax.model import (KVCache, Transformer, abstract_params, forward, forward_with_cache,
                              init_params)
from optgqa_jax.registry import LoadedModel, load_model
from optgqa_jax.sampling import row_keys, sample
from optgqa_jax.train import TrainConfig, TrainResult, train
from optgqa_jax.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "alibi_slopes", "attention", "attention_reference", "load_checkpoint", "load_quant_config",
    "save_checkpoint",
    "PRESETS", "ModelConfig", "perplexity", "token_nll", "generate_simple", "load_gguf",
    "load_pretrained", "load_hf_llama", "KVCache", "Transformer", "abstract_params", "forward",
    "forward_with_cache", "init_params", "LoadedModel", "load_model", "row_keys", "sample",
    "BPETokenizer", "ByteTokenizer", "Tokenizer", "Completion", "Engine", "EngineConfig",
    "EngineStats", "SamplingParams", "fuse_projections", "quant", "QuantConfig",
    "QuantizedLinear", "quantize", "GroupingReport", "convert_to_gqa", "expand_to_mha",
    "uptrain", "TrainConfig", "TrainResult", "train",
]
