"""orbax save/load."""

import jax
import numpy as np
import pytest

import optgqa_jax as og


@pytest.mark.parametrize("preset,changes", [
    ("tiny", {}),
    ("tiny", dict(dtype="bfloat16", tie_embeddings=True)),
    ("tiny-alibi", dict(kv_head_map=[[1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 1, 1]])),
])
def test_save_load_is_bit_exact(tmp_path, preset, changes):
    cfg = og.ModelConfig.preset(preset, **changes)
    params = og.init_params(cfg, jax.random.PRNGKey(1))
    og.save_checkpoint(str(tmp_path / "ckpt"), cfg, params)
    cfg2, params2 = og.load_checkpoint(str(tmp_path / "ckpt"))
    assert cfg2 == cfg
    flat, flat2 = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(params2)
    assert [p for p, _ in flat] == [p for p, _ in flat2]
    for (path, a), (_, b) in zip(flat, flat2):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_mismatched_config_is_rejected(tmp_path):
    cfg = og.ModelConfig.preset("tiny")
    og.save_checkpoint(str(tmp_path / "ckpt"), cfg, og.init_params(cfg, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="n_kv_heads: checkpoint has 2, requested 4"):
        og.load_checkpoint(str(tmp_path / "ckpt"), cfg.replace(n_kv_heads=4))
    # Loading with the right config works.
    og.load_checkpoint(str(tmp_path / "ckpt"), cfg)


def test_params_not_matching_config_are_not_saved(tmp_path):
    cfg = og.ModelConfig.preset("tiny")
    params = og.init_params(cfg.replace(ffn_dim=96), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="gate_proj.*shape"):
        og.save_checkpoint(str(tmp_path / "ckpt"), cfg, params)


def test_errors_for_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        og.load_checkpoint(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="optgqa_config.json is missing"):
        og.load_checkpoint(str(tmp_path / "empty"))
    cfg = og.ModelConfig.preset("tiny")
    og.save_checkpoint(str(tmp_path / "ckpt"), cfg, og.init_params(cfg, jax.random.PRNGKey(0)))
    with pytest.raises(FileExistsError, match="already exists"):
        og.save_checkpoint(str(tmp_path / "ckpt"), cfg, og.init_params(cfg, jax.random.PRNGKey(0)))
