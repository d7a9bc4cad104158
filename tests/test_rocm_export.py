"""Every kernel entry point lowers for JAX's ROCm backend (Pallas' Triton lowering), on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import alibi_slopes
from pallas_kernels.flash_attention import FlashAttentionConfig, flash_attention
from pallas_kernels.paged_attention import PagedAttentionConfig, paged_attention
from pallas_kernels.paged_prefill_attention import PagedPrefillConfig, paged_prefill_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
S = jax.ShapeDtypeStruct


def export_for(platform, fn, *args):
    exported = export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    return exported.mlir_module()


PAGED = (S((4, 12, 128), jnp.bfloat16), S((4, 64, 16, 128), jnp.bfloat16),
         S((4, 64, 16, 128), jnp.bfloat16), S((4, 16), jnp.int32), S((4,), jnp.int32))
PAGED_G4 = (S((4, 16, 128), jnp.bfloat16),) + PAGED[1:]  # 16 query heads over 4: groups of 4
DENSE = (S((2, 100, 12, 64), jnp.float16), S((2, 100, 4, 64), jnp.float16),
         S((2, 100, 4, 64), jnp.float16))
RAGGED = (S((100, 12, 64), jnp.bfloat16), S((4, 64, 16, 64), jnp.bfloat16),
          S((4, 64, 16, 64), jnp.bfloat16), S((3, 16), jnp.int32), S((4,), jnp.int32),
          S((3,), jnp.int32))
RAGGED_G4 = (S((100, 16, 64), jnp.bfloat16),) + RAGGED[1:]  # 16 query heads over 4

ENTRY_POINTS = {
    "paged_attention": (lambda alibi, cfg: lambda *a: paged_attention(
        *a, alibi_slopes=alibi, config=cfg), PAGED, PagedAttentionConfig),
    "paged_attention_split": (lambda alibi, cfg: lambda *a: paged_attention(
        *a, alibi_slopes=alibi, config=PagedAttentionConfig(num_splits=4, num_stages=1)), PAGED,
        PagedAttentionConfig),
    "paged_attention_prefetch_tiles": (lambda alibi, cfg: lambda *a: paged_attention(
        *a, alibi_slopes=alibi, config=dataclasses.replace(cfg, prefetch="tiles")), PAGED,
        PagedAttentionConfig),
    "paged_attention_replicated_queries": (lambda alibi, cfg: lambda *a: paged_attention(
        *a, alibi_slopes=alibi, config=dataclasses.replace(cfg, replicate_queries=True)),
        PAGED_G4, PagedAttentionConfig),
    "paged_attention_masked_query_rows": (lambda alibi, cfg: lambda *a: paged_attention(
        *a, alibi_slopes=alibi, config=dataclasses.replace(cfg, replicate_queries=True)),
        PAGED, PagedAttentionConfig),                  # groups of 3: masked rows
    "flash_attention": (lambda alibi, cfg: lambda *a: flash_attention(
        *a, alibi_slopes=alibi, config=cfg), DENSE, FlashAttentionConfig),
    "flash_attention_lazy_rescale": (lambda alibi, cfg: lambda *a: flash_attention(
        *a, alibi_slopes=alibi, config=dataclasses.replace(cfg, lazy_rescale=True)), DENSE,
        FlashAttentionConfig),
    "flash_attention_q_blocks_fastest": (lambda alibi, cfg: lambda *a: flash_attention(
        *a, alibi_slopes=alibi, config=dataclasses.replace(cfg, q_blocks_fastest=True,
                                                           heavy_first=True)),
        DENSE, FlashAttentionConfig),
    "flash_attention_prefetch_scores": (lambda alibi, cfg: lambda *a: flash_attention(
        *a, alibi_slopes=alibi, config=dataclasses.replace(cfg, prefetch_scores=True)),
        DENSE, FlashAttentionConfig),
    "paged_prefill_attention": (lambda alibi, cfg: lambda *a: paged_prefill_attention(
        *a, max_q_len=64, alibi_slopes=alibi, config=cfg), RAGGED, PagedPrefillConfig),
    "paged_prefill_attention_skip_single": (lambda alibi, cfg: lambda *a: paged_prefill_attention(
        *a, max_q_len=64, alibi_slopes=alibi, config=cfg, skip_single=True), RAGGED,
        PagedPrefillConfig),
    "paged_prefill_attention_group_heads": (lambda alibi, cfg: lambda *a: paged_prefill_attention(
        *a, max_q_len=64, alibi_slopes=alibi, config=dataclasses.replace(cfg, group_heads=True),
        skip_single=True), RAGGED_G4, PagedPrefillConfig),
    "paged_prefill_attention_tile_programs": (lambda alibi, cfg: lambda *a: paged_prefill_attention(
        *a, max_q_len=64, alibi_slopes=alibi, config=dataclasses.replace(
            cfg, group_heads=True, tile_programs=4), skip_single=True), RAGGED_G4,
        PagedPrefillConfig),
}


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_mixed_step_attention_lowers_through_triton(alibi, platform):
    """The engine's mixed step: the ragged prefill kernel for prompt chunks and the decode
    kernel for one-token sequences, two Triton calls."""
    from optgqa_jax.attention import mixed_step_attention

    q, kp, vp, tables, cu, ctx = RAGGED
    slopes = alibi_slopes(q.shape[1]) if alibi else None
    module = export_for(platform, lambda *a: mixed_step_attention(*a, slopes, max_q_len=100),
                        q, kp, vp, tables, ctx, cu)
    assert module.count(TRITON_CALL) == 2


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_kernel_lowers_through_triton(name, alibi, platform):
    make, args, config_cls = ENTRY_POINTS[name]
    slopes = alibi_slopes(args[0].shape[-2]) if alibi else None  # q is [..., N, D]
    if config_cls is PagedAttentionConfig:  # its defaults differ with ALiBi
        cfg = config_cls.for_backend(platform, alibi=alibi)
    else:
        cfg = config_cls.for_backend(platform)
    module = export_for(platform, make(slopes, cfg), *args)
    assert module.count(TRITON_CALL) == 1


# quant_matmul: x [M, K], qweight int32 [K * bits / 32, N], scales/zeros [G, N], g_idx [K].
def _quant_args(M, K, N, bits, group_size, dtype=jnp.bfloat16):
    G = 1 if group_size == -1 else K // group_size
    return (S((M, K), dtype), S((K * bits // 32, N), jnp.int32), S((G, N), jnp.float16),
            S((G, N), jnp.uint8), S((K,), jnp.int32))


@pytest.mark.parametrize("M", [1, 64, 300])
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (4, -1, False),
                                                       (8, 128, True), (2, 64, False)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_quant_matmul_lowers_through_triton(M, bits, group_size, act_order, platform):
    from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
    K, N = 512, 384
    cfg = QuantMatmulConfig.for_shape(platform, M, K, N)

    def f(x, q, s, z, g):
        return quant_matmul(x, q, s, z, bits=bits, group_size=group_size,
                            g_idx=g if act_order else None, config=cfg)

    module = export_for(platform, f, *_quant_args(M, K, N, bits, group_size))
    assert module.count(TRITON_CALL) == 1


def test_quant_matmul_checks_take_the_abstract_arguments_of_an_export():
    """pallas_kernels.quant_matmul_checks runs on the ShapeDtypeStructs an export traces with:
    it passes good ones and refuses a bad shape before any lowering starts."""
    from pallas_kernels.quant_matmul_checks import check_quant_inputs
    x, q, s, z, g = _quant_args(3, 512, 384, 4, 128)
    check_quant_inputs(x, q, s, z, None, 4, 128)
    check_quant_inputs(x, q, s, z, g, 4, 128)
    with pytest.raises(ValueError, match="qweight has 63 rows"):
        check_quant_inputs(x, S((63, 384), jnp.int32), s, z, None, 4, 128)


# The register path reading x as given (QuantMatmulConfig.raw_x): one custom call, no reorder.
@pytest.mark.parametrize("M,bits,group_size,split_k", [(1, 4, 128, 2), (4, 8, -1, 1),
                                                       (2, 2, 64, 4)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_quant_matmul_raw_x_lowers_through_triton(M, bits, group_size, split_k, platform):
    from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
    K, N = 512, 384
    cfg = QuantMatmulConfig(block_m=1, block_n=64, block_k=256, split_k=split_k, num_warps=4,
                            num_stages=1, fma=True, raw_x=True)
    x, q, s, z, _ = _quant_args(M, K, N, bits, group_size)

    def f(x, q, s, z):
        return quant_matmul(x, q, s, z, bits=bits, group_size=group_size, config=cfg)

    module = export_for(platform, f, x, q, s, z)
    assert module.count(TRITON_CALL) == 1
    assert "stablehlo.transpose" not in module     # x is not put in shift-major order


# Layer-stacked weights (optgqa_jax.layer_stack): the stacks [L, ...] and a traced layer index.
@pytest.mark.parametrize("M,bits,group_size", [(1, 4, 128), (16, 8, -1)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_quant_matmul_on_stacked_layers_lowers_through_triton(M, bits, group_size, platform):
    from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
    K, N, L = 512, 384, 3
    cfg = QuantMatmulConfig.for_shape(platform, M, K, N)
    x, q, s, z, _ = _quant_args(M, K, N, bits, group_size)
    stack = lambda a: S((L, *a.shape), a.dtype)  # noqa: E731

    def f(x, q, s, z, layer):
        return quant_matmul(x, q, s, z, bits=bits, group_size=group_size, config=cfg,
                            layer=layer)

    module = export_for(platform, f, x, stack(q), stack(s), stack(z), S((), jnp.int32))
    assert module.count(TRITON_CALL) == 1


@pytest.mark.parametrize("order", ["stream", "shift_major"])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_bsr_quant_matmul_packed_on_stacked_layers_lowers_through_triton(order, platform):
    from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_packed
    from pallas_kernels.bsr_quant_matmul_config import BSRMatmulConfig
    K, N, R, L, gs = 512, 384, 3, 4, 128
    nnz, Wg = N * R, gs * 4 // 32
    cfg = BSRMatmulConfig.for_packed(platform, 1, nnz, K=K, N=N, row_blocks=R, code_order=order)

    def f(x, packed, layer):
        return bsr_quant_matmul_packed(x, packed, nnz=nnz, scale_dtype=jnp.float16,
                                       out_features=N, bits=4, group_size=gs, row_blocks=R,
                                       code_order=order, config=cfg, layer=layer)

    rows = nnz + 2 * (-(-nnz // Wg))
    module = export_for(platform, f, S((1, K), jnp.bfloat16), S((L, rows, Wg), jnp.int32),
                        S((), jnp.int32))
    assert module.count(TRITON_CALL) == 1


@pytest.mark.parametrize("platform,device", [("rocm", "AMD Instinct MI300X"),
                                             ("cuda", "NVIDIA H100 80GB HBM3")])
def test_tuning_table_configs_lower_through_triton(tmp_path, monkeypatch, platform, device):
    """A tuning-table entry (pallas_kernels.tuning) is taken on its own device kind only, and
    the tiles it names lower like the rules' (pallas_kernels.quant_matmul_config)."""
    import dataclasses

    from pallas_kernels import tuning
    from pallas_kernels.quant_matmul import quant_matmul
    from pallas_kernels.quant_matmul_config import QuantMatmulConfig, tuning_key
    K, N = 512, 384
    entry = QuantMatmulConfig(block_m=1, block_n=128, block_k=256, split_k=2, num_warps=8,
                              num_stages=1, fma=True, runtime_magic=True, wrapper_sums=True)
    path = str(tmp_path / "quant_matmul.json")
    tuning.write_entries(path, "quant_matmul", [dict(
        device=device, key=tuning_key(1, K, N, 4, 128), config=dataclasses.asdict(entry))])
    monkeypatch.setenv(tuning.ENV, path)
    other = "NVIDIA H100 80GB HBM3" if platform == "rocm" else "AMD Instinct MI300X"
    assert QuantMatmulConfig.for_shape(platform, 1, K, N, 128, device=other) == \
        QuantMatmulConfig.for_shape(platform, 1, K, N, 128)
    cfg = QuantMatmulConfig.for_shape(platform, 1, K, N, 128, device=device)
    assert cfg == entry

    def f(x, q, s, z, g):
        return quant_matmul(x, q, s, z, bits=4, group_size=128, config=cfg)

    module = export_for(platform, f, *_quant_args(1, K, N, 4, 128))
    assert module.count(TRITON_CALL) == 1


