"""A copy of a tuning table with some options set on chosen entries: the table an A/B run
passes as ``OPTGQA_TUNING`` (``pallas_kernels.tuning``) to time an option in the engine on
the tiles the packaged table already holds.

Usage::

    python experiments/table_variant.py --table pallas_kernels/tuning/quant_matmul.json \\
        --device "NVIDIA H100 80GB HBM3" --rows 1 --shapes 4096x28672 \\
        --set raw_x=true kernel_sums=true wrapper_sums=false runtime_magic=true \\
        --out experiments/results/h100/quant/tables_wrapperless/quant_matmul.json

Only the entries of ``--device`` whose key has ``M`` in ``--rows`` (and, with ``--shapes``,
``K x N`` among them) are kept and changed; every
changed config must pass the kernel config's ``validate`` (``--kernel`` names it: the table's
``kernel`` field), and each entry records what was set (``variant``) in place of its timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pallas_kernels import tuning  # noqa: E402

CONFIGS = {"quant_matmul": ("pallas_kernels.quant_matmul_config", "QuantMatmulConfig"),
           "bsr_quant_matmul": ("pallas_kernels.bsr_quant_matmul_config", "BSRMatmulConfig")}


def parse_settings(items) -> dict:
    """``["raw_x=true", "num_stages=2"]`` -> ``{"raw_x": True, "num_stages": 2}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        low = value.strip().lower()
        if low in ("true", "false"):
            out[name] = low == "true"
        else:
            try:
                out[name] = int(value)
            except ValueError:
                raise ValueError(f"--set {item!r}: VALUE must be true, false or an integer")
    return out


def variant_entries(entries: list, device: str, rows: set, settings: dict, cls,
                    shapes=None) -> list:
    """The entries of `device` with ``key["M"]`` in `rows` (and ``(K, N)`` in `shapes` unless
    None), their configs updated with `settings` and checked by
    ``cls(**config).validate()``; timing fields dropped."""
    fields = set(cls.__dataclass_fields__)
    unknown = set(settings) - fields
    if unknown:
        raise ValueError(f"--set: {sorted(unknown)} are not {cls.__name__} fields")
    out = []
    for e in entries:
        if e["device"] != device or e["key"].get("M") not in rows:
            continue
        if shapes is not None and (e["key"].get("K"), e["key"].get("N")) not in shapes:
            continue
        config = dict(e["config"], **settings)
        try:
            cls(**config).validate()
        except (TypeError, ValueError) as err:
            raise ValueError(f"entry {e['key']}: {err}") from None
        out.append(dict(device=device, key=e["key"], config=config,
                        variant=dict(settings, of=e.get("source", "")),
                        commit=e.get("commit")))
    if not out:
        raise ValueError(f"no entry of {device!r} with M in {sorted(rows)}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--rows", default="1", help="comma-separated row buckets M of the keys")
    p.add_argument("--shapes", default=None,
                   help="comma-separated KxN of the keys to change (default: all), e.g. "
                        "4096x28672")
    p.add_argument("--set", nargs="+", required=True, metavar="NAME=VALUE")
    p.add_argument("--out", required=True, help="the variant table's path")
    a = p.parse_args(argv)
    with open(a.table) as f:
        kernel = json.load(f)["kernel"]
    if kernel not in CONFIGS:
        p.error(f"--table: kernel {kernel!r} is not one of {sorted(CONFIGS)}")
    module, name = CONFIGS[kernel]
    cls = getattr(__import__(module, fromlist=[name]), name)
    try:
        shapes = None if a.shapes is None else {
            tuple(int(v) for v in kn.lower().split("x")) for kn in a.shapes.split(",")}
    except ValueError:
        p.error(f"--shapes {a.shapes!r}: expected KxN[,KxN...], e.g. 4096x28672")
    try:
        entries = variant_entries(tuning.load_table(a.table, kernel), a.device,
                                  {int(r) for r in a.rows.split(",")}, parse_settings(a.set),
                                  cls, shapes)
    except ValueError as e:
        p.error(str(e))
    if os.path.exists(a.out):
        os.remove(a.out)
    tuning.write_entries(a.out, kernel, entries)
    print(f"{len(entries)} entries -> {a.out}")


if __name__ == "__main__":
    main()
