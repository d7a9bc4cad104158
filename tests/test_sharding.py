"""Runs ``sharded_cases.py`` in a subprocess with four CPU devices
(``--xla_force_host_platform_device_count=4``), so this process keeps its one device."""

import os
import subprocess
import sys

import numpy as np
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


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_jax_distributed_run():
    """Two processes on this machine join through sharding.initialize_distributed (gloo CPU
    collectives) and run a sharded forward and a sharded (FSDP) training run across both."""
    import json
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", OPTGQA_COORDINATOR=f"127.0.0.1:{port}",
                   OPTGQA_NUM_PROCESSES="2", OPTGQA_PROCESS_ID=str(pid))
        # this process's XLA_FLAGS (conftest's fast-compile options; one device per process)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out[-3000:]
            outs.append(json.loads([l for l in out.splitlines() if l.startswith("{")][-1]))
    finally:
        for p in procs:
            p.kill()
    assert sorted(o["process"] for o in outs) == [0, 1]
    for o in outs:
        assert o["devices"] == 2
        assert o["logits_err"] <= 1e-5
        want, got = np.asarray(o["want_loss"]), np.asarray(o["loss"])
        assert np.isfinite(got).all() and got.shape == want.shape == (2,)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("kwargs,env,match", [
    (dict(), {}, "coordinator_address is not given and OPTGQA_COORDINATOR is not set"),
    (dict(coordinator_address="localhost"), {}, "must be host:port"),
    (dict(coordinator_address="h:1", num_processes="two", process_id=0), {}, "must be an integer"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, r"must lie in \[0, "),
    (dict(coordinator_address="h:1"), {"OPTGQA_NUM_PROCESSES": "2"},
     "process_id is not given and OPTGQA_PROCESS_ID is not set"),
])
def test_initialize_distributed_rejects_bad_settings(kwargs, env, match, monkeypatch):
    for var in (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed(**kwargs)


def test_tensor_parallel_engine_bad_degrees_raise_before_weights_move():
    cfg = og.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=8, ffn_dim=48)
    params = og.init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="must divide the query heads"):
        og.Engine(cfg, params, og.EngineConfig(num_pages=8, tensor_parallel_size=3))
    with pytest.raises(ValueError, match="needs 2 devices; 1 present"):
        og.Engine(cfg, params, og.EngineConfig(num_pages=8, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        og.EngineConfig(tensor_parallel_size=0)
