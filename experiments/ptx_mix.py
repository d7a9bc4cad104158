"""Instruction mix of the kernels in PTX files that XLA dumped: which instructions a loop runs.

For a kernel bound by instruction issue rather than by bytes (``quant_matmul`` at one row reads
4- and 8-bit weights in the same time), the loop body's instruction count per code is the
number to cut. Dump a run's PTX with ``XLA_FLAGS=--xla_dump_to=DIR`` (the Triton kernels of
Pallas calls are in the module's ``.ptx`` files), then::

    python experiments/ptx_mix.py DIR --kernel optgqa_quant_matmul [--top 25] [--json OUT]

For every ``.entry`` whose name contains ``--kernel``: the instruction count by opcode (the
opcode's first two dot-separated parts, e.g. ``ld.global``, ``fma.rn``), for the whole kernel
and for each loop (a block of instructions between a label and a branch back to it; nested
loops are reported at each level), loads and stores by state space and width, and the
branch-back label of each loop so it can be found in the file.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

ENTRY = re.compile(r"^\s*\.(?:visible\s+)?\.entry\s+([\w$]+)\s*\(")
LABEL = re.compile(r"^\s*([\w$]+):\s*(?://.*)?$")
BRANCH = re.compile(r"\bbra(?:\.uni)?\s+([\w$]+)\s*;")


def kernels(text: str) -> dict:
    """{entry name: list of its body lines} of one PTX text."""
    out, name, depth, body, opened = {}, None, 0, [], False
    for line in text.splitlines():
        m = ENTRY.match(line)
        if m and name is None:
            name, depth, body, opened = m.group(1), 0, [], False
            continue
        if name is None:
            continue
        if not opened:                      # parameter list and directives before the body
            if line.strip().startswith("{"):
                opened = True
            else:
                continue
        depth += line.count("{") - line.count("}")
        body.append(line)
        if depth == 0:
            out[name] = body
            name = None
    return out


def opcode(line: str):
    """The opcode of one PTX instruction line (None for labels, directives, braces)."""
    s = line.split("//")[0].strip()
    if not s or s.endswith(":") or s.startswith((".", "{", "}")):
        return None
    if s.startswith("@"):                                  # predicated: @%p1 bra ...
        s = s.split(None, 1)[1] if " " in s else ""
    op = s.split(None, 1)[0].rstrip(";")
    return ".".join(op.split(".")[:2]) if op else None


def mix(lines) -> collections.Counter:
    return collections.Counter(op for op in map(opcode, lines) if op)


# int-to-float conversions (cvt to a float type from an integer one): I2F on NVIDIA GPUs,
# which the CUDA C++ Programming Guide's throughput table puts at 16 results per clock per SM
# on compute capability 8.x/9.0, against 64 for 32-bit integer logic and 128 for float32 FMA.
I2F = re.compile(r"\bcvt(?:\.rn|\.rz|\.rm|\.rp)?(?:\.sat)?\.(?:f16|bf16|f32|f64)\.[us](?:8|16|32|64)\b")


def int_to_float(lines) -> int:
    """Number of int-to-float conversion instructions among PTX `lines`."""
    return sum(1 for line in lines if I2F.search(line.split("//")[0]))


def loops(lines) -> list[dict]:
    """Loops: a label and a later branch back to it; their instruction mixes."""
    labels = {}
    found = []
    for i, line in enumerate(lines):
        m = LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = BRANCH.search(line)
        if b and b.group(1) in labels and labels[b.group(1)] < i:
            body = lines[labels[b.group(1)]:i + 1]
            found.append(dict(label=b.group(1), lines=len(body), mix=mix(body),
                              int_to_float=int_to_float(body)))
    return found


# SASS as `cuobjdump -sass` prints it: "/*0a70*/   @P0 BRA 0x5e0 ;"
SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
SASS_I2F = ("I2F", "I2FP")


def sass_instructions(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every instruction in SASS text."""
    out = []
    for line in text.splitlines():
        m = SASS_LINE.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        if body.startswith("@"):                                  # predicate guard
            body = body.split(None, 1)[1] if " " in body else ""
        op, _, rest = body.partition(" ")
        if op:
            out.append((int(m.group(1), 16), op, rest))
    return out


def sass_loops(text: str) -> list[dict]:
    """Loops of SASS text: a branch back to a lower address; per loop the instruction count,
    the mix by opcode (first dot-separated part, e.g. LOP3, FFMA, HMMA) and int-to-float
    conversions (I2F, I2FP)."""
    ins = sass_instructions(text)
    found = []
    for addr, op, rest in ins:
        if op.split(".")[0] != "BRA":
            continue
        target = re.match(r"\s*`?\(?(?:\.L_x_\d+)?\)?\s*(0x[0-9a-f]+)", rest)
        if not target or int(target.group(1), 16) >= addr:
            continue
        lo = int(target.group(1), 16)
        body = [o for a, o, _ in ins if lo <= a <= addr]
        mix_ = collections.Counter(o.split(".")[0] for o in body)
        found.append(dict(start=lo, end=addr, count=len(body), mix=mix_,
                          int_to_float=sum(mix_[k] for k in SASS_I2F)))
    return found


def memory(m: collections.Counter) -> dict:
    return {op: n for op, n in m.items() if op.startswith(("ld.", "st.", "cp.", "atom", "red."))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dump", help="a .ptx file or a folder searched for them")
    p.add_argument("--kernel", default="", help="substring of the .entry names to report")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="write the report here too")
    a = p.parse_args(argv)
    files = ([a.dump] if os.path.isfile(a.dump)
             else sorted(glob.glob(os.path.join(a.dump, "**", "*.ptx"), recursive=True)))
    if not files:
        found = sorted(glob.glob(os.path.join(a.dump, "**", "*"), recursive=True))
        kinds = collections.Counter(os.path.basename(f).split(".", 1)[-1] for f in found
                                    if os.path.isfile(f))
        raise SystemExit(f"no .ptx files under {a.dump!r} (run with XLA_FLAGS=--xla_dump_to=DIR); "
                         f"it holds {len(found)} entries, by suffix: {dict(kinds.most_common(20))}")
    report = []
    for f in files:
        with open(f) as fh:
            for name, body in kernels(fh.read()).items():
                if a.kernel not in name:
                    continue
                whole = mix(body)
                entry = dict(file=f, kernel=name, instructions=sum(whole.values()),
                             mix=dict(whole.most_common(a.top)), memory=memory(whole),
                             loops=[dict(label=l["label"], instructions=sum(l["mix"].values()),
                                         mix=dict(l["mix"].most_common(a.top)),
                                         memory=memory(l["mix"])) for l in loops(body)])
                report.append(entry)
                print(f"== {name} ({os.path.basename(f)}): {entry['instructions']} instructions")
                print("   " + ", ".join(f"{op} {n}" for op, n in whole.most_common(a.top)))
                for l in entry["loops"]:
                    print(f"   loop {l['label']}: {l['instructions']} instructions: "
                          + ", ".join(f"{op} {n}" for op, n in l["mix"].items()))
    if not report:
        raise SystemExit(f"no kernel named like {a.kernel!r} in {len(files)} .ptx file(s)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
