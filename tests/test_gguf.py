"""GGUF loading and the bundled SmolLM2-135M-Instruct."""

import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax.gguf_loader import pretrained_path, unpermute_rotary_rows
from optgqa_jax.gguf_reader import read_gguf

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


def _write_gguf(path, rng):
    """A small GGUF file with every metadata value type and plain and quantized tensors of
    odd sizes, written by the gguf package."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", int(rng.integers(0, 256)))
    w.add_int8("t.i8", int(rng.integers(-128, 0)))
    w.add_uint16("t.u16", int(rng.integers(256, 2**16)))
    w.add_int16("t.i16", int(rng.integers(-2**15, 0)))
    w.add_uint32("t.u32", int(rng.integers(2**16, 2**32)))
    w.add_int32("t.i32", int(rng.integers(-2**31, 0)))
    w.add_float32("t.f32", float(rng.standard_normal()))
    w.add_bool("t.bool", bool(rng.integers(0, 2)))
    w.add_string("t.str", "héllo wörld")
    w.add_uint64("t.u64", int(rng.integers(2**33, 2**62)))
    w.add_int64("t.i64", -int(rng.integers(2**33, 2**62)))
    w.add_float64("t.f64", float(rng.standard_normal()))
    w.add_array("t.ints", [int(i) for i in rng.integers(-9, 9, 5)])
    w.add_array("t.strs", ["a", "", "Ġthe", "日本"])
    w.add_array("t.floats", [float(x) for x in rng.standard_normal(3)])
    w.add_tensor("w.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("w.f16", rng.standard_normal((7,)).astype(np.float16))
    for name, kind in (("w.q8", "Q8_0"), ("w.q4", "Q4_1")):
        qt = gguf.GGMLQuantizationType[kind]
        w.add_tensor(name, gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32),
                                                qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reader_matches_the_gguf_package(tmp_path, rng):
    """read_gguf against gguf.GGUFReader on a file with every value type: the same metadata
    (values and Python types), the same tensors (type, shape, bytes) and the same floats
    after dequantization."""
    import gguf

    path = tmp_path / "all.gguf"
    _write_gguf(path, rng)
    meta, tensors = read_gguf(str(path))
    ref = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(meta) == set(fields) and len(meta) == 16
    for key, want in fields.items():
        assert meta[key] == want and type(meta[key]) is type(want), key
    assert list(tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        got = tensors[t.name]
        assert got.tensor_type == int(t.tensor_type), t.name
        assert got.shape == tuple(reversed(t.shape.tolist())), t.name
        assert got.data.dtype == t.data.dtype and got.data.shape == t.data.shape, t.name
        np.testing.assert_array_equal(got.data, t.data, err_msg=t.name)
        deq = gguf.quants.dequantize(got.data, gguf.GGMLQuantizationType(got.tensor_type))
        assert deq.shape == got.shape and np.isfinite(deq).all(), t.name


def test_reader_rejects_malformed_files(tmp_path, rng):
    good = tmp_path / "good.gguf"
    _write_gguf(good, rng)
    raw = good.read_bytes()
    cases = {"empty": b"", "magic": b"GGUG" + raw[4:],
             "version 1": raw[:4] + (1).to_bytes(4, "little") + raw[8:],
             "big-endian": raw[:4] + (3).to_bytes(4, "big") + raw[8:]}
    # the last tensor's last byte (the file may end in alignment padding after it)
    last = read_gguf(str(good))[1]["w.q4"].data.tobytes()
    end = raw.rfind(last) + len(last)
    for cut in (10, 30, len(raw) // 3, end - 1):  # inside the header, metadata, data
        cases[f"cut at {cut}"] = raw[:cut]
    for what, data in cases.items():
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="GGUF|empty|end of the file"):
            read_gguf(str(bad))
        with pytest.raises(ValueError, match="could not be read as a GGUF file"):
            og.load_gguf(str(bad))
