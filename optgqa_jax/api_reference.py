"""The API reference page, ``docs/api.md``, generated from the code.

Every public name of the curated modules (:data:`MODULES`: their ``__all__``, or for a module
without one the functions and classes it defines) with its signature and the first paragraph
of its docstring, and under each class its own public methods and properties with the first
line of theirs. A name exported by several modules is described once, where it first appears.
Regenerate after changing the API::

    python -m optgqa_jax.api_reference > docs/api.md

``tests/test_api_reference.py`` fails where the page and the code disagree, or where a public
name, method or property has no docstring (:func:`undocumented`). ``make api-docs`` runs the
command above.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Iterator, Sequence

# The modules a research script imports from, in the page's order.
MODULES = ("optgqa_jax", "optgqa_jax.engine", "optgqa_jax.quant", "optgqa_jax.sparse",
           "optgqa_jax.grouping", "optgqa_jax.sharding", "optgqa_jax.data",
           "optgqa_jax.token_splits", "pallas_kernels")

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def public_names(module) -> list[str]:
    """A module's public names: its ``__all__``, else the functions and classes it defines
    whose names do not start with an underscore, in definition order."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [n for n, v in vars(module).items()
            if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
            and getattr(v, "__module__", None) == module.__name__]


def _members(cls) -> Iterator[tuple[str, object, object]]:
    """(name, the function behind it, the raw attribute) of a class's own public methods,
    class and static methods and properties, in definition order."""
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, property):
            fn = raw.fget
        elif isinstance(raw, (classmethod, staticmethod)):
            fn = raw.__func__
        elif inspect.isfunction(raw):
            fn = raw
        else:
            continue
        yield name, fn, raw


def _signature(obj, drop_first: bool = False) -> str:
    """``(a, b=1, *, c=None)``: parameter names and defaults, without annotations; memory
    addresses dropped from default values' reprs so the page does not change between runs."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = list(sig.parameters.values())[1 if drop_first else 0:]
    if inspect.isclass(obj) and any(c.__module__.startswith("flax.linen")
                                    for c in obj.__mro__[1:]):
        # a Flax module's own parent/name fields (their defaults differ between Flax versions)
        params = [p for p in params if p.name not in ("parent", "name")]
    params = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    text = str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
    return _ADDRESS.sub("", text)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()] if text[start:].strip() else parts


def _call_line(prefix: str, signature: str, width: int = 96) -> str:
    """``prefix + signature``, one parameter per line where it is longer than ``width``."""
    line = prefix + signature
    if len(line) <= width or signature == "()":
        return line
    params = _split_top_level(signature[1:-1])
    return prefix + "(\n" + "".join(f"    {p},\n" for p in params) + ")"


def _first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _source(obj) -> str:
    """The project file defining obj, from its module's name (``optgqa_jax/engine/engine.py``),
    or "" for objects defined elsewhere."""
    module = inspect.getmodule(obj)
    name = getattr(module, "__name__", "")
    if not name.split(".")[0] in ("optgqa_jax", "pallas_kernels"):
        return ""
    path = name.replace(".", "/")
    is_package = os.path.basename(getattr(module, "__file__", "") or "") == "__init__.py"
    return path + ("/__init__.py" if is_package else ".py")


def _describe_value(value) -> str:
    """A constant's line: its type and, where short, its value or keys."""
    if isinstance(value, dict):
        keys = ", ".join(f"`{k}`" for k in value)
        return f"`dict` with keys {keys}"
    text = repr(value)
    return f"`{type(value).__name__}`: `{text}`" if len(text) <= 90 else f"`{type(value).__name__}`"


def _entry(module_name: str, name: str, obj) -> list[str]:
    """The lines describing one public name."""
    if inspect.ismodule(obj):
        return [f"- `{name}`: the module `{obj.__name__}` (below)."]
    if inspect.isclass(obj) or callable(obj):
        kind = "class" if inspect.isclass(obj) else "function"
        lines = [f"### `{module_name}.{name}`", "", "```python",
                 _call_line(f"{kind} {name}", _signature(obj)), "```", "",
                 _first_paragraph(obj)]
        src = _source(obj)
        if src:
            lines += ["", f"Defined in `{src}`."]
        if inspect.isclass(obj):
            members = []
            for mname, fn, raw in _members(obj):
                if isinstance(raw, property):
                    head = f"`{mname}` (property)"
                else:
                    bound = not isinstance(raw, staticmethod)
                    prefix = "classmethod " if isinstance(raw, classmethod) else ""
                    head = f"{prefix}`{mname}{_signature(fn, drop_first=bound)}`"
                members.append(f"- {head}: {_first_paragraph(fn)}")
            if members:
                lines += ["", *members]
        return lines + [""]
    return [f"- `{name}`: {_describe_value(obj)}."]


def render(modules: Sequence[str] = MODULES) -> str:
    """The whole page as markdown."""
    out = ["# API reference", "",
           "Generated from the code by `python -m optgqa_jax.api_reference > docs/api.md`; "
           "`tests/test_api_reference.py` checks that it is current. Signatures show "
           "parameter names and defaults; the docstrings (`help(...)`) say more.", ""]
    seen: dict[int, str] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        out += [f"## `{module_name}`", "", _first_paragraph(module), ""]
        constants, entries, again = [], [], []
        for name in public_names(module):
            obj = getattr(module, name)
            if id(obj) in seen and not isinstance(obj, (int, float, str, bool)):
                again.append(f"`{name}` ({seen[id(obj)]})")
                continue
            if not (inspect.ismodule(obj) or isinstance(obj, (int, float, str, bool))):
                seen[id(obj)] = module_name
            lines = _entry(module_name, name, obj)
            (constants if lines[0].startswith("- ") else entries).append(lines)
        if again:
            out += ["Also exported here, described above: " + ", ".join(again) + ".", ""]
        if constants:
            out += [line for c in constants for line in c] + [""]
        for lines in entries:
            out += lines
    return "\n".join(out).rstrip("\n") + "\n"


def _has_doc(obj) -> bool:
    """Whether obj has a docstring of its own (not the one ``dataclasses`` and ``NamedTuple``
    write from the fields, ``Name(a, b)``)."""
    doc = (obj.__doc__ or "").strip()
    return bool(doc) and not (inspect.isclass(obj) and doc.startswith(obj.__name__ + "("))


def undocumented(modules: Sequence[str] = MODULES) -> list[str]:
    """Public functions and classes, and the classes' own public methods and properties,
    whose docstring is missing or empty (``module.Name`` or ``module.Name.member``)."""
    missing, seen = [], set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)) \
                    or id(obj) in seen:
                continue
            seen.add(id(obj))
            if not _has_doc(obj):
                missing.append(f"{module_name}.{name}")
            if inspect.isclass(obj):
                missing += [f"{module_name}.{name}.{m}" for m, fn, _ in _members(obj)
                            if not _has_doc(fn)]
    return missing


def main() -> None:
    """Write the page to standard output."""
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
