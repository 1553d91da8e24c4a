"""LoRA in the vLLM backend: adapter ids and counters (pure), and vLLM-CPU against peft's own output.

The engine tests compare vLLM's greedy tokens with a greedy loop over the same PEFT adapters in
transformers + peft (float32 on both sides: the tokens agree exactly, measured over 16 tokens).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lmi_core.engine import Finished, GenerationRequest, LoraAdapter, SamplingParams, Token
from lmi_core.errors import ConfigError, EngineError
from lmi_vllm.lora import LoraIds, ResidentTracker, adapter_error, can_pin
from tests.lmi_vllm.conftest import started_engine

PROMPTS = ("The quick brown fox jumps over the lazy dog", "Hello, my name is")
NEW_TOKENS = 16
TIMEOUT = 120.0

# -- pure: ids, counters, errors ---------------------------------------------------------------------


def test_ids_are_stable_per_name_and_path_and_never_reused() -> None:
    ids = LoraIds()
    a, replaced = ids.assign("a", "/a")
    assert (a, replaced) == (1, None)
    assert ids.assign("b", "/b") == (2, None)
    assert ids.assign("a", "/a") == (1, None)
    # New weights under the same name: a new id, and the old one to drop.
    assert ids.assign("a", "/a2") == (3, 1)
    assert ids.get("a") == 3
    assert ids.names([1, 2, 3]) == ["a", "b"]
    assert ids.get("unknown") is None


def test_tracker_counts_loads_and_evictions_but_not_removals() -> None:
    tracker = ResidentTracker()
    tracker.observe({1})
    tracker.observe({1, 2})
    assert (tracker.loads_total, tracker.evictions_total) == (2, 0)
    tracker.observe({2, 3})  # 3 loaded, 1 evicted by vLLM's LRU
    assert (tracker.loads_total, tracker.evictions_total) == (3, 1)
    tracker.removed(2)
    tracker.observe({2, 3})  # a snapshot taken while the removal is under way
    tracker.observe({3})
    assert (tracker.loads_total, tracker.evictions_total) == (3, 1)
    tracker.observe({2, 3})  # loaded again later: its later eviction counts
    tracker.observe({3})
    assert (tracker.loads_total, tracker.evictions_total) == (4, 2)


def test_pinning_leaves_max_loras_unpinned_places_in_memory() -> None:
    assert can_pin(0, 2, 3) and not can_pin(1, 2, 3) and not can_pin(0, 2, 2)


def test_adapter_error_is_a_400_naming_the_adapter() -> None:
    error = adapter_error(
        LoraAdapter("big", "/x/big"), Exception("Traceback...\nValueError: LoRA rank 16 is greater than 8.")
    )
    assert error.status == 400 and error.param == "adapter"
    assert "'big'" in str(error) and "/x/big" in str(error)
    assert str(error).endswith("LoRA rank 16 is greater than 8.")


def test_an_adapter_for_a_model_without_lora_is_a_400_before_vllm() -> None:
    from types import SimpleNamespace

    from lmi_core.errors import BadRequestError
    from lmi_vllm.engine import VllmEngine

    request = GenerationRequest("r", prompt="hi", adapter=LoraAdapter("a", "/a"))
    with pytest.raises(BadRequestError, match="enable_lora") as raised:
        VllmEngine.prepare(SimpleNamespace(lora_enabled=False), request)  # type: ignore[arg-type]
    assert raised.value.param == "adapter"


# -- vLLM-CPU ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(demo_model: Path, vllm_env: Path) -> dict[str, Path]:
    """Adapters a, b, c, d (rank 8, different seeds) and big (rank 16, above the engine's maximum)."""
    from tests.lora_adapters import build_adapter

    root = vllm_env / "adapters"
    built = {name: build_adapter(demo_model, root / name, seed) for seed, name in enumerate("abcd", 1)}
    built["big"] = build_adapter(demo_model, root / "big", 9, rank=16)
    return built


@pytest.fixture(scope="module")
def expected(demo_model: Path, adapters: dict[str, Path]) -> dict[tuple[str | None, str], list[int]]:
    """peft's greedy tokens for (adapter name or None for the base model, prompt)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapters["a"], adapter_name="a")
    for name in "bcd":
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()

    def greedy(prompt: str) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(NEW_TOKENS):  # no EOS stop: the engine side runs with ignore_eos
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        return [int(t) for t in ids[0, -NEW_TOKENS:]]

    out: dict[tuple[str | None, str], list[int]] = {}
    for name in "abcd":
        model.set_adapter(name)
        out.update({(name, p): greedy(p) for p in PROMPTS})
    with model.disable_adapter():
        out.update({(None, p): greedy(p) for p in PROMPTS})
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lora_engine(pm: Any, worker_context: Callable[..., Any]) -> AsyncIterator[Any]:
    """A vLLM engine with LoRA: 2 adapters per batch, 3 held in memory, rank up to 8."""
    context = worker_context(enable_lora="true", max_loras="2", max_cpu_loras="3", max_lora_rank="8")
    async with started_engine(pm, context) as loaded:
        yield loaded


async def generate(
    pm: Any, engine: Any, prompt: str, adapter: LoraAdapter | None, request_id: str
) -> list[int]:
    request = GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        params=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        adapter=adapter,
    )

    async def collect() -> list[int]:
        tokens: list[int] = []
        finished = False
        async for event in pm.hook.handle_request(engine=engine, request=request):
            if isinstance(event, Token):
                tokens.append(event.id)
            else:
                assert isinstance(event, Finished)
                finished = True
        assert finished
        return tokens

    return await asyncio.wait_for(collect(), TIMEOUT)


def lora(adapters: dict[str, Path], name: str | None, pinned: bool = False) -> LoraAdapter | None:
    return None if name is None else LoraAdapter(name, str(adapters[name]), pinned)


@pytest.mark.vllm
def test_cpu_ops_give_tokens_without_an_adapter_no_lora_term() -> None:
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    import lmi_vllm.cpu_lora  # noqa: F401  (patches vLLM's torch LoRA ops)

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    a = torch.randn(2, 1, 2, 4)  # 2 slots, rank 2
    indices = torch.tensor([0, -1, 1])
    shrunk = torch.zeros(3, 2)
    lora_ops.bgmv_shrink(x, a, shrunk, indices, 1.0)
    assert torch.equal(shrunk[1], torch.zeros(2))  # unpatched: slot 1's term
    assert torch.allclose(shrunk[2], a[1, 0] @ x[2])
    b = torch.randn(2, 1, 4, 2)
    y = torch.ones(3, 4)
    lora_ops.bgmv_expand(shrunk, b, y, indices, add_inputs=True)
    assert torch.equal(y[1], torch.ones(4))


@pytest.mark.vllm
def test_lora_options_become_vllm_engine_args(worker_context: Callable[..., Any]) -> None:
    from lmi_vllm.start import engine_kwargs

    kwargs, _, _ = engine_kwargs(
        worker_context(enable_lora="true", max_loras="3", max_lora_rank="32", max_cpu_loras="5")
    )
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_lora_rank"], kwargs["max_cpu_loras"]) == (
        True,
        3,
        32,
        5,
    )
    assert kwargs["worker_extension_cls"] == "lmi_vllm.worker_extension.LmiWorkerExtension"
    from lmi_vllm.start import WORKER_EXTENSION
    from lmi_vllm.worker_extension import QUALNAME

    assert WORKER_EXTENSION == QUALNAME
    with pytest.raises(ConfigError, match=r"option\.max_lora_rank"):
        engine_kwargs(worker_context(enable_lora="true", max_lora_rank="4"))  # not a rank vLLM builds
    defaults, _, _ = engine_kwargs(worker_context(enable_lora="true"))
    assert (defaults["max_loras"], defaults["max_lora_rank"], defaults["max_cpu_loras"]) == (
        4,
        16,
        4,
    )  # lmi's


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")  # the lora_engine fixture's loop
async def test_mixed_concurrent_requests_match_peft(
    pm: Any, lora_engine: Any, adapters: dict[str, Path], expected: dict[tuple[str | None, str], list[int]]
) -> None:
    # a, b and the base model in one batch (max_loras=2), each prompt twice.
    cases = [(name, p) for name in ("a", "b", None) for p in PROMPTS] * 2
    outputs = await asyncio.gather(
        *(
            generate(pm, lora_engine, p, lora(adapters, name), f"mixed-{i}")
            for i, (name, p) in enumerate(cases)
        )
    )
    for (name, p), tokens in zip(cases, outputs, strict=True):
        assert tokens == expected[(name, p)], (name, p)
    assert expected[("a", PROMPTS[0])] != expected[(None, PROMPTS[0])] != expected[("b", PROMPTS[0])]


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")  # the lora_engine fixture's loop
async def test_more_adapters_than_memory_slots_evict_and_stay_right(
    pm: Any, lora_engine: Any, adapters: dict[str, Path], expected: dict[tuple[str | None, str], list[int]]
) -> None:
    before = lora_engine.stats()
    for i, name in enumerate("abcdab"):  # 4 adapters through 3 places (max_cpu_loras=3)
        tokens = await generate(pm, lora_engine, PROMPTS[0], lora(adapters, name), f"lru-{i}")
        assert tokens == expected[(name, PROMPTS[0])], name
    after = lora_engine.stats()
    assert after.lora_evictions_total > before.lora_evictions_total
    assert after.lora_loads_total > before.lora_loads_total
    assert len(after.adapters) <= 3 and "b" in after.adapters


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")  # the lora_engine fixture's loop
async def test_pinned_adapter_survives_eviction_and_unload_drops_it(
    pm: Any, lora_engine: Any, adapters: dict[str, Path], expected: dict[tuple[str | None, str], list[int]]
) -> None:
    await lora_engine.load_adapter(lora(adapters, "c", pinned=True))
    assert "c" in lora_engine.stats().adapters
    for i, name in enumerate("abdab"):  # the two unpinned places in memory turn over
        await generate(pm, lora_engine, PROMPTS[1], lora(adapters, name), f"pin-{i}")
    assert "c" in lora_engine.stats().adapters
    # Both batch slots (max_loras=2) for other adapters while c is pinned: vLLM's own pin_lora would
    # hold a batch slot for c, and this batch killed its engine core.
    names = "abab"
    outputs = await asyncio.gather(
        *(
            generate(pm, lora_engine, PROMPTS[1], lora(adapters, n), f"pin-batch-{i}")
            for i, n in enumerate(names)
        )
    )
    assert outputs == [expected[(n, PROMPTS[1])] for n in names]
    tokens = await generate(pm, lora_engine, PROMPTS[1], lora(adapters, "c", pinned=True), "pin-c")
    assert tokens == expected[("c", PROMPTS[1])]
    evictions = lora_engine.stats().lora_evictions_total
    await lora_engine.unload_adapter("c")
    await lora_engine.unload_adapter("never-registered")
    stats = lora_engine.stats()
    assert "c" not in stats.adapters
    assert stats.lora_evictions_total == evictions  # an unload is not an eviction


@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")  # the lora_engine fixture's loop
@pytest.mark.parametrize(
    ("name", "reason"), [("missing", "No adapter found"), ("big", "greater than max_lora_rank")]
)
async def test_an_adapter_vllm_cannot_load_is_a_400_naming_it(
    pm: Any,
    lora_engine: Any,
    adapters: dict[str, Path],
    expected: dict[tuple[str | None, str], list[int]],
    vllm_env: Path,
    name: str,
    reason: str,
) -> None:
    path = str(adapters[name]) if name in adapters else str(vllm_env / "no-such-adapter")
    bad = LoraAdapter(name, path)
    with pytest.raises(EngineError) as raised:
        await generate(pm, lora_engine, PROMPTS[0], bad, f"bad-{name}")
    assert raised.value.status == 400 and raised.value.param == "adapter"
    assert repr(name) in str(raised.value) and reason in str(raised.value)
    with pytest.raises(EngineError, match=reason):
        await lora_engine.load_adapter(bad)
    # The engine goes on serving.
    tokens = await generate(pm, lora_engine, PROMPTS[0], lora(adapters, "a"), f"after-{name}")
    assert tokens == expected[("a", PROMPTS[0])]
