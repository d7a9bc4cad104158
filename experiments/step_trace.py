"""Reading a step's device trace and its compiled HLO (for ``profile_decode.py``,
``profile_mixed.py``, ``profile_quant.py`` and ``product_probe.py``).

* :func:`traced_ops` runs a step under ``jax.profiler`` and returns :func:`op_table`'s per-op
  device time per step and the GPU's busy and idle time (and :func:`host_table`'s host side);
* :func:`op_sources` names each traced XLA kernel by the JAX operation it came from;
* :func:`op_markdown` renders those tables; :func:`hlo_summary` and :func:`gemm_calls` read the
  compiled HLO (what the step launches, which matrix products and layouts).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Optional

import jax


def op_table(trace_dir: str, steps: int, top: int = 25):
    """Per-op device time (µs per step) and call counts, plus the GPU's busy and idle time.

    Reads the trace's GPU planes; a line's idle time is its span minus the
    union of its events, i.e. the gaps between kernels.
    """
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {}, {}
    data = ProfileData.from_file(files[0])
    tables, timeline = {}, {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            events = sorted(((ev.start_ns, ev.end_ns, ev.name) for ev in line.events))
            if not events:
                continue
            totals, counts = collections.Counter(), collections.Counter()
            busy, cursor = 0.0, events[0][0]
            for start, end, name in events:
                totals[name] += end - start
                counts[name] += 1
                busy += max(0.0, end - max(start, cursor))
                cursor = max(cursor, end)
            key = f"{plane.name} | {line.name}"
            tables[key] = [(name, ns / steps / 1e3, counts[name] / steps)
                           for name, ns in totals.most_common(top)]
            span = events[-1][1] - events[0][0]
            timeline[key] = dict(span_ms_per_step=span / steps / 1e6,
                                 busy_ms_per_step=busy / steps / 1e6,
                                 idle_ms_per_step=(span - busy) / steps / 1e6,
                                 kernels_per_step=len(events) / steps)
    return tables, timeline


def host_table(trace_dir: str, steps: int, top: int = 20, lines_kept: int = 4) -> dict:
    """Where the host's time goes: per host thread of the trace, its busy time and its events
    by self time (an event's duration less that of the events nested in it), per step.

    The host threads' events are XLA's and PJRT's own annotations (the jitted call's argument
    handling, the executable's launch, each thunk or command buffer it runs); with a batch-1
    step whose kernels are short, the host's launch can take longer than the GPU's work.
    Returns ``{"<plane> | <thread>": {"busy_ms_per_step": ..., "events": [(name, self µs per
    step, inclusive µs per step, calls per step), ...]}}`` for the ``lines_kept`` busiest
    threads.
    """
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {}
    data = ProfileData.from_file(files[0])
    found = []
    for plane in data.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            events = sorted(((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name)
                             for ev in line.events), key=lambda e: (e[0], -e[1]))
            if not events:
                continue
            incl, self_ns, counts = (collections.Counter(), collections.Counter(),
                                     collections.Counter())
            stack, busy, cursor = [], 0.0, events[0][0]
            for start, end, name in events:
                while stack and stack[-1][0] <= start:   # close events that ended before
                    stack.pop()
                if stack:                                  # nested: not the parent's own time
                    self_ns[stack[-1][1]] -= end - start
                else:
                    busy += max(0.0, end - max(start, cursor))
                    cursor = max(cursor, end)
                incl[name] += end - start
                self_ns[name] += end - start
                counts[name] += 1
                stack.append((end, name))
            rows = [(name, ns / steps / 1e3, incl[name] / steps / 1e3, counts[name] / steps)
                    for name, ns in self_ns.most_common(top)]
            found.append((busy, f"{plane.name} | {line.name}", rows))
    found.sort(key=lambda f: -f[0])
    return {key: dict(busy_ms_per_step=busy / steps / 1e6, events=rows)
            for busy, key, rows in found[:lines_kept]}


def op_sources(hlo: str, names) -> dict:
    """Where each traced op comes from: for the trace's kernel names (``fusion_1454``; the
    compiled HLO's ``fusion.1454``), the JAX operation XLA recorded for that instruction
    (``metadata={op_name=...}``), shortened to its last three path parts with layer numbers
    as ``layer_*`` (e.g. ``layer_*/mlp_norm/mul``). Names without an instruction are left out."""
    wanted = {re.sub(r"_(\d+)$", r".\1", n): n for n in names}
    wanted.update({n: n for n in names})
    found = {}
    for m in re.finditer(r"^\s*%?([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo,
                         re.M):
        name, op = m.group(1), m.group(2)
        key = wanted.get(name)
        if key is None or key in found:
            continue
        path = re.sub(r"layer_\d+", "layer_*", op.split(")/", 1)[-1])
        found[key] = "/".join(path.split("/")[-3:])
    return found


def op_markdown(meta: dict) -> list[str]:
    """Markdown lines of ``meta["ops"]`` / ``meta["timeline"]`` (from :func:`op_table`): per
    GPU stream, the step's span, busy and idle time, and its largest ops."""
    lines = []
    for name, rows in meta.get("ops", {}).items():
        tl = meta["timeline"][name]
        lines += ["", f"## {name}", "",
                  f"Per step: span {tl['span_ms_per_step']:.2f} ms, kernels busy "
                  f"{tl['busy_ms_per_step']:.2f} ms, idle between kernels "
                  f"{tl['idle_ms_per_step']:.2f} ms, {tl['kernels_per_step']:.0f} kernels.", "",
                  "| op | µs per step | calls per step | source (first instruction of that name) |",
                  "| --- | --- | --- | --- |"]
        src = meta.get("op_sources", {})
        lines += [f"| {n[:100]} | {us:,.0f} | {c:.0f} | {src.get(n, '')[:90]} |"
                  for n, us, c in rows]
    if meta.get("gemms"):
        lines += ["", "## Matrix products in the compiled step", "",
                  "| calls | instruction (names dropped) |", "| ---: | --- |"]
        lines += [f"| {n} | `{t}` |" for n, t in meta["gemms"]]
    for name, entry in meta.get("host", {}).items():
        lines += ["", f"## {name} (host)", "",
                  f"Busy {entry['busy_ms_per_step']:.2f} ms per step.", "",
                  "| event | self µs per step | inclusive µs per step | calls per step |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {n[:100]} | {s:,.0f} | {i:,.0f} | {c:.1f} |"
                  for n, s, i, c in entry["events"]]
    return lines


def hlo_summary(hlo: str) -> dict:
    """What the compiled step's entry computation launches, from its optimised HLO text.

    On GPUs, older XLA versions wrapped runs of kernels into command buffers (CUDA
    graphs) as calls to computations named ``command_buffer*``, counted here. With
    jax 0.11.2 the optimised HLO text shows none even with command buffers on (H100,
    commit 2807e86: the GPU's idle time per step fell from 9.2 to 3.4 ms while this
    read 0); the trace's idle time is the reliable sign.
    """
    import re

    entry = hlo[hlo.find("\nENTRY"):]
    entry = entry[:entry.find("\n}")]
    ops = collections.Counter()
    for line in entry.splitlines()[1:]:
        m = re.search(r"=\s*\S+\s+([a-z][\w-]*)\(", line)
        if m:
            ops[m.group(1)] += 1
    return dict(entry_instructions=sum(ops.values()), entry_ops=dict(ops.most_common(20)),
                command_buffer_calls=entry.count("command_buffer"),
                command_buffer_computations=len(re.findall(r"\n%?command_buffer\S*\s", hlo)))


def gemm_calls(hlo: str, width: int = 400) -> list:
    """The compiled step's matrix products as ``[count, text]``, most frequent first: every
    instruction of the optimised HLO that calls cuBLAS (``custom_call_target`` naming a gemm
    or matmul) or is a ``dot``, written as ``result_shape op(operand shapes)`` with layouts
    (e.g. ``bf16[482,4096]{1,0}``) and the first `width` characters of the line's attributes
    (metadata dropped), so the 32 layers' calls of one product count as one."""
    import re

    inst = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*(.+?)\s+([a-z][\w-]*)\((.*)$")
    shapes, calls = {}, []
    for line in hlo.splitlines():
        m = inst.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = shape
        if op == "dot" or (op == "custom-call" and re.search(
                r'custom_call_target="[^"]*(gemm|matmul)', rest, re.I)):
            calls.append((shape, op, rest))
    found = collections.Counter()
    for shape, op, rest in calls:
        args, _, attrs = rest.partition(")")
        args = ", ".join(shapes.get(a.strip().lstrip("%"), a.strip()) for a in args.split(","))
        attrs = re.sub(r",?\s*metadata=\{[^}]*\}", "", attrs).strip(", ")
        found[f"{shape} {op}({args}) {attrs}"[:width]] += 1
    return [[n, t] for t, n in found.most_common()]


def traced_ops(step, steps: int, host: Optional[dict] = None):
    """Run ``step()`` ``steps`` times under ``jax.profiler`` and return :func:`op_table`'s
    per-op table and timeline for one step; with ``host`` (a dict), fill it with
    :func:`host_table`'s summary of the same trace."""
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            out = step()
        jax.block_until_ready(out)
    if host is not None:
        host.update(host_table(trace_dir, steps=steps))
    return op_table(trace_dir, steps=steps)
