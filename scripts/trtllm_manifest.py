"""Write lmi_trtllm's pinned TensorRT-LLM API manifest: names only, read from the source with ``ast``.

Invariant: the manifest (``plugins/lmi_trtllm/lmi_trtllm/api_manifest.json``) holds, for one
TensorRT-LLM release, every class that lmi_trtllm builds or calls with the keyword arguments its
constructor accepts, its attributes (fields, properties, methods, instance attributes, inherited ones
included) and each method's parameter names, and nothing else: no code, no types, no defaults.
``tests/lmi_trtllm/test_api_manifest.py`` checks lmi_trtllm's code against it in CI, where TensorRT-LLM
cannot be installed (it needs CUDA); nothing here imports TensorRT-LLM either.

The source directory holds the release's files at their package paths (``SRC/tensorrt_llm/...``),
each as ``.py`` (a checkout of the tag, an unpacked wheel) or as the ``.html`` page of the release's
published source (``https://nvidia.github.io/TensorRT-LLM/<release>/_modules/tensorrt_llm/<path>.html``,
from which the code is taken out of the page's ``<pre>`` block).

To regenerate (1.2.1 shown; a machine with network access):

1. Get the source of the release, either the tag::

       git clone --depth 1 --branch v1.2.1 https://github.com/NVIDIA/TensorRT-LLM SRC

   or its published pages (a few hundred KB; the pages do not include ``lora_helper.py``, take that
   file from the tag: ``https://raw.githubusercontent.com/NVIDIA/TensorRT-LLM/v1.2.1/tensorrt_llm/lora_helper.py``)::

       for f in llmapi/llm_args llmapi/llm llmapi/mpi_session sampling_params executor/request \\
                executor/result; do
         curl -sf --create-dirs -o SRC/tensorrt_llm/$f.html \\
           https://nvidia.github.io/TensorRT-LLM/1.2.1/_modules/tensorrt_llm/$f.html
       done

   (``pip download tensorrt-llm==1.2.1 --no-deps`` also works but fetches a multi-GB wheel.)
2. ``python scripts/trtllm_manifest.py SRC --release 1.2.1 --commit <the tag's commit>``
   (``--origin PATH=TEXT`` records where a file came from).
3. For a new release, move ``lmi_trtllm.versions.SUPPORTED`` and the ``trtllm`` extra in
   ``plugins/lmi_trtllm/pyproject.toml`` to it, then run ``pytest tests/lmi_trtllm``: it names every
   keyword or attribute lmi_trtllm uses that the release lacks.

The files this manifest was generated from are kept, outside git, in ``.cache/trtllm-src/v1.2.1/``
(its README says where each came from).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "plugins" / "lmi_trtllm" / "lmi_trtllm" / "api_manifest.json"

# The classes lmi_trtllm builds or calls, and the bases whose names they inherit, by file.
TARGETS: dict[str, tuple[str, ...]] = {
    "tensorrt_llm/llmapi/llm.py": ("LLM", "_TorchLLM", "BaseLLM", "RequestOutput"),
    "tensorrt_llm/llmapi/llm_args.py": ("TorchLlmArgs", "BaseLlmArgs", "KvCacheConfig"),
    "tensorrt_llm/llmapi/mpi_session.py": ("MpiCommSession",),
    "tensorrt_llm/sampling_params.py": ("SamplingParams", "GuidedDecodingParams"),
    "tensorrt_llm/executor/request.py": ("LoRARequest",),
    "tensorrt_llm/executor/result.py": (
        "GenerationResult",
        "GenerationResultBase",
        "CompletionOutput",
        "Logprob",
    ),
    "tensorrt_llm/lora_helper.py": ("LoraConfig",),
}

# ``LLM(**kwargs)``: _TorchLLM passes backend="pytorch", and BaseLLM.__init__ builds TorchLlmArgs from
# the keywords it does not take itself (tensorrt_llm/llmapi/llm.py), after checking them against the
# args class's fields plus its literal ``valid_keys`` extras.
KEYWORDS_TO: dict[str, str] = {"LLM": "TorchLlmArgs"}

PYDANTIC_BASES = frozenset({"BaseModel", "StrictBaseModel"})


class _PreText(HTMLParser):
    """The text of the first ``<pre>`` in a ``<div class="highlight">`` (the code block of a Sphinx
    source page), without Sphinx's ``[docs]`` back-links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._divs: list[bool] = []  # open <div>s: whether each is a highlight block
        self._in_pre = False
        self._done = False
        self._in_backlink = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "div":
            self._divs.append("highlight" in classes)
        elif tag == "pre" and any(self._divs) and not self._done:
            self._in_pre = True
        elif tag == "a" and self._in_pre and "viewcode-back" in classes:
            self._in_backlink = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._divs:
            self._divs.pop()
        elif tag == "pre" and self._in_pre:
            self._in_pre, self._done = False, True
        elif tag == "a":
            self._in_backlink = False

    def handle_data(self, data: str) -> None:
        if self._in_pre and not self._in_backlink:
            self.parts.append(data)


