"""experiments/compare_results.py: rows matched by what they measured, ratios oriented so that
above 1 is slower for kernels (ms) and for the engine (tok/s), peers never flagged."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import compare_results as CR  # noqa: E402


def _kernel_row(impl, ms, shape="B=2 ctx=8", alibi=False, note=""):
    return dict(kernel="paged_decode", shape=shape, impl=impl, dtype="bfloat16", alibi=alibi,
                note=note, ms=ms)


def _write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_kernel_rows_matched_by_key_not_position(tmp_path):
    old = dict(meta=dict(commit="a"), rows=[_kernel_row("optgqa", 1.0), _kernel_row("xla", 4.0),
                                            _kernel_row("optgqa", 2.0, alibi=True),
                                            _kernel_row("optgqa", 9.0, shape="gone")])
    new = dict(meta=dict(commit="b"), rows=[_kernel_row("xla", 6.0),  # a peer, slower: no flag
                                            _kernel_row("optgqa", 2.2, alibi=True),  # +10%
                                            _kernel_row("optgqa", 1.03),  # +3%: under 5%
                                            dict(_kernel_row("optgqa", 0.0, shape="new"))])
    del new["rows"][3]["ms"]  # a failed row has no time and is left out
    rows, only_old, only_new = CR.compare(old, new, 0.05)
    by = {(r["key"][2], r["key"][4]): r for r in rows}
    assert by[("optgqa", "True")]["ratio"] == pytest.approx(1.1)
    assert by[("optgqa", "True")]["slower"]
    assert not by[("optgqa", "False")]["slower"]
    assert by[("xla", "False")]["ratio"] == pytest.approx(1.5) and not by[("xla", "False")]["slower"]
    assert [k[1] for k in only_old] == ["gone"] and only_new == []
    out = tmp_path / "cmp.md"
    CR.main([_write(tmp_path / "o.json", old), _write(tmp_path / "n.json", new), "--out", str(out)])
    text = out.read_text()
    assert "rows of ours slower by more than 5%: 1" in text and "**slower**" in text


def test_engine_ratio_is_time_per_token(tmp_path):
    run = dict(impl="optgqa-engine", model="llama3-8b", n_heads=32, n_kv_heads=8, quantize=None)
    old = dict(meta={}, config={}, runs=[dict(run, total_tokens_per_s=20000.0)])
    new = dict(meta={}, config={}, runs=[dict(run, total_tokens_per_s=25000.0)])
    rows, _, _ = CR.compare(old, new, 0.05)
    assert rows[0]["ratio"] == pytest.approx(0.8) and not rows[0]["slower"]
    rows, _, _ = CR.compare(new, old, 0.05)
    assert rows[0]["ratio"] == pytest.approx(1.25) and rows[0]["slower"]
    assert "25,000 tok/s" in CR.markdown(old, new, *CR.compare(old, new, 0.05)[:3], 0.05)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="bench_kernels.py or bench_engine.py"):
        CR.load(_write(tmp_path / "x.json", [1, 2]))
    k = _write(tmp_path / "k.json", dict(meta={}, rows=[]))
    e = _write(tmp_path / "e.json", dict(meta={}, runs=[]))
    with pytest.raises(SystemExit):
        CR.main([k, e])
    with pytest.raises(SystemExit):
        CR.main([k, k, "--threshold", "1.5"])
