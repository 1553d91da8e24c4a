"""DJL Serving's Python API as lmi-core serves it: the names a DJL ``model.py`` imports.

lmi-core's compatibility surface for model directories written for DJL Serving (docs/djl-migration.md):
``Input`` and ``Output`` for a ``handle(inputs)`` model (DJL's Python engine), and the
``input_parser.input_formatter`` and ``output_formatter.output_formatter`` decorators for an LLM's
custom formatters. It is a subset of DJL's ``djl_python`` (which is not published on PyPI: DJL
installs it inside its container), written anew from its documented behaviour; what it lacks is
listed in docs/djl-migration.md. Standard library only: it is imported in the worker processes.
"""

from djl_python.inputs import Input
from djl_python.outputs import Output

__all__ = ["Input", "Output"]
