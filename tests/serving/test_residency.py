"""The residency policy as pure functions: keep_alive, idle expiry, the room a load makes, what a
model is estimated to hold, and when eviction puts a model to sleep instead of stopping it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmi_core.config import build_model_config
from lmi_core.serving.residency import (
    CPU,
    RANK_OVERHEAD_CPU,
    Budget,
    Holder,
    Room,
    estimate,
    eviction,
    expiry,
    kv_bytes_per_token,
    make_room,
    parse_keep_alive,
    warm_tier,
    weights_bytes,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        ("0", 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("90", 90.0),
        (-1, math.inf),
        ("-1", math.inf),
        ("-5m", math.inf),
        (10**12, math.inf),  # beyond a year: "never"
    ],
)
def test_keep_alive_is_ollamas_duration_or_seconds(value: object, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m5", "", "1h-5m", True, None, [5], float("nan")])
def test_a_bad_keep_alive_says_what_it_takes(value: object) -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(value)


def test_the_last_requests_keep_alive_overrides_the_idle_timeout_and_a_pinned_model_stays() -> None:
    assert expiry(None, None, pinned=False) is None  # no idle timeout: it stays
    assert expiry(None, 2.0, pinned=False) == (2.0, "idle")
    assert expiry(0.0, 2.0, pinned=False) == (0.0, "keep_alive")  # unload after this response
    assert expiry(60.0, None, pinned=False) == (60.0, "keep_alive")
    assert expiry(math.inf, 2.0, pinned=False) is None  # -1: never
    assert expiry(0.0, 2.0, pinned=True) is None


GIB = 1024**3


def holder(
    name: str, gib: int = 1, used: float = 0.0, *, evictable: bool = True, pinned: bool = False
) -> Holder:
    return Holder(name, {CPU: gib * GIB}, used, evictable=evictable and not pinned, pinned=pinned)


def test_a_load_that_fits_evicts_nothing() -> None:
    assert make_room({CPU: GIB}, [holder("a")], Budget(2, {CPU: 4 * GIB})) == Room(())


def test_the_least_recently_used_idle_model_goes_first_and_only_as_many_as_needed() -> None:
    holders = [holder("new", used=3.0), holder("old", used=1.0), holder("mid", used=2.0)]
    assert make_room({CPU: GIB}, holders, Budget(3, {})).victims == ("old",)  # the count is full
    assert make_room({CPU: 2 * GIB}, holders, Budget(None, {CPU: 4 * GIB})).victims == ("old",)
    assert make_room({CPU: 3 * GIB}, holders, Budget(None, {CPU: 4 * GIB})).victims == ("old", "mid")


def test_pinned_and_busy_models_are_never_evicted() -> None:
    holders = [holder("pinned", used=0.0, pinned=True), holder("busy", used=1.0, evictable=False)]
    room = make_room({CPU: GIB}, [*holders, holder("idle", used=2.0)], Budget(3, {}))
    assert room.victims == ("idle",)
    waiting = make_room({CPU: GIB}, holders, Budget(2, {}))
    assert waiting.victims is None and waiting.wait  # the busy one may go idle
    assert waiting.why == "max_loaded_models=2 reached; held by busy, pinned"
    never = make_room({CPU: GIB}, [holders[0]], Budget(1, {}))
    assert never == Room(None, wait=False, why="max_loaded_models=1 reached; held by pinned")  # 503 at once


def test_an_eviction_that_would_not_help_is_not_made() -> None:
    gpu = [Holder("on1", {"1": 8 * GIB}, 0.0, True, False), Holder("on0", {"0": 8 * GIB}, 1.0, True, False)]
    budget = Budget(None, {"0": 10 * GIB, "1": 10 * GIB})
    assert make_room({"0": 4 * GIB}, gpu, budget).victims == ("on0",)  # not the older one on GPU 1


def test_a_model_bigger_than_the_budget_loads_alone_rather_than_never() -> None:
    budget = Budget(None, {CPU: 4 * GIB})
    assert make_room({CPU: 9 * GIB}, [], budget) == Room(())
    assert make_room({CPU: 9 * GIB}, [holder("a"), holder("b")], budget).victims == ("a", "b")


def model_dir(tmp_path: Path, layers: int = 2, weights: int = 1000) -> Path:
    config = {
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "max_position_embeddings": 128,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * weights)
    (tmp_path / "extra.bin").write_bytes(b"\0" * 99)  # not counted: the safetensors are the weights
    return tmp_path


def test_the_estimate_counts_weights_kv_and_each_ranks_own_memory(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    assert weights_bytes(str(directory)) == 1000 and weights_bytes("org/hub-model") == 0
    per_token = kv_bytes_per_token(json.loads((directory / "config.json").read_text()))
    assert per_token == 2 * 2 * 2 * 16 * 2  # K and V, layers, kv heads, head dim, 2 bytes
    config = build_model_config({"option.model_id": str(directory)}, environ={})
    one = 1000 + per_token * 128 + RANK_OVERHEAD_CPU
    assert estimate(config, 1, [], {}) == {CPU: one}
    assert estimate(config, 2, [], {}) == {CPU: 2 * one}  # every CPU worker holds all of it
    tp2 = build_model_config(
        {"option.model_id": str(directory), "option.tensor_parallel_degree": "2"}, environ={}
    )
    on_gpus = estimate(tp2, 1, ["0", "1"], {"0": 80 * GIB, "1": 80 * GIB})
    assert on_gpus["0"] == on_gpus["1"] and on_gpus["0"] < 1 * GIB  # half each, plus a CUDA context


def test_vllm_on_gpu_holds_its_utilization_of_each_gpu(tmp_path: Path) -> None:
    config = build_model_config(
        {"option.model_id": str(model_dir(tmp_path)), "option.gpu_memory_utilization": "0.5"}, environ={}
    )
    config.backend = "vllm"
    assert estimate(config, 1, ["3"], {"3": 80 * GIB}) == {"3": 40 * GIB}


@pytest.mark.parametrize(
    ("backend", "options", "on_gpu", "warm"),
    [
        ("vllm", {"enable_sleep_mode": "true"}, True, True),
        ("vllm", {"enable_sleep_mode": "true"}, False, False),  # vLLM refuses sleep mode on CPU
        ("vllm", {}, True, False),  # not enabled: the engine was built without it
        ("hf", {"enable_sleep_mode": "true"}, True, False),  # no sleep mode in that engine
    ],
)
def test_the_warm_tier_is_vllms_sleep_mode_on_gpu_only(
    backend: str, options: dict[str, str], on_gpu: bool, warm: bool
) -> None:
    config = build_model_config(
        {"option.model_id": "m", **{f"option.{k}": v for k, v in options.items()}}, environ={}
    )
    config.backend = backend
    assert warm_tier(config, on_gpu) is warm
    assert eviction(config, on_gpu, asleep=False) == ("sleep" if warm else "stop")
    assert eviction(config, on_gpu, asleep=True) == "stop"  # evicted again: all the way
