"""GGUF loading and the bundled SmolLM2-135M-Instruct."""

import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax.gguf_loader import pretrained_path, unpermute_rotary_rows

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It began as a small "
    "fishing village on the banks of the river, and over the centuries it grew into one of "
    "the largest trading ports in Europe. Today it is known for its museums, its old bridges "
    "and its lively markets, which attract millions of visitors every year."
)


def _llama_cpp_permute(w, n_heads):
    """llama.cpp's conversion (HF half-split -> interleaved), written out independently."""
    out = np.empty_like(w)
    head_dim = w.shape[0] // n_heads
    for h in range(n_heads):
        block = w[h * head_dim:(h + 1) * head_dim]
        first, second = block[: head_dim // 2], block[head_dim // 2:]
        inter = np.empty_like(block)
        inter[0::2], inter[1::2] = first, second
        out[h * head_dim:(h + 1) * head_dim] = inter
    return out


@pytest.mark.parametrize("n_heads,head_dim", [(9, 64), (3, 64), (2, 8)])
def test_unpermute_inverts_llama_cpp_permutation(rng, n_heads, head_dim):
    w = rng.standard_normal((n_heads * head_dim, 5))
    np.testing.assert_array_equal(unpermute_rotary_rows(_llama_cpp_permute(w, n_heads), n_heads), w)


def test_config_read_from_gguf(smollm2):
    cfg, params, tok = smollm2
    expected = og.ModelConfig.preset("smollm2-135m")
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "ffn_dim", "rope_theta", "tie_embeddings", "max_seq_len"):
        assert getattr(cfg, field) == getattr(expected, field), field
    assert "lm_head" not in params


def test_tokenizer_round_trip_and_specials(smollm2):
    _, _, tok = smollm2
    text = "Hello world! In 2024, naïve café prices rose 3.5%."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # SmolLM's pre-tokenizer splits numbers into single digits.
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    assert tok.encode("<|im_start|>") == [tok.tokenizer.token_to_id("<|im_start|>")]
    assert tok.eos_id == 2 and tok.vocab_size == 49152


# Greedy "Paris" from generate_simple on these weights: test_engine.py's
# test_smollm2_engine_matches_generate_simple (and the CLI's default model in test_cli.py).


def test_perplexity_of_english_paragraph(smollm2):
    cfg, params, tok = smollm2
    ppl = og.perplexity(cfg, params, tok.encode(PARAGRAPH))
    assert np.isfinite(ppl) and ppl < 30, ppl
    # Shuffled words are much less likely than the real paragraph.
    words = PARAGRAPH.split()
    np.random.default_rng(0).shuffle(words)
    assert og.perplexity(cfg, params, tok.encode(" ".join(words))) > 3 * ppl


def test_cache_path_matches_full_pass_on_real_weights(smollm2):
    cfg, params, tok = smollm2
    # the first 4 of the 30 pretrained blocks (then the final norm and the tied head): real
    # weights through both paths, a seventh of the compile
    cfg = cfg.replace(n_layers=4)
    params = {k: v for k, v in params.items()
              if not k.startswith("layer_") or int(k.split("_")[1]) < cfg.n_layers}
    ids = np.asarray([tok.encode("Grouped-query attention shares keys and values")], np.int32)
    full = og.forward(cfg, params, ids)
    cache = og.KVCache.zeros(cfg, 1, 64)
    pre, cache = og.forward_with_cache(cfg, params, ids[:, :-1], cache, [0])
    last, _ = og.forward_with_cache(cfg, params, ids[:, -1:], cache, [ids.shape[1] - 1])
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=2e-3 * float(np.abs(full).max()))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        og.load_gguf(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ValueError, match="could not be read as a GGUF file"):
        og.load_gguf(str(bad))
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt-2'"):
        og.load_pretrained("gpt-2")


def test_pretrained_path_points_into_package():
    assert pretrained_path("smollm2-135m").endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
