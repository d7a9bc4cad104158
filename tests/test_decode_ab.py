"""experiments/alibi_ab.py, group_tiles_ab.py, kv_write_bench.py and profile_bsr_call.py on the
CPU: the variants each shape times, the rows' ratios, the K/V write variants against a plain
numpy write, and the per-call profile's checked rows."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import alibi_ab  # noqa: E402
import bench_kernels  # noqa: E402
import group_tiles_ab  # noqa: E402
import kv_write_bench  # noqa: E402
import profile_bsr_call  # noqa: E402


def _names(rows):
    return [r["variant"] for r in rows]


def test_alibi_ab_times_candidates_only_for_groups_that_are_not_powers_of_two():
    rng = np.random.default_rng()
    pow2 = bench_kernels.DecodeShape("p", 2, 32, 8, 2, head_dim=16, page=16,
                                     min_context=int(rng.integers(1, 32)))
    rows = alibi_ab.shape_rows(pow2, jnp.bfloat16, 2, 1e12)
    assert _names(rows) == ["no ALiBi, default", "ALiBi, default"]
    odd = bench_kernels.DecodeShape("o", 3, 48, 14, 2, head_dim=16, page=16,
                                    min_context=int(rng.integers(1, 48)))
    rows = alibi_ab.shape_rows(odd, jnp.float16, 1, 1e12)
    names = _names(rows)
    # the defaults of a short table (without ALiBi 32-key blocks read ahead on 2 warps, with
    # it 64-key blocks read ahead) are not timed twice
    assert len(names) == len(set(names)) == 2 + len(alibi_ab.PLAIN_CANDIDATES) - 1 + \
        len(alibi_ab.CANDIDATES) - 1, names
    base = rows[0]
    assert base["variant"] == "no ALiBi, default" and base["vs_no_alibi"] == 1.0
    for r in rows:
        assert len(r["rounds_ms"]) == 1 and r["ms"] > 0 and np.isfinite(r["vs_no_alibi"])
        assert 0 <= r["rel_err"] <= alibi_ab.TOLERANCE
        assert np.isclose(r["vs_no_alibi"], r["ms"] / base["ms"])
    assert rows[0]["config"] == "kpb=32 prefetch=tables w=2 masked/replicated rows"
    assert rows[1]["config"] == "kpb=64 prefetch=tables w=4 masked/replicated rows"
    md = alibi_ab.markdown(dict(device="cpu", jax=jax.__version__, commit="x", date="d",
                                copy_gbps=1.0, rounds=1), rows)
    assert md.count("\n| o | float16 |") == len(rows)


def test_group_tiles_candidates_are_distinct_valid_configs():
    labels = [group_tiles_ab.label(c) for c in group_tiles_ab.CANDIDATES]
    assert len(labels) == len(set(labels)) == 16
    for c in group_tiles_ab.CANDIDATES:
        c.validate()
        assert c.replicate_queries


def test_kv_write_variants_write_the_same_rows():
    rng = np.random.default_rng()
    S, T, real = 64, 12, int(rng.integers(1, 12))
    k = jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                          (T, kv_write_bench.K, 4), jnp.float32)
    outs = []
    for variant in ("current", "unique", "unique+sorted"):
        slots = kv_write_bench.step_slots(np.random.default_rng(5), S, T, real, variant)
        assert slots.shape == (T,) and (slots[real:] >= S).all()
        assert len(set(slots[:real])) == real and (slots[:real] < S).all()
        if variant != "current":
            assert len(set(slots)) == T          # padding at distinct slots past the pool
        pk = jnp.zeros((kv_write_bench.K, S, 4), jnp.float32)
        got, _ = kv_write_bench.write(pk, pk, jnp.asarray(slots), k, k,
                                      unique=variant != "current",
                                      ordered=variant == "unique+sorted")
        want = np.zeros((kv_write_bench.K, S, 4), np.float32)
        want[:, slots[:real]] = np.moveaxis(np.asarray(k[:real]), 1, 0)
        np.testing.assert_array_equal(np.asarray(got), want)
        outs.append(set(slots[:real].tolist()))
    assert outs[1] == outs[2]                      # sorting reorders, keeps the slots


def test_profile_bsr_call_checks_every_format_on_the_cpu(tmp_path):
    """experiments/profile_bsr_call.py --interpret: one row per format, each product checked
    against float64 first; a bad --shape fails before any work."""
    profile_bsr_call.main(["--interpret", "--shape", "256x40", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "profile_bsr_call.json").read_text())
    assert [r["format"] for r in res["rows"]] == list(profile_bsr_call.FORMATS)
    for r in res["rows"]:
        assert 0 <= r["rel_err"] <= 1e-2 and r["us"] > 0 and r["weight_bytes"] > 0
    sparse_rows = [r for r in res["rows"] if r["format"] != "w4g128"]
    assert all(r["weight_bytes"] < res["rows"][0]["weight_bytes"] for r in sparse_rows)
    md = (tmp_path / "profile_bsr_call.md").read_text()
    assert md.count("| custom 256x40 |") == len(profile_bsr_call.FORMATS)
    for bad in ("256", "100x40", "256x0"):
        with pytest.raises(SystemExit):
            profile_bsr_call.main(["--interpret", "--shape", bad, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        profile_bsr_call.main(["--interpret", "--shapes", "qkv,nope", "--out", str(tmp_path)])


@pytest.mark.parametrize("module", [alibi_ab, group_tiles_ab])
def test_gpu_rounds_scripts_refuse_bad_rounds_and_a_cpu(module, tmp_path, monkeypatch):
    """timing.start_gpu_rounds, the start of alibi_ab.py and group_tiles_ab.py: --rounds 0 is
    an argument error, and on a CPU the script exits before measuring anything or writing
    --out."""
    out = tmp_path / "out"
    for argv, code in ((["--rounds", "0"], 2), ([], None)):
        monkeypatch.setattr(sys, "argv", [module.__name__, "--out", str(out), *argv])
        with pytest.raises(SystemExit) as e:
            module.main()
        if code is not None:
            assert e.value.code == code
        else:
            assert "needs a GPU" in str(e.value.code)
    assert not out.exists()
