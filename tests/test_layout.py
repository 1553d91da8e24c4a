"""The layout is the architecture: which folder a module is in says which process it runs in, imports
go only down the tower (cli -> http -> serving -> launch -> worker -> the top-level plugin API, kit and
config), never in a circle, and every module is on the map in docs/architecture.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lmi_core"
# Higher imports lower; the top-level modules (plugin API, backend kit, config, plugins) are the floor.
FLOORS = {"cli": 6, "__main__": 6, "http": 5, "serving": 4, "launch": 3, "worker": 2}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], 1) if len(parts) > 1 else 1


def imports() -> dict[str, set[str]]:
    """module -> the lmi_core modules it imports (a name imported from a package counts as the
    package, unless it is a module of it)."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("lmi_core")
            ):
                assert node.module is not None
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    targets.add(child if child in known else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("lmi_core")}
        edges[name] = {t for t in targets if t in known and t not in (name, "lmi_core")}
    return edges


def test_imports_only_go_down_the_tower() -> None:
    up = [(a, b) for a, bs in imports().items() for b in sorted(bs) if floor(b) > floor(a)]
    assert up == [], f"imports back up the tower: {up}"


def test_there_is_no_import_cycle() -> None:
    edges = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, module, target])}")
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_no_private_name_is_imported_across_modules() -> None:
    private = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmi_core"):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                private += [f"{name}: {node.module}.{n}" for n in names]
    assert private == []


def test_every_module_is_on_the_architecture_map() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    mapped = set(re.findall(r"`([a-z_]+)`", text)) | {f"{p}/" for p in re.findall(r"`lmi_core/(\w+)/`", text)}
    names = {
        m: m.rsplit(".", 1)[-1] + ("/" if path.name == "__init__.py" else "") for m, path in modules().items()
    }
    missing = [
        m
        for m, name in names.items()
        if name not in mapped and m != "lmi_core" and not m.endswith("__main__")
    ]
    assert missing == [], f"modules missing from docs/architecture.md: {missing}"
