"""experiments/profile_quant.py's bare-load rungs (interpret mode): the tile-contiguous layout
reads the same words as the kernel's layout, and both read every word of their split once."""

import dataclasses
import importlib.util
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pq():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    spec = importlib.util.spec_from_file_location(
        "profile_quant", os.path.join(ROOT, "experiments", "profile_quant.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("bn,bk,split", [(64, 256, 1), (128, 256, 2)])
def test_load_rungs_read_every_word_once(pq, rng, bn, bk, split):
    from pallas_kernels.quant_matmul import QuantMatmulConfig
    K, N, bits = 1024, 256, 4
    words = rng.integers(-2 ** 20, 2 ** 20, (K * bits // 32, N)).astype(np.int32)
    cfg = QuantMatmulConfig(block_m=1, block_n=bn, block_k=bk, split_k=split, num_warps=4,
                            num_stages=2, fma=True)
    x = jnp.ones((1, K), jnp.bfloat16)
    plain = pq.stripped_matmul(x, jnp.asarray(words), bits=bits, rung="load", config=cfg,
                               interpret=True)
    tiled = pq.stripped_matmul(x, pq.tile_major(jnp.asarray(words), bn), bits=bits,
                               rung="load-tiled", config=cfg, interpret=True)
    want = words.astype(np.float64).reshape(split, -1, N).sum(axis=1)        # [split, N]
    for got in (plain, tiled):
        assert got.shape == (split, 1, N)
        np.testing.assert_allclose(np.asarray(got)[:, 0], want, rtol=1e-6)


def _load(name):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_timing_gaps_runs_every_path(tmp_path):
    """Every op and timing path of experiments/timing_gaps.py runs (interpret mode) and lands
    in the JSON and markdown."""
    import json
    _load("timing_gaps").main(["--interpret", "--out", str(tmp_path), "--label", "t"])
    res = json.load(open(tmp_path / "timing_gaps_t.json"))
    got = {(r["op"], r["how"]) for r in res["rows"]}
    for op in ("bf16", "xla-sum", "load", "w4g128", "w4g128-wide"):
        assert {(op, "rotating"), (op, "chain")} <= got
    assert all(r["us"] > 0 for r in res["rows"])
    assert (tmp_path / "timing_gaps_t.md").read_text().count("| w4g128 |") == 2


def test_triton_ir_captures_every_rung(tmp_path):
    """experiments/triton_ir.py writes one Triton module per rung, each a function with the
    kernel's loop (lowered for CUDA through jax.export; no GPU and no triton package needed)."""
    pytest.importorskip("jax._src.pallas.triton.lowering")
    mod = _load("triton_ir")
    mod.main(["--out", str(tmp_path), "--shape", "512x256", "--rungs", "load,full"])
    for rung in ("load", "full"):
        text = (tmp_path / f"{rung}.ttir").read_text()
        assert '"tt.func"' in text and '"scf.for"' in text and '"tt.load"' in text
    assert "optgqa_quant_matmul_w4" in (tmp_path / "full.ttir").read_text()


def test_ptx_mix_finds_loops_behind_commented_labels():
    """experiments/ptx_mix.py: a loop whose label carries a comment (as Triton writes them) is
    found, with its instruction mix; a forward branch is not a loop."""
    mod = _load("ptx_mix")
    ptx = """
.visible .entry kern(
    .param .u64 p0
)
{
	mov.u32 	%r1, 0;
	@%p1 bra 	$L__BB0_3;
$L__BB0_2:                              // %.lr.ph
	ld.global.v4.b32 	{ %r2, %r3, %r4, %r5 }, [ %rd1 + 0 ];
	and.b32 	%r6, %r2, 15;
	fma.rn.f32 	%f1, %f2, %f3, %f1;
	fma.rn.f32 	%f4, %f2, %f3, %f4;
	@%p2 bra 	$L__BB0_2;
$L__BB0_3:                              // %._crit_edge
	ret;
}
"""
    body = mod.kernels(ptx)["kern"]
    loops = mod.loops(body)
    assert [l["label"] for l in loops] == ["$L__BB0_2"]
    assert loops[0]["mix"]["fma.rn"] == 2 and loops[0]["mix"]["ld.global"] == 1
    assert loops[0]["int_to_float"] == 0


def test_ptx_mix_counts_int_to_float_conversions():
    """Only conversions from an integer to a float type count (I2F), not float-to-float
    conversions, integer narrowing or float-to-integer."""
    mod = _load("ptx_mix")
    lines = ["\tcvt.rn.bf16.u32 \t%rs1, %r2;", "\tcvt.rn.f32.s32 %f2, %r3;",
             "\tcvt.rn.f16.u16 %h1, %rs4;", "\tcvt.f32.bf16 %f1, %rs1;",
             "\tcvt.rn.bf16x2.f32 %r1, %f1, %f2;", "\tcvt.u16.u32 %rs2, %r4;",
             "\tcvt.rzi.s32.f32 %r5, %f3;", "\t// cvt.rn.f32.u32 in a comment"]
    assert mod.int_to_float(lines) == 3


def test_bench_quant_tables_from_rows(tmp_path):
    """experiments/bench_quant.py's markdown and plot from kernel and engine rows (a failed
    row included), as a GPU run would produce them."""
    mod = _load("bench_quant")
    kern = lambda impl, fmt, M, us: dict(shape="o 4096x4096", M=M, K=4096, N=4096, impl=impl,
                                         format=fmt, us=us, gb_per_s=1e3, pct_ceiling=25.0,
                                         speedup_vs_bf16=20.0 / us, rel_error=1e-3)
    eng = lambda fmt, kind, tok, pb: dict(format=fmt, workload=kind, output_tokens_per_s=tok,
                                          decode_tokens_per_s_per_sequence=tok,
                                          param_bytes=pb, peak_memory_bytes=3 * pb)
    res = {"meta": dict(device="test", jax="0", commit="abc", ceiling=4e12,
                        ceilings=["copy"]),
           "kernels": [kern("bf16", "bf16", 1, 20.0), kern("ours", "w4g128", 1, 8.0),
                       kern("ours", "w4g128", 16, 9.0), kern("xla-dequant", "w4g128", 1, 40.0),
                       dict(shape="o 4096x4096", M=64, impl="ours", format="w8",
                            error="ValueError('x')")],
           "engine": [eng("bf16", "batch-1 decode", 100.0, 16 << 30),
                      eng("w4g128", "batch-1 decode", 250.0, 4 << 30),
                      dict(format="w8", workload="batch-1 decode", error="OOM")]}
    md = mod.markdown(res)
    assert "| o 4096x4096 | 1 | ours | w4g128 | 8.0 |" in md
    assert "1 kernel rows failed" in md and "| w4g128 | batch-1 decode | 250 |" in md
    assert "25.0%" in md and "fails: 'OOM'" in md
    mod.plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_compare_variants_runs_every_part(tmp_path):
    """experiments/compare_variants.py on tiny shapes (interpret mode): every part runs the
    variants the --variant options name (one of each kind; each config option's kernel path is
    checked against float64 in test_quant_matmul / test_paged_attention /
    test_flash_attention), the quantized ones agree with the dequantized product, the tables
    are written, and --small lists one setting of each list of register tiles with each of its
    options."""
    mod = _load("compare_variants")
    pick = ["default", "register 1-step 64x256 half pairs", "register no-split 32x256 raw x",
            "joined dequant_tiles", "dequantize (XLA)", "dequantize kernel", "lazy_rescale",
            "replicated / masked rows", "padded, 16-key blocks", "64-key blocks"]
    mod.main(["--small", "--rows", "1,64", "--shapes", "gate_up", "--iters", "1",
              "--trials", "1", "--parts", "quant,flash,decode,decode_tiles",
              *(arg for name in pick for arg in ("--variant", name)), "--out", str(tmp_path)])
    res = json.loads((tmp_path / "compare_variants.json").read_text())
    rows = res["rows"]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    quant_rows = [r for r in rows if r["part"] == "quant" and r["variant"] != "bfloat16"]
    assert {(r["M"], r["variant"]) for r in quant_rows} == {
        (1, "default"), (1, "register 1-step 64x256 half pairs"),
        (1, "register no-split 32x256 raw x"), (64, "default"), (64, "joined dequant_tiles"),
        (64, "dequantize (XLA)"), (64, "dequantize kernel")}
    assert all(r["rel_error"] < 1e-2 for r in quant_rows)
    assert {(r["part"], r["variant"], r.get("alibi")) for r in rows if r["part"] != "quant"} == {
        ("flash", "default", False), ("flash", "lazy_rescale", False),
        ("flash", "default", True), ("flash", "lazy_rescale", True),
        ("decode", "replicated / masked rows", False), ("decode", "replicated / masked rows", True),
        ("decode", "padded, 16-key blocks", True),
        ("decode_tiles", "default", False), ("decode_tiles", "64-key blocks", False)}
    md = (tmp_path / "compare_variants.md").read_text()
    assert "## quant_matmul" in md and "## flash" in md and "## decode" in md
    # --small: one setting of each list of register tiles, with each of its options
    small = set(mod.quant_variants(1, 512, 384, few=True)) | set(mod.quant_variants(
        64, 512, 384, few=True))
    assert small == {
        "default", "joined 256", "register deep", "joined dequant_tiles",
        *(f"register 1-step 64x256{o}" for o in ("", " runtime magic", " half pairs", " raw x")),
        "default half pairs", "default raw x", "register no-split 32x256",
        "register no-split 32x256 raw x", "dequantize (XLA)", "dequantize kernel"}
    full = set(mod.quant_variants(1, 4096, 4096))     # a GPU run: every setting
    assert {"register 1-step 128x512 raw x", "register no-split 32x512 raw x",
            "register 1-step 256x128 half pairs"} <= full
    assert set(pick) <= mod.variant_names()
    with pytest.raises(SystemExit, match="--variant: unknown"):
        mod.main(["--small", "--variant", "default", "--variant", "no such tile", "--out",
                  str(tmp_path)])


def test_code_math_probe_kernels_match_float64(tmp_path):
    """experiments/code_math_probe.py: every probe kernel's tile partials match a float64
    reference in interpret mode (float32 variants to rounding, float16 ones within 1e-2), on
    fresh random codes; without the triton package the compile is recorded as an error and
    the tables are still written."""
    mod = _load("code_math_probe")
    for seed, v in enumerate(mod.VARIANTS):
        err = mod.check(v, seed=seed + 1, K=256, N=64)
        assert err < (1e-5 if v.startswith("f32") else 1e-2), (v, err)
    mod.main(["--variants", "f32,f16 pairs runtime magic", "--no-kernels", "--out",
              str(tmp_path)])
    res = json.loads((tmp_path / "code_math_probe.json").read_text())
    assert set(res["variants"]) == {"f32", "f16 pairs runtime magic"}
    md = (tmp_path / "code_math_probe.md").read_text()
    assert "| f32 |" in md and "| f16 pairs runtime magic |" in md
    with pytest.raises(SystemExit):
        mod.main(["--variants", "f8", "--out", str(tmp_path)])


def test_decode_sass_writes_a_row_per_config_and_alibi(tmp_path):
    """experiments/decode_sass.py: the three configs with and without ALiBi, each a row (an
    error row without the triton package); the shape is checked before any work."""
    mod = _load("decode_sass")
    cfgs = mod.configs(7)
    # ALiBi takes the plain default's tiles with the block table read ahead (since c9f6850)
    assert cfgs["plain default"].replicate_queries and cfgs["ALiBi default"] == \
        dataclasses.replace(cfgs["plain default"], prefetch="tables")
    assert not cfgs["queries padded, 32-key blocks"].replicate_queries
    mod.main(["--shape", "2,28,4,64", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "decode_sass.json").read_text())
    assert [(r["name"], r["alibi"]) for r in res["rows"]] == [
        (name, a) for name in cfgs for a in (False, True)]
    assert "| plain default |" in (tmp_path / "decode_sass.md").read_text()
    for bad in ("2,28,5,64", "2,28,4", "2,28,4,60"):
        with pytest.raises(SystemExit):
            mod.main(["--shape", bad, "--out", str(tmp_path)])


def test_flash_sass_writes_a_row_per_config(tmp_path):
    """experiments/flash_sass.py: the default tiles and four of the sweep's, each a row (an error
    row without the triton package); the shape is checked before any work."""
    mod = _load("flash_sass")
    cfgs = mod.configs(8)
    assert cfgs["default"] == mod.FlashAttentionConfig.for_backend("cuda", 128, 8)
    mod.main(["--shape", "1,256,4,2", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "flash_sass.json").read_text())
    assert [r["name"] for r in res["rows"]] == list(mod.configs(2))
    assert "| default |" in (tmp_path / "flash_sass.md").read_text()
    for bad in ("1,256,5,2", "1,100,4,2", "1,256,4"):
        with pytest.raises(SystemExit):
            mod.main(["--shape", bad, "--out", str(tmp_path)])


def test_compare_variants_whole_256_row_tiles_match_float64():
    """From 256 rows compare_variants adds whole 256-row dequant_tiles tiles (128 and 64
    columns, with and without a split of K, 2 stages); each computes x @ dequant(W) in
    interpret mode at an odd row count against a float64 reference."""
    import jax
    from optgqa_jax import quant
    from pallas_kernels.quant_matmul import quant_matmul

    mod = _load("compare_variants")
    assert not any("256x" in k for k in mod.quant_variants(128, 4096, 28672))
    v = {k: c for k, c in mod.quant_variants(256, 4096, 28672).items() if "256x" in k}
    assert set(v) == {"joined dequant_tiles 256x128", "joined dequant_tiles 256x128 no split",
                      "joined dequant_tiles 256x64", "joined dequant_tiles 256x128 2 stages"}
    assert v["joined dequant_tiles 256x128"].split_k > 1 and all(
        c.block_m == 256 and c.dequant_tiles for c in v.values())
    rng = np.random.default_rng()
    M, K, N = int(rng.integers(257, 320)), 384, 192
    qc = quant.parse_spec("w4g128")
    q = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                                                K, N, qc, "bfloat16")
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(q, jnp.float32), np.float64)
    for name, cfg in v.items():
        cfg = dataclasses.replace(cfg, split_k=min(cfg.split_k, 3))   # K has 3 steps of 128
        y = np.asarray(quant_matmul(x, q.qweight, q.scales, q.zeros, bits=4, group_size=128,
                                    config=cfg, interpret=True), np.float64)
        err = np.abs(y - ref).max() / np.abs(ref).max()
        assert np.isfinite(err) and err < 1e-2, (name, err)
