"""Runs ``sharded_cases.py`` in a subprocess with four CPU devices
(``--xla_force_host_platform_device_count=4``), so this process keeps its one device."""

import os
import subprocess
import sys

import pytest

import jax
from jax.sharding import PartitionSpec as P

import optgqa_jax as og
from optgqa_jax import sharding

HERE = os.path.dirname(__file__)


def test_sharded_cases_on_four_cpu_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=4").strip())
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(HERE, "sharded_cases.py")], env=env, cwd=HERE,
                       capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail, tail


def test_one_device_mesh_is_the_identity_plan():
    cfg = og.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=8, ffn_dim=48)
    params = og.init_params(cfg, jax.random.PRNGKey(0))
    specs = sharding.partition_specs(cfg, params, sharding.make_mesh(1, 1))
    flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert all(all(a is None for a in s) for s in flat)


@pytest.mark.parametrize("data,model", [(0, 1), (1, -2), (True, 1)])
def test_make_mesh_rejects_bad_degrees(data, model):
    with pytest.raises(ValueError, match="must be a positive integer"):
        sharding.make_mesh(data, model)


def test_make_mesh_rejects_more_devices_than_present():
    with pytest.raises(ValueError, match="devices; 1 present"):
        sharding.make_mesh(1, 2)
