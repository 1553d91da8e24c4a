"""lmi-core: a large-model inference server that runs engines as supervised worker processes."""

from __future__ import annotations

from lmi_core.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
