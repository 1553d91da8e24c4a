"""The request bodies of the pooling routes, as their APIs define them.

OpenAI's ``/v1/embeddings`` (``input`` as a string, strings, token ids or lists of token ids;
``encoding_format``; ``dimensions``), vLLM's ``/score`` (``text_1``/``text_2``, and its aliases
``queries``/``documents``), the Jina/Cohere ``/rerank`` (``query``, ``documents``, ``top_n``,
``return_documents``; TEI's ``texts``/``return_text``/``raw_scores`` too) and TEI's ``/embed``
(``inputs``, ``normalize``, ``truncate``, ``dimensions``). JSON types are strict, as on the OpenAI
routes; unknown fields are ignored and listed (or refused with ``option.strict_request_fields``).
Each takes Ollama's ``keep_alive`` (residency), as the generation bodies do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lmi_core.http.lmi_protocol import KeepAliveField
from lmi_core.http.openai_protocol import OpenAIBody

# OpenAI's limit of inputs per request; a larger batch is a 400 naming the field.
MAX_INPUTS = 2048
TOKEN_ID = Annotated[int, Field(ge=0, lt=2**31)]
Text = Annotated[str, Field(max_length=2**24)]
TokenIds = Annotated[list[TOKEN_ID], Field(min_length=1, max_length=2**20)]
Inputs = Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | TokenIds
EmbeddingInput = Inputs | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]


class EmbeddingsRequest(KeepAliveField, OpenAIBody):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # vLLM's: false leaves the vectors as pooled (not normalized); None: the model's option.normalize.
    use_activation: bool | None = None


class TeiEmbedRequest(KeepAliveField, OpenAIBody):
    """TEI's ``POST /embed`` (its ``prompt_name`` and ``truncation_direction`` are not served)."""

    inputs: Inputs
    normalize: bool = True
    truncate: bool = False
    dimensions: int | None = Field(None, ge=1)
    model: str | None = None


class ScoreRequest(KeepAliveField, OpenAIBody):
    """vLLM's ``/score``: ``text_1`` against each of ``text_2`` (1:N), or pair by pair (N:N)."""

    model: str | None = None
    text_1: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | None = None
    text_2: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | None = None
    # vLLM's other spelling of the same two sides.
    queries: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | None = None
    documents: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | None = None

    @model_validator(mode="after")
    def _two_sides(self) -> ScoreRequest:
        firsts = [name for name in ("text_1", "queries") if getattr(self, name) is not None]
        seconds = [name for name in ("text_2", "documents") if getattr(self, name) is not None]
        if len(firsts) != 1 or len(seconds) != 1:
            raise ValueError("give text_1 and text_2 (or queries and documents)")
        return self

    def sides(self) -> tuple[list[str], list[str], str]:
        """The two sides as lists, and the name of the second (errors about a pair name it)."""
        first = self.text_1 if self.text_1 is not None else self.queries
        second, name = (self.text_2, "text_2") if self.text_2 is not None else (self.documents, "documents")
        assert first is not None and second is not None  # _two_sides
        return (
            ([first] if isinstance(first, str) else first),
            ([second] if isinstance(second, str) else second),
            name,
        )


class RerankRequest(KeepAliveField, OpenAIBody):
    """Jina's and Cohere's ``/rerank`` (``documents``), or TEI's (``texts``): the documents by relevance
    to ``query``, best first."""

    model: str | None = None
    query: Text
    documents: Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | None = None
    top_n: int | None = Field(None, ge=0)  # 0 or none: all (vLLM)
    return_documents: bool = True
    # TEI's spelling: texts and return_text (its answer is a bare list); truncate cuts long documents.
    texts: Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | None = None
    return_text: bool = False
    truncate: bool = False

    @model_validator(mode="after")
    def _one_list(self) -> RerankRequest:
        if (self.documents is None) == (self.texts is None):
            raise ValueError("give documents (or TEI's texts)")
        return self
