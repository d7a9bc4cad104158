"""Tables of tile settings measured on one GPU, looked up by device kind and problem shape.

A kernel's ``Config.for_shape`` rules give sound tiles on every device. A tile search on a GPU
(``experiments/tune_quant.py`` for the quantized matmul) finds faster ones for the shapes that
matter, and writes them to a JSON table; ``for_shape`` then takes the table's entry where the
device kind and the shape match exactly, and falls back to its rules elsewhere. This is the
role of vLLM's per-device kernel config files.

Where tables come from, first match wins:

1. the files named in the environment variable ``OPTGQA_TUNING`` (paths separated by
   ``os.pathsep``; a directory stands for ``<dir>/<kernel>.json``);
2. the table shipped with the package, ``pallas_kernels/tuning/<kernel>.json``.

``OPTGQA_TUNING=off`` turns every table off (the rules alone; what a benchmark compares the
tables against).

File format (one kernel per file)::

    {"kernel": "quant_matmul",
     "entries": [{"device": "NVIDIA H100 80GB HBM3",
                  "key": {"bits": 4, "group_size": 128, "K": 4096, "N": 28672, "M": 1},
                  "config": {"block_m": 1, "block_n": 64, ...},
                  "us": 40.2, "source": "experiments/results/h100/quant/tune_quant_<commit>.json"}]}

``key`` and ``config`` are required; other fields (time, provenance) are kept for readers.
"""

from __future__ import annotations

import json
import os
from typing import Optional

ENV = "OPTGQA_TUNING"
PACKAGED_DIR = os.path.join(os.path.dirname(__file__), "tuning")


def table_paths(kernel: str) -> list[str]:
    """The table files consulted for ``kernel``, in order (see the module docstring).

    Raises:
      ValueError: ``OPTGQA_TUNING`` names a path that does not exist.
    """
    env = os.environ.get(ENV, "")
    if env.strip().lower() == "off":
        return []
    paths = []
    for p in filter(None, env.split(os.pathsep)):
        if os.path.isdir(p):    # a directory may hold tables for some kernels only
            paths.append(os.path.join(p, f"{kernel}.json"))
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise ValueError(f"{ENV}={env!r}: {p!r} is neither a tuning table file nor a "
                             "directory (or set it to 'off')")
    paths.append(os.path.join(PACKAGED_DIR, f"{kernel}.json"))
    return paths


_CACHE: dict[tuple[str, float], list[dict]] = {}


def load_table(path: str, kernel: Optional[str] = None) -> list[dict]:
    """The entries of one table file ([] if it does not exist), checked for form.

    Raises:
      ValueError: the file is not a table (naming the file and what is wrong).
    """
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return []
    if (path, mtime) in _CACHE:
        return _CACHE[(path, mtime)]
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"tuning table {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"tuning table {path}: expected an object with an 'entries' list")
    if kernel is not None and data.get("kernel", kernel) != kernel:
        raise ValueError(f"tuning table {path} is for kernel {data.get('kernel')!r}, "
                         f"expected {kernel!r}")
    for i, e in enumerate(data["entries"]):
        if not (isinstance(e, dict) and isinstance(e.get("device"), str)
                and isinstance(e.get("key"), dict) and isinstance(e.get("config"), dict)):
            raise ValueError(f"tuning table {path}: entry {i} needs 'device' (a string), "
                             "'key' and 'config' (objects)")
    _CACHE[(path, mtime)] = data["entries"]
    return data["entries"]


def lookup_entry(kernel: str, device: str, key: dict) -> Optional[dict]:
    """The whole table entry (config, times, provenance) for ``device`` and ``key``, or None."""
    for path in table_paths(kernel):
        for e in load_table(path, kernel):
            if e["device"] == device and e["key"] == key:
                return dict(e)
    return None


def lookup(kernel: str, device: str, key: dict) -> Optional[dict]:
    """The tuned config (a dict of the config's fields) for ``device`` and ``key``, or None."""
    e = lookup_entry(kernel, device, key)
    return None if e is None else dict(e["config"])


def tuned_config(kernel: str, cls, device: str, key: dict):
    """``cls(**entry)`` for the entry of ``device`` and ``key`` (validated), or None without one.

    Raises:
      ValueError: the entry does not build a valid ``cls`` (naming the kernel, device and key).
    """
    hit = lookup(kernel, device, key)
    if hit is None:
        return None
    try:
        cfg = cls(**hit)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{kernel} tuning table entry for {device!r}, {key}: {e}") from None
    return cfg


def write_entries(path: str, kernel: str, entries: list[dict]) -> None:
    """Merge ``entries`` into the table at ``path`` (created if absent): an entry replaces one
    of the same device and key; the others stay."""
    old = load_table(path, kernel) if os.path.exists(path) else []
    new_keys = {(e["device"], json.dumps(e["key"], sort_keys=True)) for e in entries}
    kept = [e for e in old if (e["device"], json.dumps(e["key"], sort_keys=True)) not in new_keys]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"kernel": kernel, "entries": kept + list(entries)}, f, indent=1)
        f.write("\n")
