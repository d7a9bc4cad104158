import jax
import numpy as np
import pytest

import optgqa_jax as og
from optgqa_jax.config import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_count_parameters(name):
    cfg = og.ModelConfig.preset(name)
    abstract = og.abstract_params(cfg)  # shapes only: no memory even for llama3-8b
    counted = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
    assert counted == cfg.num_params


def test_llama3_presets_are_gqa_and_mha_twins():
    gqa, mha = og.ModelConfig.preset("llama3-8b"), og.ModelConfig.preset("llama3-8b-mha")
    assert (gqa.n_heads, gqa.n_kv_heads) == (32, 8)
    assert (mha.n_heads, mha.n_kv_heads) == (32, 32)
    assert gqa.replace(n_kv_heads=32) == mha
    # K and V, 32 layers, 8 KV heads of 128 in bfloat16: 2*32*8*128*2 bytes.
    assert gqa.kv_bytes_per_token == 131072
    assert mha.kv_bytes_per_token == 4 * gqa.kv_bytes_per_token


def test_llama3_70b_preset_has_the_published_size():
    """Llama-3-70B: 80 layers, 64 query / 8 KV heads of 128, SwiGLU 28672, untied 128256-token
    embeddings: 70.55B parameters (shapes only, no memory)."""
    cfg = og.ModelConfig.preset("llama3-70b")
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (80, 64, 8, 128)
    assert 70.5e9 < cfg.num_params < 70.6e9
    assert cfg.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2


def test_default_kv_head_map_is_contiguous_groups():
    cfg = og.ModelConfig.preset("tiny", n_heads=6, n_kv_heads=2)
    assert cfg.layer_kv_head_map(0) == (0, 0, 0, 1, 1, 1)
    mqa = cfg.replace(n_kv_heads=1)
    assert mqa.layer_kv_head_map(1) == (0,) * 6
    assert cfg.has_contiguous_groups(0)


def test_explicit_kv_head_map_normalised_and_hashable():
    cfg = og.ModelConfig.preset("tiny", kv_head_map=[[1, 0, 1, 0], [0, 0, 0, 1]])
    assert cfg.kv_head_map == ((1, 0, 1, 0), (0, 0, 0, 1))
    assert not cfg.has_contiguous_groups(0)
    hash(cfg)
    assert og.ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("changes, match", [
    (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(n_kv_heads=8), "must not exceed n_heads"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(n_layers=2.5), "n_layers must be a positive integer"),
    (dict(position="learned"), "position must be one of"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(head_dim=15), "head_dim must be even for RoPE"),
    (dict(norm_eps=0.0), "norm_eps must be a positive number"),
    (dict(kv_head_map=[[0, 1, 0, 1]]), "has 1 layers, expected n_layers=2"),
    (dict(kv_head_map=[[0, 1, 0], [0, 1, 0]]), r"kv_head_map\[0\] has 3 entries"),
    (dict(kv_head_map=[[0, 1, 2, 1], [0, 1, 0, 1]]), "outside"),
    (dict(kv_head_map=[[0, 0, 0, 0], [0, 1, 0, 1]]), r"leaves KV heads \[1\] unused"),
])
def test_invalid_config_raises_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        og.ModelConfig.preset("tiny", **changes)


def test_unknown_preset_and_unknown_fields():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        og.ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        og.ModelConfig.from_dict({**og.ModelConfig.preset("tiny").to_dict(), "n_experts": 8})


def test_non_power_of_two_head_counts_allowed():
    cfg = og.ModelConfig.preset("tiny", n_heads=12, n_kv_heads=4, head_dim=8)
    assert cfg.group_size == 3
