"""lmi-trtllm: the TensorRT-LLM backend of lmi-core (the ``tensorrt_llm`` LLM API in an MPI job).

Registered through the ``lmi`` entry-point group as ``trtllm``. TensorRT-LLM itself is not a
dependency of this distribution: it is installed separately on CUDA hosts (docs/trtllm.md). Nothing
here imports it until an engine is loaded, so the server process does not need it.
"""

from __future__ import annotations

__version__ = "0.1.0"
