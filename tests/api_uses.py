"""The names a plugin uses on an engine's API, found with ``ast`` (the engine is never imported).

Invariant: ``collect`` reports every keyword argument and attribute that a plugin's code passes to or
reads from an object of the engine's API, each with the file and line that uses it, and reports every
``**`` dict whose keys it cannot work out, so that a check built on it misses nothing silently.

An expression is of the engine's API when it is

* a name imported from the engine's package (a class or function; ``SamplingParams as TrtSP``), or a
  variable or ``self`` attribute assigned one (``self._params = TrtSP``): calling it is a constructor;
* a variable or ``self`` attribute assigned a call of such a class (``llm = LLM(...)``);
* a parameter, variable or ``self`` attribute annotated with such a name (``llm: LLM``, also
  ``Logprob | None``), the way the plugins name objects handed back by the engine.

The keys of a ``**`` dict are followed through dict displays (constant keys, ``**`` entries, keys
``TABLE[k]`` of a module-level table: its values), assignments and annotated assignments, subscript
stores (``d["k"] = ...``), ``d.update(k=...)`` and ``d.update(other)``, ``dict(...)``, calls of the
plugin's own functions (what they return, element ``i`` of a returned tuple too), and stores into a
dict attribute anywhere in the plugin (``parsed.llm_args[k] = ...``). A key that is a name is resolved
when it comes from a ``for`` loop over a literal tuple of tuples or from unpacking ``TABLE[...]``
(``arg, convert = LLM_KEYS[key]``: the first items of the table's values).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True, order=True)
class Use:
    """One name used on the engine's API: ``api.name`` (``kind`` attribute), or keyword ``name`` of
    ``api`` (its constructor) or of ``api.member`` (a method)."""

    path: str
    line: int
    api: str
    name: str
    kind: str  # "attribute" | "keyword"
    member: str = "__init__"
    module: str = ""  # where the plugin imports ``api`` from

    def __str__(self) -> str:
        if self.kind == "attribute":
            return f"{self.path}:{self.line}: {self.api}.{self.name}"
        call = f"{self.api}(...)" if self.member == "__init__" else f"{self.api}.{self.member}(...)"
        return f"{self.path}:{self.line}: keyword {self.name!r} of {call}"


@dataclass(frozen=True)
class Api:
    """An expression's engine type: an instance of ``name``, or (``callable``) the class or function
    itself."""

    name: str
    module: str
    callable: bool


@dataclass
class Scope:
    """A function (or the module) and what its names are bound to."""

    module: ModuleInfo
    node: ast.AST
    names: dict[str, Api] = field(default_factory=dict)
    cls: str | None = None  # the class a method belongs to
    parent: Scope | None = None

    def lookup(self, name: str) -> Api | None:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return self.module.imports.get(name)


@dataclass
class ModuleInfo:
    """One file of the plugin."""

    path: Path
    tree: ast.Module
    imports: dict[str, Api] = field(default_factory=dict)  # names imported from the engine
    plugin_imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # local -> (module, name)
    globals: dict[str, ast.expr] = field(default_factory=dict)  # module-level NAME = value
    functions: dict[str, FunctionNode] = field(default_factory=dict)  # "f" and "Class.method"
    self_attrs: dict[str, dict[str, Api]] = field(default_factory=dict)  # class -> attr -> type

    @property
    def rel(self) -> str:
        """The file's path from the repository root (as given, outside it)."""
        return str(self.path.relative_to(ROOT)) if self.path.is_relative_to(ROOT) else str(self.path)


