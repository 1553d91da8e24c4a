"""A model's task and pooling settings, and the vectors pooling engines return (backend kit).

``option.task`` says what a model serves: ``text-generation`` (the default) generates; a pooling
model serves ``text-embedding`` (vectors: ``/v1/embeddings``, TEI's ``/embed``, and ``/score`` and
``/rerank`` by cosine similarity) or ``rerank`` (``score`` is its alias: a cross-encoder's relevance
of each query-document pair, ``/score`` and ``/rerank``). ``option.pooling`` (``mean``, ``cls``,
``last``) and ``option.normalize`` say how an embedding model turns hidden states into one vector.

Invariant: every backend and the server read these keys through ``pooling_settings`` alone (one
spelling, one default, a ``ConfigError`` naming the key), and an embedding crosses the worker
socket as little-endian float32 bytes, row after row, which is also what OpenAI's
``encoding_format=base64`` sends: the server never converts a vector it only relays. Standard
library only (worker side).
"""

from __future__ import annotations

import array
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lmi_core.errors import BadRequestError, ConfigError

Task = Literal["text-generation", "text-embedding", "rerank"]
Pooling = Literal["mean", "cls", "last"]

# option.task spellings -> the task. vLLM's and DJL's names are accepted for the same meaning.
TASKS: dict[str, Task] = {
    "text-generation": "text-generation",
    "generate": "text-generation",
    "auto": "text-generation",
    "text-embedding": "text-embedding",
    "embed": "text-embedding",
    "embedding": "text-embedding",
    "rerank": "rerank",
    "score": "rerank",
}
POOLINGS: dict[str, Pooling] = {"mean": "mean", "cls": "cls", "last": "last"}
# The keys ``pooling_settings`` reads: no backend treats them as its own.
POOLING_OPTIONS = frozenset({"task", "pooling", "normalize"})
# What a model of each task answers: the routes name these in their 400s.
SERVES: dict[Task, str] = {
    "text-generation": "generation (/v1/chat/completions, /v1/completions, /invocations)",
    "text-embedding": "embeddings (/v1/embeddings, /embed, /score, /rerank)",
    "rerank": "scores (/score, /rerank)",
}


@dataclass(frozen=True)
class PoolingSettings:
    """``pooling`` None: the model's own (its sentence-transformers pooling config, else the backend's
    default for its architecture)."""

    task: Task = "text-generation"
    pooling: Pooling | None = None
    normalize: bool = True  # embeddings are unit vectors unless option.normalize=false

    @property
    def generates(self) -> bool:
        return self.task == "text-generation"


def pooling_settings(options: Mapping[str, str]) -> PoolingSettings:
    """``option.task``, ``option.pooling`` and ``option.normalize``; a bad value is a ``ConfigError``
    naming its key."""
    raw_task = options.get("task", "text-generation").strip().lower()
    if raw_task not in TASKS:
        raise ConfigError("option.task", options["task"], "text-generation, text-embedding, rerank or score")
    task = TASKS[raw_task]
    pooling: Pooling | None = None
    if "pooling" in options:
        value = options["pooling"].strip().lower()
        if value not in POOLINGS:
            raise ConfigError("option.pooling", options["pooling"], "mean, cls or last")
        pooling = POOLINGS[value]
    normalize = options.get("normalize", "true").strip().lower()
    if normalize not in ("true", "false"):
        raise ConfigError("option.normalize", options["normalize"], "true or false")
    if task == "text-generation" and ("pooling" in options or "normalize" in options):
        key = "option.pooling" if "pooling" in options else "option.normalize"
        raise ConfigError(key, options.get(key[7:]), "unset for a text-generation model (set option.task)")
    return PoolingSettings(task, pooling, normalize == "true")


def wrong_task(model: str, task: Task, route: str) -> BadRequestError:
    """The 400 for a request ``model`` does not serve: it names the model's task and what it serves."""
    return BadRequestError(
        f"model {model!r} is a {task} model (option.task={task}): it serves {SERVES[task]}, not {route}",
        param="model",
    )


def check_dimensions(dimensions: int | None, width: int) -> None:
    """A 400 naming ``dimensions`` unless it is None or at most the model's ``width``."""
    if dimensions is not None and not 0 < dimensions <= width:
        raise BadRequestError(f"dimensions must be in 1..{width} for this model", param="dimensions")


def no_embeddings() -> BadRequestError:
    """A cross-encoder asked for embeddings."""
    return BadRequestError("this model scores pairs (a cross-encoder): it has no embeddings", param="model")


def vector_bytes(vectors: Any, dimensions: int | None, normalize: bool) -> tuple[bytes, int]:
    """A torch tensor of pooled vectors [rows, width] as the wire's float32 bytes and their width:
    cut to the first ``dimensions`` (Matryoshka), then L2-normalized when ``normalize`` (as
    ``torch.nn.functional.normalize``). Tensor methods only: no torch import here."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    vectors = vectors.float()
    if normalize:
        vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return vectors.cpu().contiguous().numpy().astype("<f4").tobytes(), int(vectors.shape[1])


def distinct_texts(pairs: list[tuple[str, str]]) -> tuple[list[str], list[int], list[int]]:
    """The texts of ``pairs``, each once (an embedding model embeds a query once for all its
    documents), and for each pair the index of its first and of its second text."""
    where: dict[str, int] = {}
    for pair in pairs:
        for text in pair:
            where.setdefault(text, len(where))
    return list(where), [where[a] for a, _ in pairs], [where[b] for _, b in pairs]


def cosine_scores(vectors: Any, first: list[int], second: list[int]) -> list[float]:
    """The cosine similarity of rows ``first[i]`` and ``second[i]`` of a torch tensor of vectors."""
    unit = vectors.float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores: list[float] = (unit[first] * unit[second]).sum(-1).tolist()
    return scores


def unpack_vectors(data: bytes, dimensions: int) -> list[list[float]]:
    """The rows of ``vector_bytes`` (little-endian float32, row after row), as floats."""
    values = array.array("f")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    flat = values.tolist()
    return [flat[i : i + dimensions] for i in range(0, len(flat), dimensions)] if dimensions else []
