"""TensorRT-LLM inside an lmi-core MPI job: rank 0 drives the LLM API, the other ranks serve it.

lmi's ``mpirun`` starts one worker per rank (``tensor_parallel_degree x pipeline_parallel_degree``).
TensorRT-LLM's own runtime must then run on every rank, driven by rank 0:

* rank 0 builds ``LLM(..., _mpi_session=MpiCommSession(comm=COMM_WORLD, n_workers=world_size))``:
  with a session given, the LLM runs its executor workers on the existing ranks instead of spawning
  processes (``tensorrt_llm/llmapi/llm.py``, ``tensorrt_llm/llmapi/mpi_session.py``);
* every other rank enters ``mpi4py.futures.MPICommExecutor(COMM_WORLD)``, which blocks running the
  tasks rank 0 submits until rank 0 shuts the pool down (TensorRT-LLM's ``mgmn_worker_node.py`` does
  the same). It blocks in a thread of ours, so the rank's worker loop still answers heartbeats.

Requests reach every rank (the core sends each to all ranks); only rank 0 runs them, through
``generate_async(streaming=True)`` on the worker's event loop, where TensorRT-LLM needs a running loop
to stream results asynchronously. The others finish each request at once without output.

TensorRT-LLM is imported only inside ``load_engine``: the plugin's hooks import this module.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from lmi_core import (
    BadRequestError,
    EngineError,
    EngineStats,
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoraAdapter,
    RequestCounts,
    WorkerContext,
)
from lmi_core.option_values import importable
from lmi_core.prompts import chat_text
from lmi_trtllm.convert import (
    StreamState,
    delta_events,
    lora_error,
    lora_id,
    lora_request_kwargs,
    map_error,
    sampling_kwargs,
)
from lmi_trtllm.options import INSTALL_HINT, llm_kwargs
from lmi_trtllm.versions import SUPPORTED, installed_version, supported

if TYPE_CHECKING:  # names for tests/lmi_trtllm/test_api_manifest.py; imported in load_engine only
    from tensorrt_llm.llmapi import LLM, RequestOutput

logger = logging.getLogger(__name__)


def require_tensorrt_llm() -> None:
    """Raise ``EngineError`` with install instructions when TensorRT-LLM is not importable here, or
    is a release outside ``SUPPORTED`` (found without importing it: that takes seconds)."""
    if not importable("tensorrt_llm"):
        raise EngineError(
            f"the trtllm backend needs the tensorrt_llm package, which this worker's Python "
            f"({sys.executable}) cannot import: {INSTALL_HINT}",
            status=500,
        )
    version = installed_version()
    if version is None:
        logger.warning("cannot tell which TensorRT-LLM is installed; lmi_trtllm supports %s", SUPPORTED)
    elif not supported(version):
        raise EngineError(
            f"the trtllm backend supports tensorrt-llm{SUPPORTED} (the API it was checked against, "
            f"docs/trtllm.md), but this worker's Python ({sys.executable}) has tensorrt-llm {version}: "
            f"install a supported release (pip install 'tensorrt-llm{SUPPORTED}'), or point "
            "option.pythonExecutable at a Python that has one",
            status=500,
        )


def load(context: WorkerContext) -> TrtllmEngine | FollowerEngine:
    """Build this rank's part of the engine (blocking: the worker calls it off its event loop)."""
    require_tensorrt_llm()
    if context.device != "cuda":
        raise EngineError(
            "TensorRT-LLM runs on NVIDIA GPUs only, and lmi found none for this worker "
            "(NVML reports no GPU, or CUDA_VISIBLE_DEVICES hides them)",
            status=500,
        )
    kwargs = llm_kwargs(context)  # option errors before the slow import
    try:
        # Takes seconds and loads the CUDA libraries: only once the cheap checks above have passed.
        from tensorrt_llm.llmapi import LLM, KvCacheConfig, MpiCommSession
    except ImportError as exc:
        raise EngineError(f"tensorrt_llm is installed but cannot be imported: {exc}", status=500) from exc
    if "kv_cache_config" in kwargs:
        kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
    if "lora_config" in kwargs:
        from tensorrt_llm.lora_helper import LoraConfig  # its module in the supported releases

        kwargs["lora_config"] = LoraConfig(**kwargs["lora_config"])
    if context.mode == "mpi" and context.world_size > 1:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        if comm.Get_size() != context.world_size:
            raise EngineError(
                f"the MPI job has {comm.Get_size()} ranks but the model needs {context.world_size} "
                "(tensor_parallel_degree x pipeline_parallel_degree)",
                status=500,
            )
        if comm.Get_rank() != 0:
            return FollowerEngine(comm.Get_rank(), lambda: serve_rank0(comm))
        kwargs["_mpi_session"] = MpiCommSession(comm=comm, n_workers=context.world_size)
    started = time.monotonic()
    llm = LLM(**kwargs)
    logger.info("TensorRT-LLM engine built in %.1f s (%s)", time.monotonic() - started, context.model_id)
    return TrtllmEngine(llm)


