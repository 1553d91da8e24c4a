"""Every hook is documented with a one-line docstring."""

from __future__ import annotations

import inspect

from lmi_core import hookspecs


def test_every_hookspec_has_a_one_line_docstring() -> None:
    specs = [f for name, f in vars(hookspecs).items() if callable(f) and hasattr(f, "lmi_spec")]
    names = {f.__name__ for f in specs}
    assert {"resolve_mode", "launch_workers", "handle_request", "load_engine"} <= names
    for spec in specs:
        doc = inspect.getdoc(spec)
        assert doc and "\n" not in doc, f"{spec.__name__} needs a one-line docstring"
