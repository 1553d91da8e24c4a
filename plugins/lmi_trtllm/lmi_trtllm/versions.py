"""The TensorRT-LLM releases lmi_trtllm supports, and the release installed here (found without importing it).

Invariant: ``SUPPORTED`` holds the release that ``api_manifest.json`` was read from (1.2.1), and the
``trtllm`` extra of this distribution's ``pyproject.toml`` states the same range (a test compares them).
A release outside it is refused before TensorRT-LLM is imported, naming the installed version: the
names lmi_trtllm passes drift between releases (an older ``LoRARequest`` has no ``lora_ckpt_source``,
an older ``MpiCommSession`` no ``comm``; after 1.2 ``LoraConfig`` leaves ``tensorrt_llm.lora_helper``),
and a wrong name fails only on a GPU host.

Versions are compared by their release numbers, as PEP 440 orders them for this range: a pre-release
(``rc``, ``a``, ``b``, ``dev``) of the lower bound is older than it, and any release of ``1.3`` (its
pre-releases too) is outside ``<1.3``; ``.postN`` and local (``+...``) parts do not matter.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
from pathlib import Path

# PEP 440 specifier of the supported releases (the pyproject extra: tensorrt-llm>=1.2.1,<1.3), and the
# release whose source api_manifest.json was read from.
SUPPORTED = ">=1.2.1,<1.3"
MANIFEST_RELEASE = "1.2.1"
LOWER = (1, 2, 1)  # inclusive
UPPER = (1, 3)  # exclusive, pre-releases of it included

_VERSION = re.compile(r"^\s*v?(\d+(?:\.\d+)*)(?:[-_.]?(a|b|c|rc|alpha|beta|pre|preview|dev)\d*)?", re.I)


def release_numbers(version: str) -> tuple[tuple[int, ...], bool] | None:
    """``version``'s release numbers and whether it is a pre-release; None when it is not PEP 440-like."""
    match = _VERSION.match(version)
    if match is None:
        return None
    numbers = tuple(int(n) for n in match.group(1).split("."))
    return numbers, match.group(2) is not None


def _padded(numbers: tuple[int, ...], width: int = 4) -> tuple[int, ...]:
    return numbers + (0,) * (width - len(numbers))


def supported(version: str) -> bool:
    """Whether TensorRT-LLM ``version`` is in ``SUPPORTED`` (an unparseable version is not)."""
    parsed = release_numbers(version)
    if parsed is None:
        return False
    numbers, pre = parsed
    if _padded(numbers) < _padded(LOWER) or (pre and _padded(numbers) == _padded(LOWER)):
        return False
    return _padded(numbers) < _padded(UPPER)


def installed_version() -> str | None:
    """The installed TensorRT-LLM's version, from its distribution metadata, else from
    ``tensorrt_llm/version.py`` (read, not imported); None when neither says."""
    for distribution in ("tensorrt-llm", "tensorrt_llm"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        version_file = Path(location) / "version.py"
        if version_file.is_file():
            for node in ast.parse(version_file.read_text()).body:
                if (
                    isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
                    and isinstance(node.value, ast.Constant)
                ):
                    return str(node.value.value)
    return None
