"""Every hook is documented: a one-line docstring, and a row of docs/plugins.md's hook table."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from lmi_core import hookspecs


def test_every_hookspec_has_a_one_line_docstring() -> None:
    specs = [f for name, f in vars(hookspecs).items() if callable(f) and hasattr(f, "lmi_spec")]
    names = {f.__name__ for f in specs}
    assert {"resolve_mode", "launch_workers", "handle_request", "load_engine"} <= names
    for spec in specs:
        doc = inspect.getdoc(spec)
        assert doc and "\n" not in doc, f"{spec.__name__} needs a one-line docstring"


def test_the_hook_table_of_plugins_md_lists_every_hook_in_order_on_its_side() -> None:
    source = inspect.getsource(hookspecs)
    worker_side = source.index("# -- worker side")
    hooks = [
        (name, "worker" if source.index(f"def {name}(") > worker_side else "server")
        for name, f in vars(hookspecs).items()
        if callable(f) and hasattr(f, "lmi_spec")
    ]
    docs = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    rows = re.findall(r"^\| `(\w+)\(.*?\)` \| (\w+) \|", docs, flags=re.MULTILINE)
    assert rows == hooks
