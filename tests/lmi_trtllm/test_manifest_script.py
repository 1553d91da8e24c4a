"""scripts/trtllm_manifest.py on a small source tree shaped like TensorRT-LLM's: which names count as
constructor keywords (dataclass fields but not ``init=False`` ones, pydantic fields and aliases but not
private attributes, ``__init__`` parameters and where ``LLM``'s ``**kwargs`` go), inheritance, and the
same code read from a Sphinx source page instead of a ``.py`` file."""

from __future__ import annotations

import html
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

FILES = {
    "tensorrt_llm/llmapi/llm.py": """
class RequestOutput(DetokenizedGenerationResultBase, GenerationResult):
    def __init__(self) -> None: ...

    @classmethod
    def _from_generation_result(cls, generation_result, prompt=None):
        inst = cls.__new__(cls)
        inst._prompt = prompt
        return inst

class BaseLLM:
    def __init__(self, model, tokenizer=None, **kwargs):
        valid_keys = set(list(llm_args_cls.model_fields.keys()) + ['_mpi_session', 'backend'])
        self.args = None
        self._executor = None

    def generate_async(self, inputs, sampling_params=None, *, streaming=False): ...

    @property
    def tokenizer(self): ...

class _TorchLLM(BaseLLM):
    def __init__(self, model, tokenizer=None, **kwargs): ...

class LLM(_TorchLLM):
    def __init__(self, model, tokenizer=None, **kwargs): ...
""",
    "tensorrt_llm/llmapi/llm_args.py": """
class KvCacheConfig(StrictBaseModel, PybindMirror):
    enable_block_reuse: bool = Field(default=True)

class BaseLlmArgs(StrictBaseModel):
    model_config = {"extra": "forbid"}
    model: str = Field()
    mpi_session: Optional[object] = Field(default=None, alias="_mpi_session")
    _parallel_config: Optional[object] = PrivateAttr(default=None)

class TorchLlmArgs(BaseLlmArgs):
    decoding_type: ClassVar[str] = "x"
    enable_sleep: bool = Field(default=False)
    _quant_config: Optional[object] = None
""",
    "tensorrt_llm/llmapi/mpi_session.py": """
class MpiCommSession(MpiSession):
    def __init__(self, comm=None, n_workers: int = 1):
        self.comm = comm
""",
    "tensorrt_llm/sampling_params.py": """
@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    json: Optional[str] = None

@dataclass(slots=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 32
    _stop_word_ids: Optional[list] = field(default=None, init=False, repr=False)
    _return_log_probs: bool = False
""",
    "tensorrt_llm/executor/request.py": """
@dataclass(slots=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
""",
    "tensorrt_llm/executor/result.py": """
@dataclass(slots=True)
class Logprob:
    logprob: float

@dataclass(slots=True)
class CompletionOutput:
    index: int

    @property
    def text_diff(self) -> str: ...

class GenerationResultBase:
    def __init__(self, id, sampling_params):
        self.id = id

    @property
    def outputs(self): ...

class GenerationResult(GenerationResultBase):
    def __init__(self, generation_request):
        self._executor = None

    def abort(self) -> None: ...
""",
    "tensorrt_llm/lora_helper.py": """
class LoraConfig(BaseModel):
    max_loras: Optional[int] = None
""",
}


@pytest.fixture(scope="module")
def script() -> ModuleType:
    """scripts/trtllm_manifest.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("trtllm_manifest", ROOT / "scripts" / "trtllm_manifest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_tree(root: Path, as_html: frozenset[str] = frozenset()) -> Path:
    for path, code in FILES.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if path in as_html:
            target.with_suffix(".html").write_text(sphinx_page(code))
        else:
            target.write_text(code)
    return root


def sphinx_page(code: str) -> str:
    """``code`` the way Sphinx's viewcode shows it: escaped, inside a ``<pre>``, with ``[docs]`` links."""
    lines = []
    for line in html.escape(code).splitlines():
        if line.startswith("class "):
            lines.append('<div class="viewcode-block" id="X">')
            lines.append('<a class="viewcode-back" href="../reference.html#X">[docs]</a>')
        lines.append(f'<span class="n">{line}</span>')
    body = "\n".join(lines)
    page = f'<div class="highlight"><pre>\n{body}\n</pre></div>'
    return f"<html><body><nav><pre>not code</pre></nav><main><div>{page}</div></main></body></html>"


