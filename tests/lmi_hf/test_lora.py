"""LoRA on the HF engine: requests for different adapters and the base model share one batch and give
``peft``'s own greedy output; the LRU cache evicts within ``max_cpu_loras``; load/unload; a bad adapter
fails only its requests (400); 2 MPI ranks give the same outputs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmi_core.config import build_model_config
from lmi_core.engine import AdapterEngine, Finished, GenerationRequest, LoraAdapter, SamplingParams, Token
from lmi_core.errors import EngineError
from lmi_core.launch.launchers import free_ports, mpirun_argv
from lmi_core.option_values import LoraSettings
from lmi_hf.adapters import plan_adapters
from lmi_hf.distributed import decode_plan, encode_plan
from lmi_hf.engine import HFEngine
from lmi_hf.step import StepPlan
from tests.lmi_hf.engines import running_engine
from tests.lora_adapters import build_adapter

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and", "one two three"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def adapters(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoraAdapter]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: LoraAdapter(name, str(build_adapter(demo_model, root / name, seed=seed)))
        for name, seed in (("A", 1), ("B", 2), ("C", 3))
    }


@pytest.fixture(scope="module")
def expected(demo_model: Path, adapters: dict[str, LoraAdapter]) -> dict[tuple[str, str | None], list[int]]:
    """PEFT's own greedy output for every prompt with A, B, C and the base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapters["A"].path, adapter_name="A")
    for name in ("B", "C"):
        model.load_adapter(adapters[name].path, adapter_name=name)
    model.eval()
    out: dict[tuple[str, str | None], list[int]] = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        for name in ("A", "B", "C", None):
            if name is None:
                with model.disable_adapter():
                    tokens = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)
            else:
                model.set_adapter(name)
                tokens = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)
            out[(prompt, name)] = tokens[0, ids.input_ids.shape[1] :].tolist()
    assert len({tuple(out[(PROMPTS[1], n)]) for n in ("A", "B", "C", None)}) == 4  # adapters matter
    return out


@pytest.fixture
def lora_engine(demo_model: Path, request: pytest.FixtureRequest) -> Iterator[HFEngine]:
    options = {"enable_lora": "true", **getattr(request, "param", {})}
    with running_engine(demo_model, options, max_batch_size=8) as engine:
        yield engine


async def run(engine: HFEngine, prompt: str, adapter: LoraAdapter | None, rid: str = "") -> list[int]:
    request = GenerationRequest(
        rid or f"{prompt}-{adapter.name if adapter else 'base'}",
        prompt=prompt,
        params=SamplingParams(max_new_tokens=MAX_NEW),
        adapter=adapter,
    )
    tokens = []
    async for event in engine.generate(request):
        if isinstance(event, Token):
            tokens.append(event.id)
        assert not isinstance(event, Finished) or event.finish_reason in ("length", "eos_token")
    return tokens


def spy_steps(engine: HFEngine) -> list[set[str]]:
    """The adapters of each forward pass (prefill and decode), recorded as the engine asks PEFT."""
    steps: list[set[str]] = []
    forward_args = engine.lora.forward_args

    def recording(adapters: Any) -> list[str] | None:
        names = forward_args(adapters)
        steps.append(set(names or []))
        return names

    engine.lora.forward_args = recording  # type: ignore[method-assign]
    return steps


async def test_mixed_adapters_and_base_in_one_batch_equal_peft(
    lora_engine: HFEngine, adapters: dict[str, LoraAdapter], expected: dict[tuple[str, str | None], list[int]]
) -> None:
    steps = spy_steps(lora_engine)
    cases = [(p, name) for p in PROMPTS for name in ("A", "B", None)]
    results = await asyncio.gather(*(run(lora_engine, p, adapters[n] if n else None) for p, n in cases))
    for case, tokens in zip(cases, results, strict=True):
        assert tokens == expected[case], case
    assert any({"A", "B", "__base__"} <= step for step in steps)  # one forward pass, three models
    stats = lora_engine.stats()
    assert sorted(stats.adapters) == ["A", "B"] and stats.lora_loads_total == 2
    assert stats.lora_evictions_total == 0


@pytest.mark.parametrize("lora_engine", [{"max_cpu_loras": "2", "max_loras": "2"}], indirect=True)
async def test_three_adapters_through_a_cache_of_two(
    lora_engine: HFEngine, adapters: dict[str, LoraAdapter], expected: dict[tuple[str, str | None], list[int]]
) -> None:
    steps = spy_steps(lora_engine)
    cases = [(p, name) for _ in range(2) for p in PROMPTS for name in ("A", "B", "C")]
    results = await asyncio.gather(
        *(run(lora_engine, p, adapters[n], rid=f"{i}") for i, (p, n) in enumerate(cases))
    )
    for case, tokens in zip(cases, results, strict=True):
        assert tokens == expected[case], case
    stats = lora_engine.stats()
    assert stats.lora_evictions_total >= 1 and stats.lora_loads_total >= 3
    assert len(stats.adapters) <= 2
    assert all(len(step - {"__base__"}) <= 2 for step in steps)  # max_loras