@pytest.mark.parametrize("bits,dtype", [(4, jnp.bfloat16), (8, jnp.float16)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_quant_matmul_shift_patterns_lower_through_triton(bits, dtype, platform):
    """The shift-by-shift tensor-core path with the codes as 16-bit float bit patterns."""
    from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
    M, K, N = 16, 512, 384
    cfg = QuantMatmulConfig(block_m=16, block_n=128, block_k=128, split_k=2, num_warps=4,
                            num_stages=1, shift_patterns=True)

    def f(x, q, s, z, g):
        return quant_matmul(x, q, s, z, bits=bits, group_size=128, config=cfg)

    module = export_for(platform, f, *_quant_args(M, K, N, bits, 128, dtype))
    assert module.count(TRITON_CALL) == 1


@pytest.mark.parametrize("bits,group_size,dtype", [(4, 128, jnp.bfloat16), (8, -1, jnp.bfloat16),
                                                   (8, -1, jnp.float16), (2, -1, jnp.bfloat16)])
@pytest.mark.parametrize("dequant_tiles", [False, True])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_quant_matmul_joined_lowers_through_triton(bits, group_size, dtype, dequant_tiles,
                                                   platform):
    """The one-product-per-tile path: the shifts' pairwise stacks, transpose and reshape; the
    codes (pallas_kernels.quant_codes) as 16-bit float bit patterns (bfloat16 at 2 and 4
    bits, float16 at 8) or converted
    (bfloat16 at 8 bits); each tile dequantized before its product or corrected after it."""
    import dataclasses

    from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
    M, K, N = 256, 512, 384
    cfg = dataclasses.replace(QuantMatmulConfig.for_shape(platform, M, K, N, group_size),
                              joined=True, dequant_tiles=dequant_tiles)

    def f(x, q, s, z, g):
        return quant_matmul(x, q, s, z, bits=bits, group_size=group_size, config=cfg)

    module = export_for(platform, f, *_quant_args(M, K, N, bits, group_size, dtype))
    assert module.count(TRITON_CALL) == 1


@pytest.mark.parametrize("half_pairs,wrapper_sums,kernel_sums,raw_x", [
    (False, False, False, False), (True, False, False, False), (False, True, False, False),
    (False, False, True, True), (True, False, True, False)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_quant_matmul_one_step_runtime_magic_lowers_through_triton(half_pairs, wrapper_sums,
                                                                   kernel_sums, raw_x, platform):
    """One K step per program with 2^23's bit pattern read from memory (register path), in
    float32 or in float16 pairs, with x's sums summed per word row in the kernel, from the
    wrapper, or per sub-tile in the kernel (kernel_sums, also with x read as given)."""
    from pallas_kernels.quant_matmul import QuantMatmulConfig, quant_matmul
    K, N = 512, 384
    cfg = QuantMatmulConfig(block_m=1, block_n=64, block_k=256, split_k=K // 256, num_warps=8,
                            num_stages=1, fma=True, runtime_magic=True, half_pairs=half_pairs,
                            wrapper_sums=wrapper_sums, kernel_sums=kernel_sums, raw_x=raw_x)

    def f(x, q, s, z, g):
        return quant_matmul(x, q, s, z, bits=4, group_size=128, config=cfg)

    module = export_for(platform, f, *_quant_args(1, K, N, 4, 128))
    assert module.count(TRITON_CALL) == 1


# bsr_quant_matmul: x [M, K], codes int32 [nnz, gs * bits / 32], scales/zeros/col_idx/row_ids [nnz].
@pytest.mark.parametrize("M,bits,gs,magic,raw", [(1, 4, 128, False, False),
                                                 (16, 4, 64, False, False),
                                                 (5, 8, 128, False, False),
                                                 (3, 2, 64, False, False),
                                                 (1, 4, 128, True, False),
                                                 (1, 4, 128, False, True),
                                                 (3, 8, 64, True, True),
                                                 (1, 4, 128, True, "bf16_x"),
                                                 (2, 4, 128, False, "code_zeros"),
                                                 (1, 4, 128, False, "index_magic"),
                                                 (1, 4, 128, False, "row_loop")])
@pytest.mark.parametrize("row_blocks", [-1, 3])     # block list; whole rows (R = 3)
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_bsr_quant_matmul_lowers_through_triton(M, bits, gs, magic, raw, row_blocks, platform):
    import dataclasses

    from pallas_kernels.bsr_quant_matmul import BSRMatmulConfig, bsr_quant_matmul
    K, N = 512, 384
    nnz = 1000 if row_blocks < 0 else N * row_blocks
    cfg = dataclasses.replace(BSRMatmulConfig.for_shape(platform, M, nnz), runtime_magic=magic,
                              raw_x=raw is True, bf16_x=raw == "bf16_x",
                              code_zeros=raw == "code_zeros",
                              index_magic=raw == "index_magic",
                              row_loop=4 if raw == "row_loop" else 1)

    def f(x, c, s, z, col, rows):
        return bsr_quant_matmul(x, c, s, z, col, rows, out_features=N, bits=bits,
                                group_size=gs, row_blocks=row_blocks, config=cfg)

    args = (S((M, K), jnp.bfloat16), S((nnz, gs * bits // 32), jnp.int32),
            S((nnz,), jnp.float16), S((nnz,), jnp.uint8), S((nnz,), jnp.int32),
            S((nnz,), jnp.int32))
    module = export_for(platform, f, *args)
    assert module.count(TRITON_CALL) == 1


# bsr_quant_matmul_packed: x [M, K], one int32 array [nnz + 2 R, Wg] (pack_blocks).
# code_order "shift_major": the same array with each block's codes reordered, x as given
# (bfloat16, or float32 as PackedBSRLinear(x_dtype="float32") hands it over).
@pytest.mark.parametrize("M,bits,gs,sdtype,loop,order,xdtype", [
    (1, 4, 128, jnp.float16, 1, "stream", jnp.bfloat16),
    (4, 8, 64, jnp.bfloat16, 1, "stream", jnp.bfloat16),
    (1, 4, 128, jnp.bfloat16, 4, "stream", jnp.bfloat16),
    (1, 4, 128, jnp.float16, 1, "shift_major", jnp.bfloat16),
    (1, 4, 128, jnp.float16, 1, "shift_major", jnp.float32),
    (3, 2, 64, jnp.bfloat16, 2, "shift_major", jnp.bfloat16)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_bsr_quant_matmul_packed_lowers_through_triton(M, bits, gs, sdtype, loop, order, xdtype,
                                                       platform):
    from pallas_kernels.bsr_quant_matmul import bsr_quant_matmul_packed
    from pallas_kernels.bsr_quant_matmul_config import BSRMatmulConfig
    K, N, R = 512, 384, 3
    nnz, Wg = N * R, gs * bits // 32
    cfg = dataclasses.replace(BSRMatmulConfig.for_packed(platform, M, nnz, K=K, N=N, bits=bits,
                                                         group_size=gs, row_blocks=R,
                                                         code_order=order, x_dtype=xdtype),
                              row_loop=loop)

    def f(x, packed):
        return bsr_quant_matmul_packed(x, packed, nnz=nnz, scale_dtype=sdtype, out_features=N,
                                       bits=bits, group_size=gs, row_blocks=R, code_order=order,
                                       config=cfg)

    rows = nnz + 2 * (-(-nnz // Wg))
    module = export_for(platform, f, S((M, K), xdtype), S((rows, Wg), jnp.int32))
    assert module.count(TRITON_CALL) == 1


# bsr_gather_quant_matmul: the same arguments as bsr_quant_matmul, a few rows of x.
@pytest.mark.parametrize("M,bits,gs,dtype,split", [(16, 4, 128, jnp.bfloat16, 1),
                                                   (3, 4, 64, jnp.bfloat16, 4),
                                                   (64, 8, 128, jnp.float16, 2),
                                                   (17, 2, 64, jnp.float16, 1)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_bsr_gather_quant_matmul_lowers_through_triton(M, bits, gs, dtype, split, platform):
    import dataclasses

    from pallas_kernels.bsr_gather_quant_matmul import BSRGatherConfig, bsr_gather_quant_matmul
    K, N, nnz = 512, 384, 1000
    cfg = dataclasses.replace(BSRGatherConfig.for_shape(platform, M, K // gs, N), split_k=split)

    def f(x, c, s, z, col, rows):
        return bsr_gather_quant_matmul(x, c, s, z, col, rows, out_features=N, bits=bits,
                                       group_size=gs, config=cfg)

    args = (S((M, K), dtype), S((nnz, gs * bits // 32), jnp.int32), S((nnz,), jnp.float16),
            S((nnz,), jnp.uint8), S((nnz,), jnp.int32), S((nnz,), jnp.int32))
    module = export_for(platform, f, *args)
    assert module.count(TRITON_CALL) == 1


# bsr_gm_quant_matmul: x [M, K]; GroupMajorBlocks: codes int32 [nnz_p, gs * bits / 32],
# scales/zeros/rows [nnz_p], program_group [nnz_p / T].
@pytest.mark.parametrize("M,bits,gs,mma", [(1, 4, 128, False), (16, 4, 64, False),
                                           (3, 8, 128, False), (2, 2, 64, False),
                                           (1, 4, 128, True), (16, 2, 64, True)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_bsr_gm_quant_matmul_lowers_through_triton(M, bits, gs, mma, platform):
    from pallas_kernels.bsr_gm_quant_matmul import (GroupMajorBlocks, GroupMajorConfig,
                                                    bsr_gm_quant_matmul)
    K, N, T, programs = 512, 384, 64, 24
    cfg = dataclasses.replace(GroupMajorConfig.for_shape(platform, M), mma=mma)

    def f(x, c, s, z, rows, pg):
        return bsr_gm_quant_matmul(x, GroupMajorBlocks(c, s, z, rows, pg), out_features=N,
                                   bits=bits, group_size=gs, config=cfg)

    nnz = T * programs
    args = (S((M, K), jnp.bfloat16), S((nnz, gs * bits // 32), jnp.int32),
            S((nnz,), jnp.float16), S((nnz,), jnp.uint8), S((nnz,), jnp.int32),
            S((programs,), jnp.int32))
    module = export_for(platform, f, *args)
    assert module.count(TRITON_CALL) == 1


# dequantize_packed: codes int32 [K * bits / 32, N], scales/zeros [G, N].
@pytest.mark.parametrize("K,N,bits,gs", [(512, 384, 4, 128), (200, 17, 4, 64), (256, 96, 8, -1),
                                          (128, 40, 2, 32)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_dequantize_kernel_lowers_through_triton(K, N, bits, gs, platform):
    """The streaming dequantize kernel (pallas_kernels.dequant): one Triton call, masked edge
    tiles included."""
    from pallas_kernels.dequant import dequantize_packed
    G = 1 if gs == -1 else -(-K // gs)
    args = (S((K * bits // 32, N), jnp.int32), S((G, N), jnp.float16), S((G, N), jnp.uint8))

    def f(q, s, z):
        return dequantize_packed(q, s, z, bits=bits, group_size=gs, K=K)

    assert export_for(platform, f, *args).count(TRITON_CALL) == 1


# kv_write: rows [T, K, H], slots [T], pools [K, S, H] aliased to the outputs.
@pytest.mark.parametrize("T,K,H,block_t", [(482, 8, 128, 16), (1, 1, 64, 16), (37, 3, 128, 4)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_kv_write_lowers_through_triton(T, K, H, block_t, platform):
    """The in-place K/V write (pallas_kernels.kv_write): one Triton call, its pools aliased to
    its outputs."""
    from pallas_kernels.kv_write import KVWriteConfig, kv_write
    rows = S((T, K, H), jnp.bfloat16)
    pools = S((K, 4096, H), jnp.bfloat16)

    def f(k, v, slots, kp, vp):
        return kv_write(k, v, slots, kp, vp, config=KVWriteConfig(block_t=block_t))

    text = export_for(platform, f, rows, rows, S((T,), jnp.int32), pools, pools)
    assert text.count(TRITON_CALL) == 1


# add_rms_norm: x, h [T, D], scale [D] -> (x + h, its norm).
@pytest.mark.parametrize("T,D,block_t", [(482, 4096, 2), (1, 576, 4), (37, 96, 8)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_add_rms_norm_lowers_through_triton(T, D, block_t, platform):
    """Residual add and RMS norm in one kernel (pallas_kernels.add_rms_norm): one Triton call."""
    from pallas_kernels.add_rms_norm import AddRMSNormConfig, add_rms_norm

    def f(x, h, w):
        return add_rms_norm(x, h, w, eps=1e-5, config=AddRMSNormConfig(block_t=block_t))

    text = export_for(platform, f, S((T, D), jnp.bfloat16), S((T, D), jnp.bfloat16),
                      S((D,), jnp.bfloat16))
    assert text.count(TRITON_CALL) == 1


# rope_kv_write: qkv [T, (N + 2K) H], positions and slots [T], pools [K, S, H] aliased.
@pytest.mark.parametrize("T,N,K,H,block_t", [(482, 32, 8, 128, 16), (1, 1, 1, 64, 16),
                                             (37, 7, 3, 128, 4)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_rope_kv_write_lowers_through_triton(T, N, K, H, block_t, platform):
    """Rotation and K/V write in one kernel (pallas_kernels.rope_kv_write): one Triton call."""
    from pallas_kernels.rope_kv_write import RopeKVWriteConfig, rope_kv_write
    pools = S((K, 4096, H), jnp.bfloat16)

    def f(qkv, pos, slots, kp, vp):
        return rope_kv_write(qkv, pos, slots, kp, vp, n_heads=N, theta=500000.0,
                             config=RopeKVWriteConfig(block_t=block_t))

    text = export_for(platform, f, S((T, (N + 2 * K) * H), jnp.bfloat16), S((T,), jnp.int32),
                      S((T,), jnp.int32), pools, pools)
    assert text.count(TRITON_CALL) == 1


# quant_matmul_wl: x [M, K], the GPTQ words transposed [N, K / P], scales and zeros [G, N].
@pytest.mark.parametrize("M,K,N,split", [(1, 4096, 28672, 1), (16, 14336, 4096, 8),
                                         (3, 256, 200, 2)])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_quant_matmul_wl_lowers_through_triton(M, K, N, split, platform):
    """The weights-left W4 product: one Triton call (and XLA ops around it)."""
    from pallas_kernels.quant_matmul_wl import WeightsLeftConfig, quant_matmul_wl

    def f(x, qt, s, z):
        return quant_matmul_wl(x, qt, s, z, bits=4, group_size=128,
                               config=WeightsLeftConfig(block_n=64, split_k=split))

    text = export_for(platform, f, S((M, K), jnp.bfloat16), S((N, K // 8), jnp.int32),
                      S((K // 128, N), jnp.float16), S((K // 128, N), jnp.uint8))
    assert text.count(TRITON_CALL) == 1


# row_block_quant_matmul: x [M, K], qweight int32 [R gs b / 32, N], scales/zeros [R, N],
# group_map int32 [N / B, R] (the dense kernel over each block's kept groups).
@pytest.mark.parametrize("M,config", [
    (1, dict(block_m=1, block_n=64, block_k=512, split_k=4, fma=True, runtime_magic=True,
             wrapper_sums=True, raw_x=True)),
    (1, dict(block_m=1, block_n=32, block_k=256, split_k=2, fma=True)),
    (16, dict(block_m=16, block_n=32, block_k=128, split_k=2)),
    (16, dict(block_m=16, block_n=64, block_k=128, joined=True)),
])
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_row_block_quant_matmul_lowers_through_triton(M, config, platform):
    from pallas_kernels.quant_matmul import QuantMatmulConfig
    from pallas_kernels.row_block_quant_matmul import row_block_quant_matmul
    K, N, R, B = 2048, 512, 8, 64
    cfg = QuantMatmulConfig(num_warps=4, num_stages=2, **config)

    def f(x, qw, s, z, gmap):
        return row_block_quant_matmul(x, qw, s, z, gmap, bits=4, group_size=128, row_block=B,
                                      config=cfg)

    args = (S((M, K), jnp.bfloat16), S((R * 16, N), jnp.int32), S((R, N), jnp.float16),
            S((R, N), jnp.uint8), S((N // B, R), jnp.int32))
    module = export_for(platform, f, *args)
    assert module.count(TRITON_CALL) == 1
