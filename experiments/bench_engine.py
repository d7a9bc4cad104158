"""Offline serving benchmark of the engine (vLLM-style) with the paper's MHA-vs-GQA comparison.

Same as ``optgqa bench``; run on a GPU, e.g. the acceptance workload::

    python experiments/bench_engine.py --model llama3-8b --num-requests 1000 \\
        --input-len 256 --output-len 256 --compare-mha --hf-requests 256

Writes ``bench_engine.json``, ``bench_engine.md`` and ``bench_engine.png`` under ``--out``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from optgqa_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