def generate(script: ModuleType, src: Path) -> dict[str, Any]:
    return script.manifest(src, "9.9.9", "0" * 40, {"tensorrt_llm/lora_helper.py": "from the tag"})


def test_constructor_keywords_follow_each_kind_of_class(script: ModuleType, tmp_path: Path) -> None:
    classes = generate(script, write_tree(tmp_path))["classes"]
    assert classes["SamplingParams"]["kind"] == "dataclass"
    assert classes["SamplingParams"]["init"] == ["max_tokens", "_return_log_probs"]  # not init=False
    assert "_stop_word_ids" in classes["SamplingParams"]["attributes"]
    assert classes["TorchLlmArgs"]["kind"] == "pydantic"  # through BaseLlmArgs(StrictBaseModel)
    assert classes["TorchLlmArgs"]["init"] == ["model", "mpi_session", "_mpi_session", "enable_sleep"]
    assert classes["TorchLlmArgs"]["unread_bases"] == ["StrictBaseModel"]
    assert classes["MpiCommSession"]["init"] == ["comm", "n_workers"]
    assert classes["LLM"]["kind"] == "class"
    assert classes["LLM"]["keywords_to"] == "TorchLlmArgs"
    assert classes["LLM"]["init"] == [
        "model",
        "tokenizer",
        "mpi_session",
        "_mpi_session",
        "enable_sleep",
        "backend",
    ]


def test_attributes_and_methods_are_inherited(script: ModuleType, tmp_path: Path) -> None:
    classes = generate(script, write_tree(tmp_path))["classes"]
    llm = classes["LLM"]
    assert {"args", "_executor", "tokenizer", "generate_async"} <= set(llm["attributes"])
    assert llm["methods"]["generate_async"] == ["inputs", "sampling_params", "streaming"]
    assert "tokenizer" not in llm["methods"]  # a property is an attribute
    output = classes["RequestOutput"]
    assert {"_prompt", "abort", "outputs", "id", "_executor"} <= set(output["attributes"])
    assert output["unread_bases"] == ["DetokenizedGenerationResultBase"]
    assert classes["CompletionOutput"]["attributes"] == ["index", "text_diff"]


def test_a_sphinx_source_page_gives_the_same_manifest(script: ModuleType, tmp_path: Path) -> None:
    from_py = generate(script, write_tree(tmp_path / "py"))
    from_pages = generate(
        script, write_tree(tmp_path / "html", as_html=frozenset(FILES) - {"tensorrt_llm/lora_helper.py"})
    )
    assert from_pages == from_py
    assert from_py["sources"]["tensorrt_llm/lora_helper.py"] == "from the tag"


def test_a_missing_class_or_file_fails(script: ModuleType, tmp_path: Path) -> None:
    src = write_tree(tmp_path)
    (src / "tensorrt_llm/executor/request.py").write_text("class Other: ...\n")
    with pytest.raises(LookupError, match=r"request\.py: no class LoRARequest"):
        generate(script, src)
    (src / "tensorrt_llm/executor/request.py").unlink()
    with pytest.raises(FileNotFoundError, match=r"request\.py"):
        generate(script, src)


def test_the_command_writes_the_manifest(script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "manifest.json"
    src = write_tree(tmp_path / "src")
    assert script.main([str(src), "--release", "9.9.9", "--commit", "abc", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["release"] == "9.9.9"
