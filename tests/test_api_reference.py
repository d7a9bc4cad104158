"""docs/api.md against the code (optgqa_jax.api_reference): current, and every public name,
method and property documented."""

import os
import sys
import types

import pytest

from optgqa_jax import api_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_page_is_current():
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        page = f.read()
    assert page == api_reference.render(), (
        "docs/api.md is out of date: run `make api-docs` "
        "(python -m optgqa_jax.api_reference > docs/api.md)")


def test_every_public_name_is_documented():
    assert api_reference.undocumented() == []


@pytest.fixture
def fake_module():
    """A module with a documented and an undocumented function, a dataclass whose only
    docstring is the one dataclasses writes, and a class with an undocumented property."""
    import dataclasses

    mod = types.ModuleType("fake_api_module")
    mod.__doc__ = "A fake module."

    def documented(a, b=1, *, c=None):
        """Does a thing.

        More words."""

    def bare(x):
        return x

    @dataclasses.dataclass(frozen=True)
    class Fields:
        size: int = 3

    class WithProperty:
        """A class."""

        @property
        def value(self):
            return 1

        def method(self, y, z=2):
            """Returns y."""
            return y

    for obj in (documented, bare, Fields, WithProperty):
        obj.__module__ = mod.__name__
        setattr(mod, obj.__name__, obj)
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


def test_undocumented_names_are_found(fake_module):
    assert api_reference.undocumented([fake_module.__name__]) == [
        "fake_api_module.bare", "fake_api_module.Fields", "fake_api_module.WithProperty.value"]


def test_render_shows_signatures_and_first_paragraphs(fake_module):
    page = api_reference.render([fake_module.__name__])
    assert "function documented(a, b=1, *, c=None)" in page
    assert "Does a thing." in page and "More words." not in page
    assert "- `method(y, z=2)`: Returns y." in page      # bound methods drop self
    assert "0x" not in page


def test_long_signatures_take_a_line_per_parameter():
    line = api_reference._call_line("function f", "(" + ", ".join(
        f"argument_{i}='a, (b)'" for i in range(8)) + ")")
    assert line.splitlines()[1:3] == ["    argument_0='a, (b)',", "    argument_1='a, (b)',"]
    assert line.endswith("\n)") and len(line.splitlines()) == 10