def page_code(html: str) -> str:
    """The Python source shown by a Sphinx ``viewcode`` page."""
    parser = _PreText()
    parser.feed(html)
    parser.close()
    if not parser.parts:
        raise ValueError('no <div class="highlight"><pre>: not a Sphinx source page')
    return "".join(parser.parts)


def read_source(src: Path, path: str) -> str:
    """``path`` (``tensorrt_llm/....py``) under ``src``, as ``.py`` or as its ``.html`` page."""
    py = src / path
    if py.is_file():
        return py.read_text()
    page = py.with_suffix(".html")
    if page.is_file():
        return page_code(page.read_text())
    raise FileNotFoundError(f"{py} (or {page.name}) is missing")


@dataclass
class ClassNames:
    """What one class statement declares itself (inherited names are added by ``flatten``)."""

    name: str
    module: str
    bases: list[str]
    dataclass: bool
    fields: list[str] = field(default_factory=list)  # constructor fields (dataclass / pydantic)
    aliases: list[str] = field(default_factory=list)  # pydantic Field(alias=...)
    attributes: set[str] = field(default_factory=set)
    methods: dict[str, list[str]] = field(default_factory=dict)
    extra_keywords: list[str] = field(default_factory=list)  # __init__'s literal ``valid_keys`` list


def _name(node: ast.expr) -> str:
    """The last dotted component of a name expression, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name(node.func)
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    return ""


def _keyword(call: ast.expr, name: str) -> ast.expr | None:
    if isinstance(call, ast.Call):
        for kw in call.keywords:
            if kw.arg == name:
                return kw.value
    return None


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Parameter names, without the bound first one; ``*args`` / ``**kwargs`` keep their stars."""
    args = fn.args
    positional = [a.arg for a in [*args.posonlyargs, *args.args]]
    static = any(_name(d) == "staticmethod" for d in fn.decorator_list)
    if positional and not static:
        positional = positional[1:]
    names = [*positional, *(a.arg for a in args.kwonlyargs)]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return names


def _stored_attributes(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[str]:
    """Attributes a method sets on its instance: ``self.x = ...``, or on ``cls.__new__(cls)``."""
    instances = {"self"}
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and _name(node.value.func) in ("__new__", "cls")
        ):
            instances.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(fn):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AnnAssign, ast.AugAssign))
            else []
        )
        for target in targets:
            for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                if (
                    isinstance(item, ast.Attribute)
                    and isinstance(item.value, ast.Name)
                    and item.value.id in instances
                ):
                    yield item.attr


