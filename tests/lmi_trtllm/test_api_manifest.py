"""lmi_trtllm against the pinned TensorRT-LLM API: every keyword argument and attribute it uses on
TensorRT-LLM's objects must be in ``lmi_trtllm/api_manifest.json``, the names of release 1.2.1 read
from its source by ``scripts/trtllm_manifest.py``.

TensorRT-LLM cannot be installed here (CUDA only), so nothing runs its engine; ``tests/api_uses.py``
walks lmi_trtllm's code with ``ast`` instead, following ``**kwargs`` dicts to the option tables
they are built from. A failure names the file, the line and the name the release lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmi_trtllm import options, versions
from tests.api_uses import Use, collect

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "plugins" / "lmi_trtllm" / "lmi_trtllm"
MANIFEST: dict[str, Any] = json.loads((PLUGIN / "api_manifest.json").read_text())
CLASSES: dict[str, Any] = MANIFEST["classes"]


def missing_from(classes: dict[str, Any], use: Use) -> str | None:
    """Why the release in ``classes`` lacks what ``use`` needs; None when it has it."""
    entry = classes.get(use.api)
    if entry is None:
        return f"{use.api} is not in the manifest (add it to scripts/trtllm_manifest.py TARGETS)"
    if use.kind == "attribute":
        return None if use.name in entry["attributes"] else "no such attribute"
    if use.member == "__init__":
        return None if use.name in entry["init"] else "no such constructor keyword"
    params = entry["methods"].get(use.member)
    if params is None:
        return f"no method {use.member}"
    return None if use.name in params or any(p.startswith("**") for p in params) else "no such parameter"


def problems(uses: list[Use], classes: dict[str, Any]) -> list[str]:
    return [f"{use} ({why})" for use in uses if (why := missing_from(classes, use)) is not None]


def test_lmi_trtllm_uses_only_names_of_the_pinned_release() -> None:
    uses, unresolved = collect(PLUGIN, "tensorrt_llm")
    assert not unresolved, "** dicts whose keys the walk cannot resolve:\n" + "\n".join(unresolved)
    found = problems(uses, CLASSES)
    assert not found, f"names TensorRT-LLM {MANIFEST['release']} does not have:\n" + "\n".join(found)


def test_the_walk_sees_every_kind_of_use() -> None:
    """The walk reaches each way lmi_trtllm hands names to TensorRT-LLM (a walk that lost one would
    pass the test above vacuously)."""
    uses, _ = collect(PLUGIN, "tensorrt_llm")
    seen = {(u.api, u.member, u.name, u.kind) for u in uses}
    expected = {
        ("LLM", "__init__", "model", "keyword"),  # llm_kwargs' dict display, through load()
        ("LLM", "__init__", "max_num_tokens", "keyword"),  # options.LLM_KEYS, through parsed.llm_args
        ("LLM", "__init__", "_mpi_session", "keyword"),  # stored into the dict in load()
        ("KvCacheConfig", "__init__", "free_gpu_memory_fraction", "keyword"),  # options.KV_CACHE_KEYS
        ("LoraConfig", "__init__", "max_cpu_loras", "keyword"),  # options.LORA_KEYS
        ("LoRARequest", "__init__", "lora_ckpt_source", "keyword"),  # a function's returned dict
        ("MpiCommSession", "__init__", "comm", "keyword"),  # a plain keyword
        ("SamplingParams", "__init__", "min_p", "keyword"),  # a for loop over a literal tuple
        ("SamplingParams", "__init__", "top_k", "keyword"),  # dict.update(...)
        ("GuidedDecodingParams", "__init__", "grammar", "keyword"),  # convert.GUIDED_FIELDS
        ("LLM", "generate_async", "lora_request", "keyword"),  # a method of an annotated attribute
        ("LLM", "__init__", "_executor", "attribute"),  # getattr(llm, "_executor", None)
        ("RequestOutput", "__init__", "prompt_token_ids", "attribute"),
        ("CompletionOutput", "__init__", "token_ids_diff", "attribute"),
        ("Logprob", "__init__", "logprob", "attribute"),
    }
    assert expected <= seen, sorted(expected - seen)


def test_every_option_table_entry_reaches_a_constructor() -> None:
    """Each target name in lmi_trtllm's option tables is a keyword the walk passes to TensorRT-LLM,
    so the test above checked it against the manifest."""
    uses, _ = collect(PLUGIN, "tensorrt_llm")
    passed = {(u.api, u.name) for u in uses if u.kind == "keyword"}
    for table, api in ((options.LLM_KEYS, "LLM"), (options.KV_CACHE_KEYS, "KvCacheConfig")):
        assert {(api, target) for target, _ in table.values()} <= passed
    assert {("LoraConfig", target) for target, _ in options.LORA_KEYS.values()} <= passed


def test_reserved_names_are_llm_arguments() -> None:
    """RESERVED refuses TensorRT-LLM's own names for the arguments lmi sets: they must be real ones."""
    init = set(CLASSES["LLM"]["init"])
    assert set(options.RESERVED) <= init, sorted(set(options.RESERVED) - init)


def test_a_name_the_release_lacks_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    plugin = tmp_path.resolve() / "fake_plugin"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("")
    (plugin / "engine.py").write_text(
        "from tensorrt_llm.executor.request import LoRARequest\n"
        "from tensorrt_llm.llmapi import LLM\n"
        "\n"
        "def kwargs():\n"
        '    return {"lora_name": "a", "lora_ckpt_dir": "/x"}\n'
        "\n"
        "def build(llm: LLM):\n"
        "    request = LoRARequest(lora_int_id=1, **kwargs())\n"
        "    return llm.generate_async('hi', stream=True), llm.get_statz, request.path\n"
    )
    uses, unresolved = collect(plugin, "tensorrt_llm")
    assert unresolved == []
    path = str(plugin / "engine.py")
    assert problems(uses, CLASSES) == [
        f"{path}:5: keyword 'lora_ckpt_dir' of LoRARequest(...) (no such constructor keyword)",
        f"{path}:9: LLM.get_statz (no such attribute)",
        f"{path}:9: keyword 'stream' of LLM.generate_async(...) (no such parameter)",
    ]


def test_a_dict_the_walk_cannot_resolve_is_reported(tmp_path: Path) -> None:
    plugin = tmp_path.resolve() / "fake_plugin"
    plugin.mkdir()
    engine = plugin / "engine.py"
    engine.write_text(
        "from tensorrt_llm import SamplingParams\n"
        "\n"
        "def build(user, extra, key):\n"
        "    SamplingParams(**user.params)\n"
        "    SamplingParams(**extra)\n"
        "    SamplingParams(**{key: 1})\n"
    )
    assert collect(plugin, "tensorrt_llm") == (
        [],
        [
            f"{engine}:4: user.params (nothing in the plugin writes it)",
            f"{engine}:5: extra (not bound in this function)",
            f"{engine}:6: key key",
        ],
    )


def test_the_manifest_is_the_supported_release() -> None:
    assert MANIFEST["release"] == versions.MANIFEST_RELEASE
    assert len(MANIFEST["commit"]) == 40
    assert set(CLASSES) >= {"LLM", "TorchLlmArgs", "KvCacheConfig", "LoraConfig", "SamplingParams"}
