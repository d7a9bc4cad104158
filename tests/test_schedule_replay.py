"""experiments/schedule_replay.py: the engine's schedule of a benchmark workload, replayed on
the CPU, and the padding arithmetic of its bucket comparison."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import schedule_replay as S  # noqa: E402


def test_bucket_sets_and_padding():
    assert S.bucket_set("pow2", 100) == (16, 32, 64, 100)
    assert S.bucket_set("256", 1000) == (256, 512, 768, 1000)
    assert S.bucket_set("512", 1024) == (512, 1024)
    assert S.bucket_set("300,100,2000", 1024) == (100, 300, 1024)
    for bad in ("0", "-3", ",", "x"):
        with pytest.raises(ValueError):
            S.bucket_set(bad, 64)
    p = S.padding([1, 16, 17, 100], (16, 32, 128))
    assert (p["real_rows"], p["padded_rows"]) == (134, 16 + 16 + 32 + 128)
    assert p["padding_fraction"] == pytest.approx(1 - 134 / 192)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_replay_accounts_for_every_token(tmp_path, async_scheduling):
    """Every prompt token and every generated token but each request's last goes through
    exactly one step (no preemption here), and the report is written."""
    args = ["--num-requests", "12", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
            "--input-range", "5", "90", "--output-range", "1", "9", "--no-progress",
            "--what-if", "pow2", "--what-if", "16,48", "--out", str(tmp_path)]
    if not async_scheduling:
        args.append("--no-async-scheduling")
    S.main(args)
    import json

    r = json.loads((tmp_path / "schedule_replay.json").read_text())
    assert r["preemptions"] == 0 and r["async_scheduling"] == async_scheduling
    rows = r["decode"]["padding"]["real_rows"] + r["mixed"]["padding"]["real_rows"]
    assert rows == r["input_tokens"] + r["output_tokens"] - r["num_requests"]
    assert sum(r["mixed_tokens"]) == r["mixed"]["padding"]["real_rows"]
    assert max(r["mixed_tokens"]) <= 64 and r["mixed"]["steps"] >= 1
    assert r["what_if"]["16,48"]["buckets"] == [16, 48, 64]
    assert r["what_if"]["powers of two from 16"]["padding_fraction"] <= \
        r["what_if"]["the run's"]["padding_fraction"] + 1e-12
    assert "| mixed |" in (tmp_path / "schedule_replay.md").read_text()