@pytest.mark.parametrize("lora_engine", [{"max_cpu_loras": "1", "max_loras": "1"}], indirect=True)
async def test_load_pin_and_unload(
    lora_engine: HFEngine, adapters: dict[str, LoraAdapter], expected: dict[tuple[str, str | None], list[int]]
) -> None:
    assert isinstance(lora_engine, AdapterEngine)  # the worker's built-in hooks forward to it
    pinned = LoraAdapter("A", adapters["A"].path, pinned=True)
    await lora_engine.load_adapter(pinned)
    assert lora_engine.stats().adapters == ["A"] and lora_engine.stats().lora_loads_total == 1
    # The cache holds one, but A is pinned: B and C come and go beside it, A never leaves.
    for name in ("B", "C"):
        assert await run(lora_engine, PROMPTS[0], adapters[name]) == expected[(PROMPTS[0], name)]
        assert "A" in lora_engine.stats().adapters
    assert lora_engine.stats().lora_evictions_total == 1  # B, for C
    assert await run(lora_engine, PROMPTS[1], pinned) == expected[(PROMPTS[1], "A")]
    await lora_engine.unload_adapter("A")
    await lora_engine.unload_adapter("C")
    await lora_engine.unload_adapter("never-loaded")
    assert lora_engine.stats().adapters == []
    # Back to the plain model, and the adapter loads again on its next request.
    assert await run(lora_engine, PROMPTS[2], None) == expected[(PROMPTS[2], None)]
    assert await run(lora_engine, PROMPTS[2], adapters["B"]) == expected[(PROMPTS[2], "B")]
    with pytest.raises(EngineError) as info:
        await lora_engine.load_adapter(LoraAdapter("X", "/no/such/adapter"))
    assert info.value.status == 400 and "'X'" in str(info.value)


def bad_adapters(demo_model: Path, good: LoraAdapter, root: Path) -> dict[str, tuple[LoraAdapter, str]]:
    """Adapters this model cannot use, with the words of their error."""
    not_lora = root / "not-lora"
    shutil.copytree(good.path, not_lora)
    config = json.loads((not_lora / "adapter_config.json").read_text())
    (not_lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    no_config = root / "no-config"
    no_config.mkdir()
    wrong_target = root / "wrong-target"
    shutil.copytree(good.path, wrong_target)
    (wrong_target / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["qkv_proj"]}))
    no_layer = root / "no-layer"  # passes the reader's checks; PEFT refuses it as it installs
    shutil.copytree(good.path, no_layer)
    (no_layer / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [99]}))
    big = build_adapter(demo_model, root / "big", seed=4, rank=32)
    return {
        "missing": (LoraAdapter("missing", str(root / "nothing-here")), "no such directory"),
        "not-lora": (LoraAdapter("not-lora", str(not_lora)), "not a LoRA adapter"),
        "no-config": (LoraAdapter("no-config", str(no_config)), "no adapter_config.json"),
        "wrong-target": (LoraAdapter("wrong-target", str(wrong_target)), "lacks: qkv_proj"),
        "big": (LoraAdapter("big", str(big)), "rank 32 is above option.max_lora_rank=16"),
        "no-layer": (LoraAdapter("no-layer", str(no_layer)), "not found in the base model"),
    }


async def test_a_bad_adapter_fails_only_its_requests_with_a_400(
    lora_engine: HFEngine,
    adapters: dict[str, LoraAdapter],
    expected: dict[tuple[str, str | None], list[int]],
    demo_model: Path,
    tmp_path: Path,
) -> None:
    bad = bad_adapters(demo_model, adapters["A"], tmp_path)
    good = [(PROMPTS[1], "A"), (PROMPTS[1], None)]
    results = await asyncio.gather(
        *(run(lora_engine, p, adapters[n] if n else None) for p, n in good),
        *(run(lora_engine, PROMPTS[0], adapter) for adapter, _ in bad.values()),
        return_exceptions=True,
    )
    assert results[: len(good)] == [expected[case] for case in good]
    for error, (name, (_, words)) in zip(results[len(good) :], bad.items(), strict=True):
        assert isinstance(error, EngineError) and error.status == 400, error
        assert f"LoRA adapter {name!r}" in str(error) and words in str(error)
    assert lora_engine.stats().adapters == ["A"]
    assert lora_engine.stats().running == lora_engine.stats().waiting == 0


async def test_an_adapter_without_enable_lora_is_a_400(
    demo_model: Path, adapters: dict[str, LoraAdapter]
) -> None:
    with running_engine(demo_model, {}) as engine:
        with pytest.raises(EngineError) as info:
            await run(engine, "Hello", adapters["A"])
        assert info.value.status == 400 and "option.enable_lora=true" in str(info.value)


