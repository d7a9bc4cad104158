"""The serving benchmark (``optgqa bench``) on a tiny model on CPU: what it counts and reports.

The copy-bandwidth ceiling is replaced by a constant (measuring it copies GiBs), and the runs
happen in this process instead of subprocesses.
"""

import math

import pytest

from optgqa_jax import benchmark as B


@pytest.fixture
def fixed_ceiling(monkeypatch):
    monkeypatch.setattr(B, "copy_bandwidth", lambda *a, **k: 1e11)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_engine_run_counts_every_token_and_reports_mbu(fixed_ceiling, async_scheduling):
    bc = B.BenchConfig(model="tiny", num_requests=5, input_len=11, output_len=6, max_num_seqs=4,
                       seq_buckets=(4,), token_buckets=(64,), max_num_batched_tokens=64,
                       async_scheduling=async_scheduling)
    r = B.run_engine(bc)
    assert (r["num_requests"], r["input_tokens"], r["output_tokens"]) == (5, 55, 30)
    assert r["compiles_during_run"] == 0 and r["preemptions"] == 0
    assert math.isclose(r["total_tokens_per_s"], 85 / r["elapsed_s"])
    assert r["decode_steps"] > 0 and r["decode_mbu"]["p50"] > 0
    assert 0 < r["decode_mbu_total"] < math.inf
    assert r["latency_s"]["p99"] >= r["latency_s"]["p50"] > 0
    md = B.markdown(dict(device="cpu"), [r])
    assert "optgqa-engine tiny (5 req) | 4/2 |" in md


def test_mha_twin_has_one_kv_head_per_query_head():
    cfg = B.model_config(B.BenchConfig(model="tiny", mha_twin=True))
    assert cfg.n_kv_heads == cfg.n_heads


def test_command_line_defaults_match_the_engine(fixed_ceiling):
    import argparse

    parser = argparse.ArgumentParser()
    B.add_arguments(parser)
    bc = B.config_from_args(parser.parse_args([]))
    assert bc.async_scheduling and bc.fuse_projections
    bc = B.config_from_args(parser.parse_args(["--no-async-scheduling", "--no-fuse-projections"]))
    assert not bc.async_scheduling and not bc.fuse_projections
