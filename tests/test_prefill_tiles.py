"""experiments/prefill_tiles.py on the CPU (interpret mode): every row of a tiny mixed step is
checked against the reference before it is timed, and an older tree's kernel loads beside
this one's."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import prefill_tiles as P  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_tiny_step_every_row_checked(tmp_path):
    P.main(["--interpret", "--prompts", "2", "--prompt-len", "32", "--decodes", "3",
            "--seqs", "8", "--tokens", "80", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "32", "--context", "5", "30", "--max-configs", "1",
            "--old-tree", ROOT, "--out", str(tmp_path)])
    r = json.loads((tmp_path / "prefill_tiles.json").read_text())
    rows = {x["impl"]: x for x in r["rows"]}
    for name in ("default", "old tree default", "prompts alone", "sweep"):
        assert rows[name]["rel_err"] < P.TOLERANCE and rows[name]["us"] > 0, rows[name]
    assert "error" in rows["cudnn (dense prompts)"]          # no cuDNN on a CPU
    assert r["shape"]["tokens"] == 80 and r["shape"]["seqs"] == 8
    assert "| default |" in (tmp_path / "prefill_tiles.md").read_text()