# -- the admission plan (pure) -----------------------------------------------------------------------


def lora(name: str) -> LoraAdapter:
    return LoraAdapter(name, f"/adapters/{name}")


OPTIONS = LoraSettings(enabled=True, max_loras=2, max_lora_rank=16, max_cpu_loras=2)


def test_the_plan_keeps_max_loras_per_batch_and_admits_past_a_request_that_must_wait() -> None:
    waiting = [lora("A"), lora("C"), None, lora("B")]
    plan = plan_adapters(waiting, ["A", "B"], ["A", "B"], set(), {"C"}, {}, [], [], 8, OPTIONS)
    assert plan.admit == [0, 2, 3] and plan.load == [] and plan.evict == []  # C: a third in the batch


def test_the_plan_evicts_the_least_recent_unused_unpinned_adapter() -> None:
    options = LoraSettings(enabled=True, max_loras=4, max_cpu_loras=3)
    resident = ["P", "U", "Q"]  # P pinned, U used by a running request, Q free
    plan = plan_adapters([lora("N")], ["U"], resident, {"P"}, {"N"}, {}, [], [], 8, options)
    assert plan.evict == ["Q"] and plan.load == [("N", "/adapters/N")] and plan.admit == [0]
    # Everything in use or pinned: N waits; only pinned ones left: over the limit rather than never.
    busy = plan_adapters([lora("N"), lora("Q")], ["U"], resident, {"P"}, {"N"}, {}, [], [], 8, options)
    assert busy.admit == [1] and busy.load == []
    one = dataclasses.replace(OPTIONS, max_cpu_loras=1)
    assert plan_adapters([lora("N")], [], ["P"], {"P"}, {"N"}, {}, [], [], 8, one).load == [
        ("N", "/adapters/N")
    ]


def test_the_plan_fails_a_bad_adapter_and_waits_for_one_being_read() -> None:
    waiting = [lora("bad"), lora("reading"), None]
    plan = plan_adapters(waiting, [], [], set(), set(), {"bad": "no such directory"}, [], [], 8, OPTIONS)
    assert plan.fail == [(0, "no such directory")] and plan.admit == [2]


# -- MPI mode -----------------------------------------------------------------------------------------


def test_the_step_plan_carries_adapter_changes_to_the_other_ranks() -> None:
    plan = StepPlan(
        admit=[("r1", 7)], unload=["old"], evict=["lru"], load=[("A", "/a")], fail=[("r2", "bad adapter")]
    )
    assert decode_plan(encode_plan(plan)) == plan


RANK_SCRIPT = """
import asyncio, json, sys
from lmi_core.engine import GenerationRequest, LoraAdapter, SamplingParams, Token, WorkerContext
from lmi_core.worker.rank_server import mpi_rank_and_size
from lmi_hf.distributed import load_distributed

rank, size = mpi_rank_and_size()
options = {"enable_lora": "true", "max_cpu_loras": "1", "max_loras": "1"}
context = WorkerContext(sys.argv[1], None, "hf", options, mode="mpi", rank=rank, world_size=size)
engine = load_distributed(context)
cases = json.loads(sys.argv[2])

async def run(i, prompt, adapter):
    request = GenerationRequest(
        f"r{i}", prompt=prompt, params=SamplingParams(max_new_tokens=int(sys.argv[3])),
        adapter=LoraAdapter(**adapter) if adapter else None,
    )
    return [e.id async for e in engine.generate(request) if isinstance(e, Token)]

async def main():
    return await asyncio.gather(*(run(i, p, a) for i, (p, a) in enumerate(cases)))

outputs = asyncio.run(main())
stats = engine.stats()
engine.shutdown()
if rank == 0:
    print("OUTPUTS " + json.dumps({"outputs": outputs, "evictions": stats.lora_evictions_total}), flush=True)
"""


@pytest.mark.mpi
def test_two_mpi_ranks_load_and_evict_in_lockstep_and_give_the_same_outputs(
    demo_model: Path,
    adapters: dict[str, LoraAdapter],
    expected: dict[tuple[str, str | None], list[int]],
    tmp_path: Path,
) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cases = [(p, name) for p in PROMPTS for name in ("A", "B", None)]
    wire_cases = [(p, adapters[n].to_wire() if n else None) for p, n in cases]
    config = build_model_config({"option.tensor_parallel_degree": "2"}, model_dir=str(demo_model), environ={})
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports())}
    argv = [*mpirun_argv(config, env), sys.executable, str(script), str(demo_model)]
    run = subprocess.run(
        [*argv, json.dumps(wire_cases), str(MAX_NEW)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if "OUTPUTS " in line)
    result = json.loads(line.split("OUTPUTS ", 1)[1])
    assert result["outputs"] == [expected[case] for case in cases]
    assert result["evictions"] >= 1  # a cache of one: A and B swapped, on both ranks at the same steps