def _string_constants(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def class_names(node: ast.ClassDef, module: str, pydantic: bool) -> ClassNames:
    """The names ``node`` declares; ``pydantic``: its fields follow pydantic's rules."""
    is_dataclass = any(_name(d) == "dataclass" for d in node.decorator_list)
    info = ClassNames(node.name, module, [_name(b) for b in node.bases], is_dataclass)
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            name = stmt.target.id
            info.attributes.add(name)
            if _name(stmt.annotation) == "ClassVar":
                continue
            value = stmt.value
            if is_dataclass:
                init = _keyword(value, "init") if value is not None else None
                if not (isinstance(init, ast.Constant) and init.value is False):  # field(init=False)
                    info.fields.append(name)
            elif pydantic:
                # Leading underscore or PrivateAttr: a private attribute, not a field (pydantic v2).
                if name.startswith("_") or (value is not None and _name(value) == "PrivateAttr"):
                    continue
                info.fields.append(name)
                for key in ("alias", "validation_alias"):
                    alias = _keyword(value, key) if value is not None else None
                    if isinstance(alias, ast.Constant) and alias.value not in (None, name):
                        info.aliases.append(str(alias.value))
        elif isinstance(stmt, ast.Assign):
            info.attributes.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            decorators = [_name(d) for d in stmt.decorator_list]
            if "property" in decorators or "setter" in decorators:
                info.attributes.add(stmt.name)
            else:
                info.attributes.add(stmt.name)
                info.methods[stmt.name] = _params(stmt)
            info.attributes.update(_stored_attributes(stmt))
            if stmt.name == "__init__":
                for sub in ast.walk(stmt):
                    if isinstance(sub, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "valid_keys" for t in sub.targets
                    ):
                        info.extra_keywords.extend(_string_constants(sub.value))
    return info


def read_classes(src: Path) -> dict[str, ClassNames]:
    """Every class of ``TARGETS`` read from ``src``; raises when a file or class is missing."""
    defs: dict[str, tuple[ast.ClassDef, str]] = {}
    for path, names in TARGETS.items():
        tree = ast.parse(read_source(src, path), filename=path)
        in_file = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        missing = [n for n in names if n not in in_file]
        if missing:
            raise LookupError(f"{path}: no class {', '.join(missing)}")
        module = path.removesuffix(".py").replace("/", ".")
        defs.update((name, (in_file[name], module)) for name in names)
    bases = {name: [_name(b) for b in node.bases] for name, (node, _) in defs.items()}
    return {
        name: class_names(node, module, _is_pydantic(name, bases)) for name, (node, module) in defs.items()
    }


def _is_pydantic(name: str, bases: dict[str, list[str]]) -> bool:
    """Whether class ``name`` derives from pydantic's BaseModel (through the classes read)."""
    return any(b in PYDANTIC_BASES or (b in bases and _is_pydantic(b, bases)) for b in bases[name])


def mro(name: str, classes: dict[str, ClassNames]) -> list[str]:
    """``name`` and its bases among ``classes``, depth first, each once."""
    order: list[str] = []

    def visit(n: str) -> None:
        if n in classes and n not in order:
            order.append(n)
            for base in classes[n].bases:
                visit(base)

    visit(name)
    return order


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _kind(name: str, classes: dict[str, ClassNames]) -> str:
    if classes[name].dataclass:
        return "dataclass"
    return "pydantic" if _is_pydantic(name, {n: c.bases for n, c in classes.items()}) else "class"


def _methods(chain: list[str], classes: dict[str, ClassNames]) -> dict[str, list[str]]:
    methods: dict[str, list[str]] = {}
    for cls in reversed(chain):  # subclasses override
        methods.update(classes[cls].methods)
    return dict(sorted(methods.items()))


def init_keywords(name: str, classes: dict[str, ClassNames]) -> list[str]:
    """The keyword arguments class ``name``'s constructor takes: the fields and aliases of a
    dataclass or pydantic model, else ``__init__``'s parameters (and where its ``**kwargs`` go)."""
    chain = mro(name, classes)
    if _kind(name, classes) != "class":
        return _unique(f for cls in reversed(chain) for f in [*classes[cls].fields, *classes[cls].aliases])
    init = [p for p in _methods(chain, classes).get("__init__", []) if not p.startswith("*")]
    if name in KEYWORDS_TO:
        extra = [k for cls in chain for k in classes[cls].extra_keywords]
        init = [*init, *init_keywords(KEYWORDS_TO[name], classes), *extra]
    return _unique(init)


def flatten(name: str, classes: dict[str, ClassNames]) -> dict[str, object]:
    """The manifest entry of class ``name``: its names and every inherited one."""
    chain = mro(name, classes)
    entry: dict[str, object] = {
        "module": classes[name].module,
        "kind": _kind(name, classes),
        "bases": classes[name].bases,
        "unread_bases": sorted({b for cls in chain for b in classes[cls].bases if b not in classes}),
        "init": init_keywords(name, classes),
        "fields": _unique(f for cls in reversed(chain) for f in classes[cls].fields),
        "aliases": _unique(a for cls in reversed(chain) for a in classes[cls].aliases),
        "attributes": sorted({a for cls in chain for a in classes[cls].attributes}),
        "methods": _methods(chain, classes),
    }
    if name in KEYWORDS_TO:
        entry["keywords_to"] = KEYWORDS_TO[name]
        entry["extra_keywords"] = _unique(k for cls in chain for k in classes[cls].extra_keywords)
    return entry


def manifest(
    src: Path, release: str, commit: str, origins: dict[str, str], note: str = ""
) -> dict[str, object]:
    """The manifest of the release whose source is under ``src`` (``note``: about that source)."""
    classes = read_classes(src)
    wanted = [n for names in TARGETS.values() for n in names]
    return {
        "about": "Names (no code) of the TensorRT-LLM API that lmi_trtllm may use, read with ast from "
        "the release below by scripts/trtllm_manifest.py; checked by tests/lmi_trtllm/test_api_manifest.py",
        "package": "tensorrt-llm",
        "release": release,
        "commit": commit,
        "note": note,
        "sources": {path: origins.get(path, "") for path in TARGETS},
        "classes": {name: flatten(name, classes) for name in sorted(wanted)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="directory holding tensorrt_llm/... (.py or .html)")
    parser.add_argument("--release", required=True, help="the release the source is from, e.g. 1.2.1")
    parser.add_argument("--commit", required=True, help="the release tag's commit")
    parser.add_argument(
        "--origin", action="append", default=[], metavar="PATH=TEXT", help="where a file came from"
    )
    parser.add_argument("--note", default="", help="anything a reader should know about the source")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    origins = dict(o.split("=", 1) for o in args.origin)
    data = manifest(args.source, args.release, args.commit, origins, args.note)
    args.output.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.output} (release {args.release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