class Collector:
    """The uses of ``engine``'s API (a top-level package name) by the plugin package at ``package``."""

    def __init__(self, package: Path, engine: str) -> None:
        self.engine = engine
        self.uses: set[Use] = set()
        self.unresolved: set[str] = set()
        self.modules: dict[str, ModuleInfo] = {}
        package = package.resolve()
        for path in sorted(package.rglob("*.py")):
            dotted = ".".join(path.relative_to(package.parent).with_suffix("").parts)
            self.modules[dotted] = ModuleInfo(path, ast.parse(path.read_text(), str(path)))
        self.plugin = package.name
        for info in self.modules.values():
            self._index(info)
        for info in self.modules.values():
            self._type_self_attributes(info)
        for info in self.modules.values():
            self._walk_module(info)

    # -- indexing ---------------------------------------------------------------------------------

    def _index(self, info: ModuleInfo) -> None:
        for node in ast.walk(info.tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    local = alias.asname or alias.name
                    if node.module.split(".")[0] == self.engine:
                        info.imports[local] = Api(alias.name, node.module, callable=True)
                    elif node.module.split(".")[0] == self.plugin:
                        info.plugin_imports[local] = (node.module, alias.name)
        for stmt in info.tree.body:
            if isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        info.globals[target.id] = stmt.value
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
                info.globals[stmt.target.id] = stmt.value
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                info.functions[stmt.name] = stmt
            elif isinstance(stmt, ast.ClassDef):
                for sub in stmt.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        info.functions[f"{stmt.name}.{sub.name}"] = sub

    def annotation_api(self, node: ast.expr | None, info: ModuleInfo) -> Api | None:
        """The engine class an annotation names (``LLM``, ``"LLM"``, ``Logprob | None``,
        ``Optional[Logprob]``), as an instance."""
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                return self.annotation_api(ast.parse(node.value, mode="eval").body, info)
            except SyntaxError:
                return None
        if isinstance(node, ast.Name) and node.id in info.imports:
            found = info.imports[node.id]
            return Api(found.name, found.module, callable=False)
        if isinstance(node, ast.BinOp):  # X | None
            return self.annotation_api(node.left, info) or self.annotation_api(node.right, info)
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "Optional"
        ):
            return self.annotation_api(node.slice, info)
        return None

    def _type_self_attributes(self, info: ModuleInfo) -> None:
        """``self.x`` types per class, from every method: annotations, engine calls, engine names."""
        for cls in (n for n in ast.walk(info.tree) if isinstance(n, ast.ClassDef)):
            attrs: dict[str, Api] = {}
            for method in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                scope = self._scope(info, method, cls.name, None)
                for node in ast.walk(method):
                    target = _self_attr_target(node)
                    if target is None:
                        continue
                    if isinstance(node, ast.AnnAssign):
                        api = self.annotation_api(node.annotation, info)
                    else:
                        assert isinstance(node, ast.Assign)
                        api = self.type_of(node.value, scope)
                    if api:
                        attrs[target] = api
            info.self_attrs[cls.name] = attrs

    def _scope(self, info: ModuleInfo, fn: FunctionNode, cls: str | None, parent: Scope | None) -> Scope:
        """``fn``'s names: annotated parameters, then (in order) annotated and assigned variables."""
        scope = Scope(info, fn, cls=cls, parent=parent)
        args = fn.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            api = self.annotation_api(arg.annotation, info)
            if api:
                scope.names[arg.arg] = api
        for node in _own_nodes(fn):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                api = self.annotation_api(node.annotation, info)
                if api:
                    scope.names[node.target.id] = api
            elif (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                api = self.type_of(node.value, scope)
                if api:
                    scope.names[node.targets[0].id] = api
        return scope

    # -- types ------------------------------------------------------------------------------------

    def type_of(self, node: ast.expr, scope: Scope) -> Api | None:
        """The engine type of ``node`` in ``scope``, None when it is not the engine's."""
        if isinstance(node, ast.Name):
            return scope.lookup(node.id)
        if isinstance(node, ast.Attribute) and _is_self_attr(node) and scope.cls is not None:
            return scope.module.self_attrs.get(scope.cls, {}).get(node.attr)
        if isinstance(node, ast.Call):
            called = self.type_of(node.func, scope)
            if called is not None and called.callable:
                return Api(called.name, called.module, callable=False)
        return None

    # -- walking ----------------------------------------------------------------------------------

    def _walk_module(self, info: ModuleInfo) -> None:
        module_scope = Scope(info, info.tree)

        def visit(node: ast.AST, scope: Scope, cls: str | None) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    self._subclass_uses(child, scope)
                    visit(child, scope, child.name)
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner = self._scope(info, child, cls, scope if scope.node is not info.tree else None)
                    visit(child, inner, None)
                else:
                    self._check(child, scope)
                    visit(child, scope, cls)

        visit(info.tree, module_scope, None)

    def _subclass_uses(self, cls: ast.ClassDef, scope: Scope) -> None:
        """A plugin class deriving from an engine class overrides its methods: they must exist."""
        for base in cls.bases:
            api = self.type_of(base, scope)
            if api is None:
                continue
            for method in cls.body:
                if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) and method.name != "__init__":
                    self._use(scope, method.lineno, api, method.name, "attribute")

    def _use(self, scope: Scope, line: int, api: Api, name: str, kind: str, member: str = "__init__") -> None:
        self.uses.add(Use(scope.module.rel, line, api.name, name, kind, member, api.module))

    def _check(self, node: ast.AST, scope: Scope) -> None:
        if isinstance(node, ast.Call):
            self._check_call(node, scope)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            api = self.type_of(node.value, scope)
            if api is not None:
                self._use(scope, node.lineno, api, node.attr, "attribute")

    def _check_call(self, call: ast.Call, scope: Scope) -> None:
        if isinstance(call.func, ast.Name) and call.func.id in ("getattr", "hasattr") and len(call.args) >= 2:
            api = self.type_of(call.args[0], scope)
            name = call.args[1]
            if api is not None and isinstance(name, ast.Constant) and isinstance(name.value, str):
                self._use(scope, call.lineno, api, name.value, "attribute")
            return
        called = self.type_of(call.func, scope)
        member = "__init__"
        if called is None or not called.callable:
            if not isinstance(call.func, ast.Attribute):
                return
            called = self.type_of(call.func.value, scope)
            if called is None:
                return
            member = call.func.attr  # a method (the attribute itself is checked as an Attribute)
        for kw in call.keywords:
            if kw.arg is not None:
                self._use(scope, kw.value.lineno, called, kw.arg, "keyword", member)
                continue
            keys, unresolved = self.dict_keys(kw.value, scope, set())
            for key, path, line in keys:
                self.uses.add(Use(path, line, called.name, key, "keyword", member, called.module))
            self.unresolved.update(unresolved)

    # -- ** dicts ---------------------------------------------------------------------------------

    def dict_keys(
        self, node: ast.expr, scope: Scope, seen: set[int], index: int | None = None
    ) -> tuple[list[tuple[str, str, int]], set[str]]:
        """The keys ``node`` (a dict) may hold, each with where it is written, and what could not be
        resolved; ``index``: the element of a returned tuple."""
        keys: list[tuple[str, str, int]] = []
        unresolved: set[str] = set()
        where = f"{scope.module.rel}:{getattr(node, 'lineno', 0)}"

        def add(result: tuple[list[tuple[str, str, int]], set[str]]) -> None:
            keys.extend(result[0])
            unresolved.update(result[1])

        if id(node) in seen:
            return keys, unresolved
        seen = seen | {id(node)}
        if isinstance(node, ast.Tuple) and index is not None:
            return self.dict_keys(node.elts[index], scope, seen)
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if key is None:
                    add(self.dict_keys(value, scope, seen))
                else:
                    add(self.key_names(key, scope))
        elif isinstance(node, ast.Call):
            callee = self._plugin_function(node.func, scope)
            if isinstance(node.func, ast.Name) and node.func.id == "dict":
                for arg in node.args:
                    add(self.dict_keys(arg, scope, seen))
                keys.extend((kw.arg, scope.module.rel, kw.value.lineno) for kw in node.keywords if kw.arg)
            elif callee is not None:
                for ret in _returns(callee.node):
                    add(self.dict_keys(ret, callee, seen, index))
            else:
                unresolved.add(f"{where}: {ast.unparse(node)} (a call lmi cannot follow)")
        elif isinstance(node, ast.Name):
            add(self._name_keys(node, scope, seen, index))
        elif isinstance(node, ast.Subscript):
            for value, value_scope in self._stored_values(node, scope):
                add(self.dict_keys(value, value_scope, seen))
        elif isinstance(node, ast.Attribute):
            add(self._attribute_keys(node, scope))
        else:
            unresolved.add(f"{where}: {ast.unparse(node)}")
        return keys, unresolved

    def key_names(self, key: ast.expr, scope: Scope) -> tuple[list[tuple[str, str, int]], set[str]]:
        """The names a dict key expression stands for."""
        rel = scope.module.rel
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            return [(key.value, rel, key.lineno)], set()
        if isinstance(key, ast.Subscript):  # TABLE[k]: the table's values
            return self._table_items(key.value, scope, first=False)
        if isinstance(key, ast.Name):
            for node in _own_nodes(scope.node):
                if isinstance(node, (ast.For, ast.AsyncFor)):
                    position = _binds(node.target, key.id)
                    if position is not None and isinstance(node.iter, (ast.Tuple, ast.List)):
                        items = [i.elts[position] for i in node.iter.elts if isinstance(i, ast.Tuple)]
                        found = [
                            (i.value, rel, i.lineno)
                            for i in items
                            if isinstance(i, ast.Constant) and isinstance(i.value, str)
                        ]
                        if len(found) == len(node.iter.elts):
                            return found, set()
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    position = _binds(node.targets[0], key.id)
                    if position == 0 and isinstance(node.value, ast.Subscript):  # a, b = TABLE[k]
                        return self._table_items(node.value.value, scope, first=True)
        return [], {f"{rel}:{key.lineno}: key {ast.unparse(key)}"}

    def _table_items(
        self, table: ast.expr, scope: Scope, first: bool
    ) -> tuple[list[tuple[str, str, int]], set[str]]:
        """A module-level dict's values (``first``: the first item of each, for tuple values)."""
        found = self._global(table, scope)
        if found is None or not isinstance(found[0], ast.Dict):
            return [], {f"{scope.module.rel}:{table.lineno}: table {ast.unparse(table)}"}
        value_node, info = found
        assert isinstance(value_node, ast.Dict)
        names: list[tuple[str, str, int]] = []
        for value in value_node.values:
            item = value.elts[0] if first and isinstance(value, ast.Tuple) else value
            if not (isinstance(item, ast.Constant) and isinstance(item.value, str)):
                return [], {f"{info.rel}:{value.lineno}: table value {ast.unparse(value)}"}
            names.append((item.value, info.rel, item.lineno))
        return names, set()

    def _global(self, node: ast.expr, scope: Scope) -> tuple[ast.expr, ModuleInfo] | None:
        """A module-level value named by ``node``, in this module or imported from the plugin."""
        if not isinstance(node, ast.Name):
            return None
        info = scope.module
        if node.id in info.globals:
            return info.globals[node.id], info
        if node.id in info.plugin_imports:
            module, name = info.plugin_imports[node.id]
            other = self.modules.get(module)
            if other is not None and name in other.globals:
                return other.globals[name], other
        return None

    def _plugin_function(self, func: ast.expr, scope: Scope) -> Scope | None:
        """The scope of the plugin's own function ``func`` calls, if it is one."""
        if not isinstance(func, ast.Name):
            return None
        info = scope.module
        if func.id in info.functions:
            return self._scope(info, info.functions[func.id], None, None)
        if func.id in info.plugin_imports:
            module, name = info.plugin_imports[func.id]
            other = self.modules.get(module)
            if other is not None and name in other.functions:
                return self._scope(other, other.functions[name], None, None)
        return None

    def _name_keys(
        self, name: ast.Name, scope: Scope, seen: set[int], index: int | None
    ) -> tuple[list[tuple[str, str, int]], set[str]]:
        keys: list[tuple[str, str, int]] = []
        unresolved: set[str] = set()
        bound = False
        for node in _own_nodes(scope.node):
            value: ast.expr | None = None
            position: int | None = None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                position = _binds(node.targets[0], name.id)
                value = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                position = 0 if node.target.id == name.id else None
                value = node.value
            if position is not None and value is not None:
                bound = True
                unpacked = isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)
                tuple_index = position if unpacked else index
                found, missing = self.dict_keys(value, scope, seen, tuple_index)
                keys.extend(found)
                unresolved.update(missing)
            keys_here, missing_here = self._dict_writes(node, name.id, scope, seen)
            keys.extend(keys_here)
            unresolved.update(missing_here)
        if not bound:
            found_global = self._global(name, scope)
            if found_global is not None:
                value_node, info = found_global
                return self.dict_keys(value_node, Scope(info, info.tree), seen)
            unresolved.add(f"{scope.module.rel}:{name.lineno}: {name.id} (not bound in this function)")
        return keys, unresolved

    def _dict_writes(
        self, node: ast.AST, target: str, scope: Scope, seen: set[int], attribute: bool = False
    ) -> tuple[list[tuple[str, str, int]], set[str]]:
        """Keys written into dict ``target`` (a name, or with ``attribute`` any ``x.target``) by one
        statement: ``target[k] = ...``, ``target.update(...)``, ``target.setdefault(k, ...)``."""
        keys: list[tuple[str, str, int]] = []
        unresolved: set[str] = set()

        def is_target(expr: ast.expr) -> bool:
            if attribute:
                return isinstance(expr, ast.Attribute) and expr.attr == target
            return isinstance(expr, ast.Name) and expr.id == target

        if isinstance(node, ast.Assign):
            for tgt in node.targets:
                if isinstance(tgt, ast.Subscript) and is_target(tgt.value):
                    found, missing = self.key_names(tgt.slice, scope)
                    keys.extend(found)
                    unresolved.update(missing)
        elif (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and is_target(node.value.func.value)
        ):
            call, method = node.value, node.value.func.attr
            if method == "update":
                keys.extend((kw.arg, scope.module.rel, kw.value.lineno) for kw in call.keywords if kw.arg)
                for arg in call.args:
                    found, missing = self.dict_keys(arg, scope, seen)
                    keys.extend(found)
                    unresolved.update(missing)
            elif method == "setdefault" and call.args:
                found, missing = self.key_names(call.args[0], scope)
                keys.extend(found)
                unresolved.update(missing)
        return keys, unresolved

    def _attribute_keys(
        self, node: ast.Attribute, scope: Scope
    ) -> tuple[list[tuple[str, str, int]], set[str]]:
        """Keys written anywhere in the plugin into a dict attribute named like ``node``'s."""
        keys: list[tuple[str, str, int]] = []
        unresolved: set[str] = set()
        writes = 0
        for info in self.modules.values():
            functions = (
                n for n in ast.walk(info.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
            for fn in functions:
                fn_scope = Scope(info, fn)
                for stmt in _own_nodes(fn):
                    found, missing = self._dict_writes(stmt, node.attr, fn_scope, set(), attribute=True)
                    writes += bool(found or missing)
                    keys.extend(found)
                    unresolved.update(missing)
        if not writes:
            unresolved.add(
                f"{scope.module.rel}:{node.lineno}: {ast.unparse(node)} (nothing in the plugin writes it)"
            )
        return keys, unresolved

    def _stored_values(self, sub: ast.Subscript, scope: Scope) -> Iterator[tuple[ast.expr, Scope]]:
        """What ``d["k"]`` may hold: values stored at that key into ``d`` (here or in the function that
        built ``d``), except by the statement that reads it."""
        if not (
            isinstance(sub.value, ast.Name)
            and isinstance(sub.slice, ast.Constant)
            and isinstance(sub.slice.value, str)
        ):
            return
        name, key = sub.value.id, sub.slice.value
        for node in _own_nodes(scope.node):
            if isinstance(node, ast.Assign) and any(n is sub for n in ast.walk(node.value)):
                continue  # d["k"] = f(**d["k"]) replaces the dict it reads
            if isinstance(node, ast.Assign):
                for tgt in node.targets:
                    if (
                        isinstance(tgt, ast.Subscript)
                        and isinstance(tgt.value, ast.Name)
                        and tgt.value.id == name
                        and isinstance(tgt.slice, ast.Constant)
                        and tgt.slice.value == key
                    ):
                        yield node.value, scope
                if _binds(node.targets[0], name) is not None and isinstance(node.value, ast.Call):
                    callee = self._plugin_function(node.value.func, scope)
                    if callee is not None:
                        for ret in _returns(callee.node):
                            if isinstance(ret, ast.Name):
                                inner = ast.Subscript(value=ret, slice=sub.slice, ctx=ast.Load())
                                yield from self._stored_values(inner, callee)


def _name_is(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _is_self_attr(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _self_attr_target(node: ast.AST) -> str | None:
    """The ``x`` of a statement ``self.x: T = ...`` or ``self.x = ...`` (one target)."""
    if isinstance(node, ast.AnnAssign):
        target = node.target
    elif isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
    else:
        return None
    return target.attr if isinstance(target, ast.Attribute) and _is_self_attr(target) else None


def _binds(target: ast.expr, name: str) -> int | None:
    """The position at which an assignment target binds ``name`` (0 for a plain name)."""
    if isinstance(target, ast.Name):
        return 0 if target.id == name else None
    if isinstance(target, ast.Tuple):
        for i, item in enumerate(target.elts):
            if isinstance(item, ast.Name) and item.id == name:
                return i
    return None


def _own_nodes(fn: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``fn``'s body, not those of functions and classes nested in it."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop(0)
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _returns(fn: ast.AST) -> Iterator[ast.expr]:
    for node in _own_nodes(fn):
        if isinstance(node, ast.Return) and node.value is not None:
            yield node.value


def collect(package: Path, engine: str) -> tuple[list[Use], list[str]]:
    """The uses of ``engine``'s API by the plugin package at ``package``, sorted, and the ``**`` dicts
    whose keys could not be resolved."""
    collector = Collector(package, engine)
    return sorted(collector.uses), sorted(collector.unresolved)
