"""A model's custom Python code, as DJL Serving runs it: ``model.py``'s ``handle`` and its formatters.

DJL reads a model directory's ``model.py`` (or the file ``option.entryPoint`` names) for a
``handle(inputs)`` function, which then *is* the model (DJL's Python engine), or for functions marked
by ``djl_python``'s ``@input_formatter`` / ``@output_formatter``, which an LLM engine runs on each
request body and each response object. An adapter's own ``model.py`` overrides them for that adapter,
formatter by formatter.

Invariants: a file is imported once per process, under a module name made from its path (a model's
and its adapters' ``model.py`` never shadow each other), with its directory on ``sys.path`` (DJL puts
the model directory on the worker's ``PYTHONPATH``: a ``model.py`` imports its neighbours). A formatter
that raises, or returns what cannot be served, fails its request with a 424 that names it; it never
fails the worker. The server decides from the file's syntax alone (``defines``) whether a model is a
``handle`` model, without running it. Standard library only: the worker imports this module.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lmi_core.errors import ConfigError, EngineError

DEFAULT_FILE = "model.py"
# DJL's own LLM handlers, which option.entryPoint may name: lmi-core's backend plays their part.
DJL_HANDLERS = frozenset(
    {
        "djl_python.huggingface",
        "djl_python.lmi_vllm.vllm_async_service",
        "djl_python.lmi_trtllm.trtllm_async_service",
        "djl_python.tensorrt_llm",
    }
)
# DJL's marker attributes (set by djl_python's decorators), by the formatter they mark.
MARKERS = {"input": "is_input_formatter", "output": "is_output_formatter"}


def entry_point_file(model_dir: str | None, entry_point: str | None) -> str | None:
    """The custom code file of a model: ``option.entryPoint`` (a ``.py`` file, relative to the model
    directory or absolute), else the model directory's ``model.py``; None when there is none. One of
    DJL's own LLM handlers names no file of the model's, only its ``model.py`` formatters.
    A ``ConfigError`` for an entry point that is neither, or a file that does not exist."""
    if entry_point is None or entry_point in DJL_HANDLERS:
        path = Path(model_dir or "", DEFAULT_FILE)
        return str(path.resolve()) if model_dir and path.is_file() else None
    if "://" in entry_point:
        raise ConfigError("option.entryPoint", entry_point, "a local .py file (lmi-core downloads no code)")
    if not entry_point.endswith(".py"):
        handlers = ", ".join(sorted(DJL_HANDLERS))
        raise ConfigError(
            "option.entryPoint", entry_point, f"a .py file, or one of DJL's handlers ({handlers})"
        )
    path = Path(entry_point) if os.path.isabs(entry_point) else Path(model_dir or "", entry_point)
    if not path.is_file():
        raise ConfigError("option.entryPoint", entry_point, f"an existing file ({path} is not one)")
    return str(path.resolve())


def defines(path: str, name: str) -> bool:
    """Whether the module in ``path`` defines a top-level function (or binds a name) ``name``; read
    from its syntax, not run. A ``ConfigError`` naming the file when it does not parse."""
    try:
        tree = ast.parse(Path(path).read_text(), filename=path)
    except (SyntaxError, ValueError) as exc:
        raise ConfigError("option.entryPoint", path, f"a Python file that parses ({exc})") from None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return True
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


@dataclass(frozen=True)
class CustomCode:
    """One imported custom code file and the formatters it defines."""

    path: str
    module: ModuleType
    formatters: dict[str, Callable[..., Any]]  # "input" / "output" -> the marked function

    def function(self, name: str) -> Callable[..., Any] | None:
        found = getattr(self.module, name, None)
        return found if callable(found) else None


_loaded: dict[str, CustomCode] = {}
_lock = threading.Lock()  # formatters run on threads: one import per file


def load(path: str) -> CustomCode:
    """The custom code in ``path``, imported on first use (its errors propagate: a load failure)."""
    with _lock:
        if path in _loaded:
            return _loaded[path]
        name = "lmi_custom_code_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        directory = str(Path(path).parent)
        if directory not in sys.path:
            sys.path.append(directory)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        formatters = {
            kind: f for kind, marker in MARKERS.items() if (f := _marked(module, marker)) is not None
        }
        _loaded[path] = CustomCode(path, module, formatters)
        return _loaded[path]


def _marked(module: ModuleType, marker: str) -> Callable[..., Any] | None:
    """The first function (by name, as DJL looks) that carries ``marker``."""
    for name in sorted(vars(module)):
        value = getattr(module, name)
        if callable(value) and getattr(value, marker, False) is True:
            return value  # type: ignore[no-any-return]
    return None


def formatter(paths: Sequence[str], kind: str) -> tuple[Callable[..., Any], str] | None:
    """The ``kind`` formatter of the first file in ``paths`` that has one (an adapter's ``model.py``
    before the model's), with a name for error messages; None when none has one."""
    for path in paths:
        code = _load_for_request(path)
        if kind in code.formatters:
            function = code.formatters[kind]
            return function, f"{function.__name__} ({Path(path).name})"
    return None


def _load_for_request(path: str) -> CustomCode:
    """``load``, with a failure (an adapter's ``model.py`` that does not import) as the request's 424."""
    try:
        return load(path)
    except Exception as exc:
        raise formatter_error(f"custom code {path} failed to load", exc) from None


def formatter_error(what: str, exc: BaseException) -> EngineError:
    return EngineError(f"{what}: {type(exc).__name__}: {exc}", status=424, type="CustomFormatterException")


def format_input(
    paths: Sequence[str], payload: dict[str, Any], tokenizer: Any
) -> tuple[dict[str, Any], bool]:
    """The request body after the input formatter (unchanged without one), and whether the files
    have an output formatter. A 424 naming the formatter when it raises or returns no JSON object."""
    found = formatter(paths, "input")
    if found is not None:
        function, name = found
        try:
            result = function(payload, tokenizer=tokenizer)
        except Exception as exc:
            raise formatter_error(f"input formatter {name} failed", exc) from None
        if not isinstance(result, dict):
            message = f"input formatter {name} returned {type(result).__name__}, not a dict (a JSON object)"
            raise EngineError(message, status=424, type="CustomFormatterException")
        payload = result
    return payload, formatter(paths, "output") is not None


def format_output(paths: Sequence[str], data: Any) -> Any:
    """``data`` (a response object or one streamed line) after the output formatter, as a value the
    wire carries: a pydantic-like result is dumped. A 424 naming the formatter when it raises."""
    found = formatter(paths, "output")
    if found is None:
        return data
    function, name = found
    try:
        result = function(data)
        if inspect.iscoroutine(result):
            result.close()
            raise TypeError("an output formatter must be a plain function, not a coroutine")
        dump = getattr(result, "model_dump", None)
        return dump() if callable(dump) else result
    except Exception as exc:
        raise formatter_error(f"output formatter {name} failed", exc) from None