def serve_rank0(comm: Any) -> None:
    """Run the tasks rank 0's MPI session submits until it shuts the pool down (ranks > 0)."""
    from mpi4py.futures import MPICommExecutor

    with MPICommExecutor(comm, root=0) as executor:
        if executor is not None:  # only the root gets an executor; a rank > 0 never should
            raise RuntimeError(f"rank {comm.Get_rank()} became the root of the MPI executor")


class FollowerEngine:
    """A rank > 0: TensorRT-LLM's runtime works here on rank 0's behalf, in a thread of ours."""

    def __init__(self, rank: int, serve: Callable[[], object]) -> None:
        self.rank = rank
        self.error: str | None = None
        self._closed = False
        # Daemon: when the worker exits, nothing waits for a pool that rank 0 no longer drives.
        self._thread = threading.Thread(
            target=self._run, args=(serve,), name=f"lmi-trtllm-rank{rank}", daemon=True
        )
        self._thread.start()

    def _run(self, serve: Callable[[], object]) -> None:
        try:
            serve()
        except BaseException as exc:  # reported through the heartbeat (stats)
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("rank %d: TensorRT-LLM worker loop failed", self.rank)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Nothing to do: rank 0 runs the request and TensorRT-LLM brings this rank along."""
        return
        yield  # an async generator that ends at once

    def stats(self) -> EngineStats:
        """Empty counters (rank 0 reports them); raises once the worker loop has stopped."""
        if not self._closed and not self._thread.is_alive():
            reason = self.error or "rank 0 closed its pool"
            raise EngineError(f"rank {self.rank}: TensorRT-LLM worker loop ended ({reason})", status=500)
        return EngineStats()

    def shutdown(self) -> None:
        """Rank 0's ``LLM.shutdown`` ends this rank's work; only stop reporting the loop as failed."""
        self._closed = True


class TrtllmEngine:
    """Rank 0: the ``LLM`` and the counters lmi reports."""

    def __init__(self, llm: LLM) -> None:
        from tensorrt_llm import SamplingParams as TrtSamplingParams
        from tensorrt_llm.sampling_params import GuidedDecodingParams

        self.llm = llm
        self._sampling_params = TrtSamplingParams
        self._guided_decoding_params = GuidedDecodingParams
        # LLM.tokenizer wraps the HF tokenizer (TransformersTokenizer.tokenizer) for chat templates.
        self.tokenizer = getattr(llm.tokenizer, "tokenizer", llm.tokenizer)
        self.special_ids = frozenset(getattr(self.tokenizer, "all_special_ids", ()) or ())
        self.lora_enabled = getattr(getattr(llm, "args", None), "lora_config", None) is not None
        # TensorRT-LLM loads an adapter on its first request and keeps max_cpu_loras / max_loras of them
        # (its own LRU, no counters in the LLM API): lmi knows only the ids it gave out. Stats report
        # those adapters as resident, each first use as a load, and no evictions (not observable).
        self._lora_ids: dict[tuple[str, str], int] = {}
        self._lora_names: set[str] = set()
        self._closed = False
        self.requests = RequestCounts()

    def shutdown(self) -> None:
        """Stop TensorRT-LLM's executor on every rank."""
        if not self._closed:
            self._closed = True
            self.llm.shutdown()

    def stats(self) -> EngineStats:
        """Counters for the heartbeat; raises when the executor has shut down (a fatal runtime error).

        Own counters only: ``LLM.get_stats`` waits up to its timeout on a queue of iteration stats.
        """
        if self._closed:
            raise EngineError("TensorRT-LLM engine is shut down", status=503)
        # The check generate_async itself makes before accepting a request (private, hence getattr).
        executor = getattr(self.llm, "_executor", None)
        if executor is None or executor.is_shutdown():
            raise EngineError("TensorRT-LLM executor has shut down", status=500)
        stats = self.requests.stats()
        stats.adapters = sorted(self._lora_names)
        stats.lora_loads_total = len(self._lora_ids)
        return stats

    def lora(self, adapter: LoraAdapter | None) -> Any:
        """TensorRT-LLM's ``LoRARequest`` for ``adapter`` (None: the base model); a 400 if unusable."""
        if adapter is None:
            return None
        if not self.lora_enabled:
            raise BadRequestError(
                f"LoRA adapter {adapter.name!r} requested, but this model is served without adapters "
                "(option.enable_lora=true turns them on)",
                param="adapter",
            )
        from tensorrt_llm.executor.request import LoRARequest

        try:
            request = LoRARequest(**lora_request_kwargs(adapter, lora_id(self._lora_ids, adapter)))
        except (ValueError, TypeError) as exc:
            raise lora_error(adapter, exc) from None
        self._lora_names.add(adapter.name)
        return request

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        """Check ``adapter`` and give it an id; TensorRT-LLM reads the weights on the first request
        (its LLM API has no separate load, nor pinning)."""
        self.lora(adapter)

    async def unload_adapter(self, name: str) -> None:
        """Forget ``name`` in the stats; TensorRT-LLM evicts the weights from its cache in its own time
        (the id stays taken, so that re-registered weights get a fresh one)."""
        self._lora_names.discard(name)

    def prompt_text(self, request: GenerationRequest) -> tuple[str, bool]:
        """The prompt text and whether the chat template wrote it (then it holds its special tokens)."""
        if request.messages:
            return chat_text(request, self.tokenizer), True
        if request.prompt_ids:
            return str(self.tokenizer.decode(request.prompt_ids)), True
        if request.prompt:
            return request.prompt, False
        raise BadRequestError("the request has neither inputs nor messages", param="inputs")

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream ``request``; a bad prompt raises at once; closing early aborts it in TensorRT-LLM."""
        text, templated = self.prompt_text(request)
        lora = self.lora(request.adapter)
        try:
            kwargs = sampling_kwargs(request.params, templated=templated)
            if "guided_decoding" in kwargs:
                kwargs["guided_decoding"] = self._guided_decoding_params(**kwargs["guided_decoding"])
            params = self._sampling_params(**kwargs)
            # Token ids go in as they are (TensorRT-LLM takes a list[int] prompt and adds nothing).
            source: Any = list(request.prompt_ids) if request.prompt_ids else text
        except EngineError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc
        return self.requests.relay(self._stream(source, text, params, request.params.top_logprobs, lora))

    async def _stream(
        self, source: Any, text: str, params: Any, top_n: int, lora: Any = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """The request's events from ``generate_async`` (``source``: the prompt text or its token ids);
        aborts the request unless it finished."""
        try:
            result: RequestOutput = self.llm.generate_async(
                source, sampling_params=params, streaming=True, lora_request=lora
            )
        except Exception as exc:
            raise map_error(exc) from exc
        prompt_tokens = len(result.prompt_token_ids)
        state = StreamState()
        finished = False
        output: RequestOutput  # the same object, updated: GenerationResult.__anext__ returns self
        try:
            async for output in result:
                events = delta_events(
                    output.outputs[0],
                    output.finished,
                    state,
                    special_ids=self.special_ids,
                    top_n=top_n,
                    decode=self._decode,
                    prompt=text,
                    prompt_tokens=prompt_tokens,
                )
                for event in events:
                    finished = finished or isinstance(event, Finished)
                    yield event
                if finished:
                    return
            raise EngineError("TensorRT-LLM ended the request without a finish reason")
        except EngineError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc
        finally:
            if not finished:
                # Closed early (client gone, cancelled) or failed: free the sequence now.
                with contextlib.suppress(Exception):  # the executor may be gone already
                    result.abort()

    def _decode(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))
