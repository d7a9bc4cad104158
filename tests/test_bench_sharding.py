"""experiments/bench_sharding.py end to end on two CPU devices (tiny presets, a few requests),
in a subprocess so that the rest of the suite keeps one device."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "..", "experiments", "bench_sharding.py")
SMALL = ["--model-8b", "tiny", "--model-70b", "tiny-alibi", "--num-requests", "6",
         "--input-len", "8", "--output-len", "6", "--max-num-seqs", "2",
         "--max-num-batched-tokens", "16", "--batch1-requests", "2", "--batch1-len", "16",
         "--kv-memory-gib", "0.01", "--kv-memory-gib-70b", "0.01", "--copy-mib", "8",
         "--page-size", "8"]


def _run(args, devices=2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={devices}").strip())
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_parts_at_tp1_and_tp2_write_json_and_markdown(tmp_path):
    r = _run(["--out", str(tmp_path), "--parts", "8b-b1-tp1,8b-b1-tp2", *SMALL])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert set(json.loads((tmp_path / "bench_sharding.json").read_text())["runs"]) == {
        "8b-b1-tp1", "8b-b1-tp2"}
    # a second command adds its parts to the first's (--resume)
    r = _run(["--out", str(tmp_path), "--parts", "70b-tp2", "--resume", *SMALL])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads((tmp_path / "bench_sharding.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"8b-b1-tp1", "8b-b1-tp2", "70b-tp2"}
    for part, run in runs.items():
        assert "error" not in run, (part, run.get("error"))
        assert run["tensor_parallel_size"] == int(part[-1])
        assert run["output_tokens"] == run["config"]["num_requests"] * run["config"]["output_len"]
    assert runs["70b-tp2"]["decode_mbu_total"] > 0
    s = res["meta"]["summary"]
    assert s["batch1_speedup_tp2"] > 0 and s["mbu_70b_tp2"] > 0
    md = (tmp_path / "bench_sharding.md").read_text()
    assert md.count("| 8b-b1-tp") == 2 and "TP = 2 over TP = 1" in md


def test_bad_parts_and_too_few_devices_are_refused(tmp_path):
    r = _run(["--out", str(tmp_path), "--parts", "8b-tp3"], devices=2)
    assert r.returncode != 0 and "unknown" in r.stderr
    r = _run(["--out", str(tmp_path), "--parts", "8b-tp2"], devices=1)
    assert r.returncode != 0 and "need 2 devices" in r.stderr
