"""Quantized checkpoints: orbax save/load and the Hugging Face GPTQ layout (export and import).

Layers are built directly from random packed words, grids and (act-order) g_idx rather than
by running GPTQ (tens of seconds even on the tiny model): the formats must carry any valid
layer bit-exactly, and random zero points hit the v1 edge case (a true zero of 0) that
calibrated layers rarely produce.
"""

import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import optgqa_jax as og
from gptq_reference import pack_hf_gptq_reference, unpack_hf_gptq
from optgqa_jax.checkpoint import load_quant_config
from optgqa_jax.quant import hf_gptq
from optgqa_jax.quant.linear import is_quantized
from optgqa_jax.weights import hf_linear_names

# q/k/v and gate/up read the same input: sharing one g_idx keeps them fusable.
_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                 "up_proj": "gate_up"}


def _cfg(**changes):
    # vocab 256: a quantized LM head packs its zero points along the vocabulary (3-bit: 32s)
    return og.ModelConfig.preset("tiny", **{"vocab_size": 256, "n_layers": 1, **changes})


def _random_layer(rng, shape, qc, g_idx, dtype):
    """Random words are valid codes: every bit pattern of 32 codes x b bits is some code."""
    d_in, d_out = shape
    G = qc.groups(d_in)
    if qc.sym:
        zeros = np.full((G, d_out), (qc.maxq + 1) // 2)
    else:
        zeros = rng.integers(0, qc.maxq + 1, (G, d_out))
        zeros[0, :2] = 0, qc.maxq  # the v1 wrap-around and its largest value
    scales = rng.uniform(0.5, 1.5, (G, d_out)) * 0.1 / qc.maxq
    return og.QuantizedLinear(
        qweight=jnp.asarray(rng.integers(-2**31, 2**31, (d_in * qc.bits // 32, d_out)), jnp.int32),
        scales=jnp.asarray(scales, qc.scale_dtype), zeros=jnp.asarray(zeros, jnp.uint8),
        g_idx=jnp.asarray(g_idx, jnp.int32), bits=qc.bits, group_size=qc.group_size, sym=qc.sym,
        dtype=dtype)


def _quantized_params(cfg, rng, qc, *, float_layers=()):
    """Init params with every linear kernel (the LM head iff qc.quantize_lm_head) quantized."""
    params = og.init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    shared = {}
    for name in hf_linear_names(cfg):
        if name in float_layers or (name == "lm_head" and not qc.quantize_lm_head):
            continue
        d_in = flat[name].shape[0]
        parts = name.split("/")
        key = (parts[0], _SHARED_INPUT.get(parts[-2], name) if len(parts) > 1 else name)
        if key not in shared:
            g_idx = np.arange(d_in) // (d_in // qc.groups(d_in))
            shared[key] = rng.permutation(g_idx) if qc.act_order else g_idx
        flat[name] = _random_layer(rng, flat[name].shape, qc, shared[key], cfg.dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def _assert_identical(a, b):
    fa, fb = (flax.traverse_util.flatten_dict(t, sep="/") for t in (a, b))
    assert sorted(fa) == sorted(fb)
    for name in fa:
        x, y = fa[name], fb[name]
        assert is_quantized(x) == is_quantized(y), name
        if is_quantized(x):
            assert (x.bits, x.group_size, x.sym, x.dtype) == (y.bits, y.group_size, y.sym, y.dtype)
            pairs = [(f"{name}.{k}", getattr(x, k), getattr(y, k))
                     for k in ("qweight", "scales", "zeros", "g_idx")]
        else:
            pairs = [(name, x, y)]
        for what, u, v in pairs:
            assert (u.dtype, u.shape) == (v.dtype, v.shape), what
            np.testing.assert_array_equal(np.asarray(u).view(np.uint8),
                                          np.asarray(v).view(np.uint8), err_msg=what)


def _tokens(cfg, rng):
    return rng.integers(0, cfg.vocab_size, (2, 7))


def _assert_same_logits(cfg, a, b, tokens):
    np.testing.assert_array_equal(np.asarray(og.forward(cfg, a, tokens)),
                                  np.asarray(og.forward(cfg, b, tokens)))


# ----------------------------------------------------------------------------- orbax
# QuantConfig, fused, float kernels, dtype, logits (see _HF_CASES on which cases run the model)
@pytest.mark.parametrize("qc,fused,float_layers,dtype,logits", [
    (og.QuantConfig(4, 32, act_order=True, quantize_lm_head=True), False, (), "float32", True),
    (og.QuantConfig(8, -1, sym=False, act_order=True), True, (), "bfloat16", True),
    (og.QuantConfig(2, 64, sym=False), False, ("layer_0/attn/o_proj/kernel",), "float32", False),
    (og.QuantConfig(3, 32, quantize_lm_head=True), False, (), "float16", False),
    (None, True, (), "float32", True),  # a float checkpoint in the fused layout
])
def test_orbax_round_trip_is_bit_exact(tmp_path, rng, qc, fused, float_layers, dtype, logits):
    cfg = _cfg(dtype=dtype)
    params = (og.init_params(cfg, jax.random.PRNGKey(3)) if qc is None
              else _quantized_params(cfg, rng, qc, float_layers=float_layers))
    if fused:
        params = og.fuse_projections(cfg, params)
    og.save_checkpoint(str(tmp_path / "ckpt"), cfg, params, quant_config=qc)
    assert os.path.exists(tmp_path / "ckpt" / "quantization.json") == (qc is not None)
    cfg2, params2 = og.load_checkpoint(str(tmp_path / "ckpt"), cfg)
    assert cfg2 == cfg
    assert load_quant_config(str(tmp_path / "ckpt")) == qc
    _assert_identical(params, params2)
    if logits:
        _assert_same_logits(cfg, params, params2, _tokens(cfg, rng))


def test_orbax_rejects_contradicting_quant_config(tmp_path, rng):
    cfg, qc = _cfg(), og.QuantConfig(4, 32)
    params = _quantized_params(cfg, rng, qc)
    with pytest.raises(ValueError, match=r"_proj/kernel contradicts the QuantConfig: bits=4 "
                                         r"\(QuantConfig has 3\)"):
        og.save_checkpoint(str(tmp_path / "a"), cfg, params, quant_config=og.QuantConfig(3, 32))
    with pytest.raises(ValueError, match="LM head is not quantized but .* quantize_lm_head=True"):
        og.save_checkpoint(str(tmp_path / "a"), cfg, params,
                           quant_config=og.QuantConfig(4, 32, quantize_lm_head=True))
    assert not (tmp_path / "a").exists()

    og.save_checkpoint(str(tmp_path / "b"), cfg, params, quant_config=qc)
    og.save_checkpoint(str(tmp_path / "b"), cfg, params, quant_config=qc, overwrite=True)
    with pytest.raises(FileExistsError, match="already exists"):
        og.save_checkpoint(str(tmp_path / "b"), cfg, params)
    file = tmp_path / "b" / "quantization.json"
    record = json.loads(file.read_text())
    record["quant_config"]["group_size"] = 64
    file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="group_size=32 \\(QuantConfig has 64\\)"):
        og.load_checkpoint(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="group_size=32 \\(QuantConfig has 64\\)"):
        load_quant_config(str(tmp_path / "b"))
    # the layers' own metadata no longer fits the stored arrays: scales [2, D_out] on disk
    record["quant_config"] = None
    for meta in record["layers"].values():
        meta["group_size"] = 64
    file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"scales: stored float16\[2, \d+\], expected "
                                         r"float16\[1, \d+\]"):
        og.load_checkpoint(str(tmp_path / "b"))
    # a scale dtype that orbax would silently cast to
    for meta in record["layers"].values():
        meta.update(group_size=32, scale_dtype="bfloat16")
    file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"scales: stored float16\[2, \d+\], expected bfloat16"):
        og.load_checkpoint(str(tmp_path / "b"))
    record["layers"]["layer_0/attn/nope/kernel"] = record["layers"]["layer_0/attn/q_proj/kernel"]
    file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="names 'layer_0/attn/nope/kernel', which is not"):
        og.load_checkpoint(str(tmp_path / "b"))


# ----------------------------------------------------------------------------- Hugging Face GPTQ
# bits, group_size, sym, act_order, lm_head, fused, format, dtype, logits. Identical params
# give identical logits; the forward pass (seconds of compilation per tree structure, most
# for 3 bits) runs on a few cases to show that the restored tree serves as is.
_HF_CASES = [
    (2, 32, True, False, False, False, "gptq", "float32", False),
    (3, -1, False, True, True, False, "gptq", "float32", False),
    (4, 32, True, False, False, True, "gptq_v2", "float16", True),
    (4, 32, True, True, True, True, "gptq", "float32", False),
    (4, -1, False, False, False, False, "gptq_v2", "bfloat16", False),
    (8, 32, False, True, False, False, "gptq", "float32", False),
    (8, -1, True, False, True, False, "gptq_v2", "float32", True),
]


@pytest.mark.filterwarnings("ignore:some zero points are 0")
@pytest.mark.parametrize("bits,group_size,sym,act_order,lm_head,fused,fmt,dtype,logits",
                         _HF_CASES)
def test_hf_gptq_round_trip_is_bit_exact(tmp_path, rng, bits, group_size, sym, act_order,
                                         lm_head, fused, fmt, dtype, logits):
    cfg = _cfg(dtype=dtype)
    qc = og.QuantConfig(bits, group_size, sym=sym, act_order=act_order, quantize_lm_head=lm_head)
    params = _quantized_params(cfg, rng, qc)
    exported = og.fuse_projections(cfg, params) if fused else params
    hf_gptq.export_hf_gptq(str(tmp_path), cfg, exported, qc, checkpoint_format=fmt,
                           overwrite=True)
    cfg2, params2 = og.load_hf_llama(str(tmp_path))
    assert cfg2 == cfg
    _assert_identical(params, params2)  # the import is unfused
    if logits:
        _assert_same_logits(cfg, params, params2, _tokens(cfg, rng))
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert hf_gptq.quant_config_from_hf(quant) == (qc, fmt)


def test_hf_gptq_tied_embeddings(tmp_path, rng):
    cfg, qc = _cfg(tie_embeddings=True), og.QuantConfig(4, 64)
    params = _quantized_params(cfg, rng, qc)
    hf_gptq.export_hf_gptq(str(tmp_path / "out"), cfg, params, qc, checkpoint_format="gptq_v2")
    assert not any(k.startswith("lm_head") for k in load_file(str(tmp_path / "out" /
                                                                    "model.safetensors")))
    cfg2, params2 = og.load_hf_llama(str(tmp_path / "out"))
    assert cfg2 == cfg
    _assert_identical(params, params2)
    with pytest.raises(ValueError, match="ties its LM head"):
        hf_gptq.export_hf_gptq(str(tmp_path / "new"), cfg, params,
                               og.QuantConfig(4, 64, quantize_lm_head=True))


@pytest.mark.filterwarnings("ignore:some zero points are 0")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_exported_tensors_match_the_reference_unpacker(tmp_path, rng, bits, fmt):
    cfg = _cfg()
    qc = og.QuantConfig(bits, 32, sym=False, act_order=True, quantize_lm_head=True)
    params = _quantized_params(cfg, rng, qc)
    hf_gptq.export_hf_gptq(str(tmp_path), cfg, params, qc, checkpoint_format=fmt, overwrite=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for path, module in hf_linear_names(cfg).items():
        t = {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert (t["qweight"].dtype, t["qzeros"].dtype, t["scales"].dtype, t["g_idx"].dtype) == \
            (np.int32, np.int32, np.float16, np.int32)
        ref = unpack_hf_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, fmt)
        # Exact: a float16 scale (11-bit significand) times an integer |q - z| < 2**8 needs
        # at most 19 bits, so float32 holds the product without rounding.
        np.testing.assert_array_equal(ref.astype(np.float32),
                                      np.asarray(og.quant.dequantize(flat[path], np.float32)),
                                      err_msg=module)
        if fmt == "gptq":  # the independent v1 packer gives the very same words
            ql = flat[path]
            qweight, qzeros = pack_hf_gptq_reference(np.asarray(ql.codes()),
                                                     np.asarray(ql.zeros), bits)
            np.testing.assert_array_equal(t["qweight"], qweight, err_msg=module)
            np.testing.assert_array_equal(t["qzeros"], qzeros, err_msg=module)
    assert tensors["model.embed_tokens.weight"].shape == (cfg.vocab_size, cfg.d_model)
    assert not any(k.endswith(".weight") and "proj" in k for k in tensors)


@pytest.mark.parametrize("fmt,word", [("gptq", 0x77777777), ("gptq_v2", 0x88888888)])
def test_sym_4bit_qzeros_words(tmp_path, rng, fmt, word):
    cfg, qc = _cfg(), og.QuantConfig(4, 32)
    hf_gptq.export_hf_gptq(str(tmp_path), cfg, _quantized_params(cfg, rng, qc), qc,
                           checkpoint_format=fmt, overwrite=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    qzeros = tensors["model.layers.0.mlp.down_proj.qzeros"]
    assert qzeros.shape == (128 // 32, 64 * 4 // 32)
    assert (qzeros.view(np.uint32) == word).all()


def test_v1_zero_of_zero_wraps_to_maxq_and_warns(tmp_path, rng):
    cfg, qc = _cfg(), og.QuantConfig(4, 32, sym=False)
    params = _quantized_params(cfg, rng, qc)
    with pytest.warns(UserWarning, match="some zero points are 0"):
        hf_gptq.export_hf_gptq(str(tmp_path / "out"), cfg, params, qc)
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    words = tensors["model.layers.0.self_attn.q_proj.qzeros"]
    # _random_layer sets the first two zeros of group 0 to 0 and 15: stored as 15 and 14
    assert words.view(np.uint32)[0, 0] & 0xFF == 0xEF


@pytest.mark.slow  # imports transformers
def test_exported_config_reads_in_transformers(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    cfg = _cfg(dtype="float16")
    qc = og.QuantConfig(4, 32, act_order=True, static_groups=False, damp=0.05)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    out = hf_gptq.export_hf_gptq(str(tmp_path / "hf"), cfg, _quantized_params(cfg, rng, qc), qc,
                                 tokenizer_dir=str(tmp_path / "tok"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                       "quantize_config.json", "tokenizer.json"]
    hf = transformers.AutoConfig.from_pretrained(out)
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim) == (64, 2, 16)
    gq = transformers.GPTQConfig.from_dict(hf.quantization_config)
    assert (gq.bits, gq.group_size, gq.desc_act, gq.sym, gq.format, gq.damp_percent,
            gq.true_sequential) == (4, 32, True, True, "gptq", 0.05, True)


# ----------------------------------------------------------------------------- errors
def _export(tmp_path, rng, qc=og.QuantConfig(4, 32), **kwargs):
    cfg = _cfg()
    hf_gptq.export_hf_gptq(str(tmp_path), cfg, _quantized_params(cfg, rng, qc), qc,
                           overwrite=True, **kwargs)
    return json.loads((tmp_path / "config.json").read_text())


def _write_config(tmp_path, hf):
    (tmp_path / "config.json").write_text(json.dumps(hf))


def test_import_rejects_unsupported_quantization(tmp_path, rng):
    hf = _export(tmp_path, rng)
    quant = hf["quantization_config"]
    for change, message in [
        (dict(quant_method="awq", method="awq"), "unsupported quantization method 'awq'"),
        (dict(bits=5), "bits=5; supported: \\(2, 3, 4, 8\\)"),
        (dict(format="marlin", checkpoint_format="marlin"), "unsupported GPTQ checkpoint format"),
        (dict(format="gptq_v2"), "conflicting formats"),
        (dict(dynamic={"-:.*down.*": {}}), "dynamic"),
    ]:
        _write_config(tmp_path, {**hf, "quantization_config": {**quant, **change}})
        with pytest.raises(ValueError, match=message):
            og.load_hf_llama(str(tmp_path))
    # a group size that does not fit the tensors (the meta copy removed so only it changes)
    meta = {k: v for k, v in quant["meta"].items() if k != "optgqa_quant_config"}
    _write_config(tmp_path, {**hf, "quantization_config": {**quant, "group_size": 64,
                                                           "meta": meta}})
    with pytest.raises(ValueError, match=r"q_proj.qzeros: shape \(2, 8\), expected \(1, 8\).*"
                                         r"group_size=64 gives 1 groups"):
        og.load_hf_llama(str(tmp_path))
    _write_config(tmp_path, {k: v for k, v in hf.items() if k != "quantization_config"})
    with pytest.raises(ValueError, match="GPTQ tensor .*qweight.* no GPTQ quantization_config"):
        og.load_hf_llama(str(tmp_path))


def test_import_rejects_mismatched_tensors(tmp_path, rng):
    _export(tmp_path, rng)
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    good = dict(tensors)
    for name, bad, message in [
        ("model.layers.0.mlp.up_proj.qweight", lambda a: a[:-1], r"up_proj.qweight: shape"),
        ("model.layers.0.mlp.up_proj.qzeros", lambda a: a[:, :-1], r"up_proj.qzeros: shape"),
        ("model.layers.0.mlp.up_proj.qweight", lambda a: a.view(np.uint32), "dtype uint32"),
        ("model.layers.0.mlp.up_proj.g_idx", lambda a: a + 5, "outside the 2 groups"),
        ("model.layers.0.mlp.up_proj.scales", None, "missing tensor .*up_proj.scales"),
    ]:
        tensors = dict(good)
        if bad is None:
            del tensors[name]
        else:
            tensors[name] = np.ascontiguousarray(bad(tensors[name]))
        save_file(tensors, file)
        with pytest.raises(ValueError, match=message):
            og.load_hf_llama(str(tmp_path))


def test_export_rejects_contradictions(tmp_path, rng):
    cfg, qc = _cfg(), og.QuantConfig(4, 32)
    params = _quantized_params(cfg, rng, qc)
    hf_gptq.export_hf_gptq(str(tmp_path / "out"), cfg, params, qc)
    with pytest.raises(FileExistsError, match="already exists"):
        hf_gptq.export_hf_gptq(str(tmp_path / "out"), cfg, params, qc)
    cases = [
        (params, og.QuantConfig(8, 32), r"\(bits, group_size, sym\) = \(4, 32, True\) contradicts"),
        (params, og.QuantConfig(4, 32, quantize_lm_head=True), "lm_head is not quantized"),
        (_quantized_params(cfg, rng, qc, float_layers=("layer_0/mlp/up_proj/kernel",)), qc,
         "up_proj/kernel is not quantized"),
        (_quantized_params(cfg, rng, og.QuantConfig(4, 32, act_order=True)), qc,
         "g_idx is not contiguous groups, but act_order"),
        (_quantized_params(cfg, rng, og.QuantConfig(4, 32, scale_dtype="bfloat16")),
         og.QuantConfig(4, 32, scale_dtype="bfloat16"), "stores float16 scales"),
    ]
    for p, q, message in cases:
        with pytest.raises(ValueError, match=message):
            hf_gptq.export_hf_gptq(str(tmp_path / "new"), cfg, p, q)
    with pytest.raises(ValueError, match="checkpoint_format='v3'"):
        hf_gptq.export_hf_gptq(str(tmp_path / "new"), cfg, params, qc, checkpoint_format="v3")
    lm = og.QuantConfig(3, 32, quantize_lm_head=True)
    with pytest.raises(ValueError, match="lm_head: the GPTQ format packs zero points along "
                                         "D_out=258"):
        hf_gptq.export_hf_gptq(str(tmp_path / "new"), _cfg(vocab_size=258),
                               _quantized_params(_cfg(vocab_size=258), rng, lm), lm)
    assert not (tmp_path / "new").exists()
