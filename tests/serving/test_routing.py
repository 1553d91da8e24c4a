"""The prefix index and the router on synthetic traces (pure: no pool, no processes, deterministic).

A trace is a list of (prompt, session) arrivals; ``simulate`` routes them over two workers, each
request staying in flight for ``hold`` later arrivals (``None``: forever, a flood that never drains).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import pytest

from lmi_core.config import ModelConfig, build_model_config
from lmi_core.engine import GenerationRequest, LoraAdapter
from lmi_core.errors import ConfigError
from lmi_core.serving.prefix_index import PrefixIndex, block_hashes, render_messages
from lmi_core.serving.routing import (
    ADAPTER_MEMORY,
    Decision,
    RequestContext,
    Router,
    RoutingPolicy,
    WorkerLoad,
    choose,
    routing_key,
    slot_worker,
)

CAPACITY = 32


def policy(**settings: Any) -> RoutingPolicy:
    """The model defaults, with ``routing_<name>=value`` overrides given as ``name=value``."""
    mode = settings.pop("mode", "prefix_aware")
    fields = {f"routing_{k}": v for k, v in settings.items()}
    return RoutingPolicy.from_config(ModelConfig(model_id="m", routing=mode, **fields))


def family(name: str, question: int) -> str:
    """Tenant ``name``'s long shared context (8 blocks) and a short distinct question."""
    return f"[{name}] " + f"{name} context sentence. " * 40 + f"Question {question}?"


def simulate(
    router: Router,
    trace: Sequence[tuple[str, str | None]],
    hold: int | None = 1,
    workers: int = 2,
) -> list[Decision]:
    in_flight = dict.fromkeys(range(workers), 0)
    running: list[tuple[int, int]] = []  # (ends at arrival, worker)
    decisions = []
    for arrival, (prompt, session) in enumerate(trace):
        for ends, worker in [r for r in running if r[0] <= arrival]:
            running.remove((ends, worker))
            in_flight[worker] -= 1
        query = router.query(GenerationRequest("r", prompt=prompt), RequestContext(session))
        decision = router.route(query, [WorkerLoad(w, n, CAPACITY) for w, n in in_flight.items()])
        in_flight[decision.worker_id] += 1
        if hold is not None:
            running.append((arrival + hold, decision.worker_id))
        decisions.append(decision)
    return decisions


def workers_by_family(
    trace: Sequence[tuple[str, str | None]], decisions: Sequence[Decision]
) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for (prompt, _), decision in zip(trace, decisions, strict=True):
        out.setdefault(prompt.split("]")[0], set()).add(decision.worker_id)
    return out


# -- the index -----------------------------------------------------------------------------------


def test_block_hashes_chain_whole_blocks() -> None:
    a, b = "x" * 64 + "y" * 64 + "tail", "x" * 64 + "z" * 64
    assert len(block_hashes(a, 64)) == 2  # the partial "tail" block is not a block
    assert block_hashes(a, 64)[0] == block_hashes(b, 64)[0]
    assert block_hashes(a, 64)[1] != block_hashes(b, 64)[1]
    # Same second block after a different first one: a different prefix, so a different hash.
    assert block_hashes("w" * 64 + "y" * 64, 64)[1] != block_hashes(a, 64)[1]
    # Token ids: blocks of 64 // 4 = 16 ids.
    assert len(block_hashes(list(range(40)), 64)) == 2
    assert block_hashes(list(range(32)), 64) == block_hashes(list(range(40)), 64)


def test_chat_rendering_is_prefix_preserving_and_unambiguous() -> None:
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert render_messages(turn2).startswith(render_messages(turn1))
    merged = [{"role": "system", "content": "be brief" + "user" + "hi"}]
    assert render_messages(merged) != render_messages(turn1)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert "hi" in render_messages(parts)


def test_lru_evicts_the_tails_of_prefixes_first() -> None:
    index = PrefixIndex(budget=4)
    hashes = block_hashes("abcd" * 16 * 10, 16)  # 10 blocks
    index.record(0, hashes)
    assert index.cached(0) == 4
    assert index.matched(0, hashes) == 4  # the head survives: the match stays contiguous
    index.record(0, hashes, budget=8)  # an engine that reports a bigger KV cache
    assert index.matched(0, hashes) == 8
    index.forget(0)
    assert index.matched(0, hashes) == 0 and index.cached(0) == 0


# -- the router ----------------------------------------------------------------------------------


def test_prompt_families_stick_to_one_worker_each_and_both_workers_are_used() -> None:
    names = ["alpha", "beta", "gamma", "delta"]
    trace = [(family(n, q), None) for q in range(6) for n in names]  # interleaved tenants
    for hold in (1, 3):  # sequential traffic, and 3 requests in flight at a time
        decisions = simulate(Router(policy()), trace, hold)
        by_family = workers_by_family(trace, decisions)
        assert all(len(w) == 1 for w in by_family.values()), by_family
        assert set().union(*by_family.values()) == {0, 1}
        assert [d.reason for d in decisions[len(names) :]] == ["prefix"] * (len(trace) - len(names))
    # Cache-blind: at 3 in flight the families spread over both workers.
    decisions = simulate(Router(policy(mode="least_loaded")), trace, 3)
    assert any(len(w) == 2 for w in workers_by_family(trace, decisions).values())
    assert {d.reason for d in decisions} == {"load"}


def test_token_id_prompts_are_keyed_by_their_ids_and_their_families_stick() -> None:
    """lm-eval's default and ``/v1/completions`` with ``prompt: [ids]``: the key was read from a field
    that does not exist (``prompt_token_ids``), so it was empty and such prompts never matched."""
    shared = {name: list(range(start, start + 200)) for name, start in (("A", 0), ("B", 300))}
    request = GenerationRequest("r", prompt_ids=[*shared["A"], 7])
    assert routing_key(request) == [*shared["A"], 7]
    router = Router(policy())
    served: dict[str, set[int]] = {"A": set(), "B": set()}
    for question in range(3):
        for name, ids in shared.items():
            query = router.query(GenerationRequest("r", prompt_ids=[*ids, question]), None)
            assert query.hashes  # 200 ids: 12 blocks of 16
            served[name].add(router.route(query, [WorkerLoad(w, 0, CAPACITY) for w in (0, 1)]).worker_id)
    assert served == {"A": {0}, "B": {1}}


def test_a_flood_of_one_prefix_spreads_once_the_imbalance_threshold_is_passed() -> None:
    router = Router(policy(imbalance_abs=8, imbalance_rel=1.5))
    trace = [(family("hot", q), None) for q in range(30)]
    decisions = simulate(router, trace, hold=None)  # nothing finishes
    workers = [d.worker_id for d in decisions]
    assert workers[:9] == [0] * 9  # 9 - 0 > 8 in flight: the 10th goes elsewhere
    assert decisions[9] == Decision(1, "load", 0)
    assert workers.count(1) >= 10  # and the hot prefix now lives on both
    loads = [workers[: i + 1].count(0) - workers[: i + 1].count(1) for i in range(len(workers))]
    assert max(abs(gap) for gap in loads) <= 9


def test_the_load_term_and_kv_use_break_ties_between_equal_matches() -> None:
    p, index = policy(), PrefixIndex(100)
    hashes = block_hashes(family("t", 0), 64)
    index.record(0, hashes)
    index.record(1, hashes)
    both = [WorkerLoad(0, 3, CAPACITY), WorkerLoad(1, 2, CAPACITY)]
    assert choose(p, index, both, hashes).worker_id == 1
    kv = [WorkerLoad(0, 2, CAPACITY, kv_usage=0.9), WorkerLoad(1, 2, CAPACITY, kv_usage=0.1)]
    assert choose(p, index, kv, hashes).worker_id == 1
    # A longer match outweighs a slightly higher load.
    index.forget(1)
    index.record(1, hashes[:2])
    assert choose(p, index, both, hashes) == Decision(0, "prefix", len(hashes))


def test_a_new_prefix_goes_to_the_least_loaded_worker_then_the_one_with_fewest_blocks() -> None:
    p, index = policy(), PrefixIndex(100)
    index.record(0, block_hashes(family("old", 0), 64))
    new = block_hashes(family("new", 0), 64)
    assert choose(p, index, [WorkerLoad(0, 0, CAPACITY), WorkerLoad(1, 0, CAPACITY)], new).worker_id == 1
    assert choose(p, index, [WorkerLoad(0, 0, CAPACITY), WorkerLoad(1, 1, CAPACITY)], new).worker_id == 0


def test_a_restarted_worker_is_forgotten_and_its_sessions_move() -> None:
    router = Router(policy())
    trace = [(family("a", 0), "s"), (family("b", 0), None), (family("a", 1), "s")]
    assert [d.worker_id for d in simulate(router, trace)] == [0, 1, 0]
    router.forget(0)
    assert router.index.cached(0) == 0
    (decision,) = simulate(router, [(family("a", 2), "s")])
    assert (decision.matched, decision.moved_from) == (0, 0)  # a's blocks and the session are gone
    (decision,) = simulate(router, [(family("a", 3), "s")])
    assert decision == Decision(0, "session", decision.matched)  # settled again: no move


def test_a_session_sticks_to_its_worker_and_moves_when_it_is_gone_or_overloaded() -> None:
    router = Router(policy(imbalance_abs=2, imbalance_rel=1.5))
    context = RequestContext("s")

    def route(prompt: str, loads: dict[int, int]) -> Decision:
        query = router.query(GenerationRequest("r", prompt=prompt), context)
        return router.route(query, [WorkerLoad(w, n, CAPACITY) for w, n in loads.items()])

    assert route("first", {0: 1, 1: 0}).worker_id == 1
    router.index.record(0, block_hashes(family("x", 0), 64))
    # Its worker wins over a worker holding the prompt's prefix, at a small load gap.
    assert route(family("x", 1), {0: 0, 1: 2}) == Decision(1, "session", 0)
    assert route("next", {0: 0}) == Decision(0, "load", 0, moved_from=1)  # worker 1 is not a candidate
    assert route("again", {0: 5, 1: 0}) == Decision(1, "load", 0, moved_from=0)  # 5 - 0 > 2: overloaded
    assert route("stays", {0: 0, 1: 1}).reason == "session"
    assert router.decisions == {"prefix": 0, "session": 2, "load": 3, "adapter": 0, "port": 0}


def test_a_worker_port_names_its_worker_over_the_session_unless_it_is_overloaded() -> None:
    router = Router(policy(imbalance_abs=2, imbalance_rel=1.5))
    context = RequestContext("s")

    def route(loads: dict[int, int], worker: int | None) -> Decision:
        query = dataclasses.replace(router.query(GenerationRequest("r", prompt="p"), context), worker=worker)
        return router.route(query, [WorkerLoad(w, n, CAPACITY) for w, n in loads.items()])

    assert route({0: 0, 1: 1}, None) == Decision(0, "load", 0)  # the session is on worker 0
    assert route({0: 0, 1: 1}, 1) == Decision(1, "port", 0)  # the picker chose worker 1: it wins
    assert route({0: 0, 1: 1}, None) == Decision(1, "session", 0)  # and the session follows it there
    assert route({0: 0, 1: 5}, 1) == Decision(0, "load", 0)  # 5 - 0 > 2: overloaded, as a session's
    assert router.decisions["port"] == 1


def test_a_port_slot_names_the_slot_th_serving_worker_by_id() -> None:
    assert [slot_worker([5, 2, 9], slot) for slot in range(4)] == [2, 5, 9, None]


def test_routing_options_are_validated() -> None:
    config = build_model_config(
        {"option.model_id": "m", "option.routing": "least_loaded", "option.routing_block_chars": "128"},
        environ={},
    )
    assert (config.routing, config.routing_block_chars, config.options) == ("least_loaded", 128, {})
    with pytest.raises(ConfigError, match=r"option\.routing"):
        build_model_config({"option.model_id": "m", "option.routing": "random"}, environ={})
    with pytest.raises(ConfigError, match=r"option\.routing_imbalance_rel"):
        build_model_config({"option.model_id": "m", "option.routing_imbalance_rel": "0.5"}, environ={})


# -- LoRA adapters ---------------------------------------------------------------------------------


def holding(worker_id: int, in_flight: int, *adapters: str) -> WorkerLoad:
    return WorkerLoad(worker_id, in_flight, CAPACITY, adapters=frozenset(adapters))


@pytest.mark.parametrize("mode", ["prefix_aware", "least_loaded"])
def test_a_request_goes_to_a_worker_holding_its_adapter_load_permitting(mode: str) -> None:
    rules = policy(mode=mode, imbalance_abs=2)
    index = PrefixIndex(100)
    workers = [holding(0, 0), holding(1, 1, "a"), holding(2, 2, "b")]
    assert choose(rules, index, workers, (), adapter="a") == Decision(1, "adapter")
    assert choose(rules, index, workers, (), adapter="b") == Decision(2, "adapter")
    assert choose(rules, index, workers, ()) == Decision(0, "load")  # the base model: any worker
    assert choose(rules, index, workers, (), adapter="c") == Decision(0, "load")  # nobody holds it
    # The holder is 3 busier than the idlest (> imbalance_abs=2, and > 1.5x): the idlest loads it.
    busy = [holding(0, 0), holding(1, 3, "a")]
    assert choose(rules, index, busy, (), adapter="a") == Decision(0, "load")


def test_among_holders_the_prefix_still_counts_and_a_session_still_sticks() -> None:
    rules, index = policy(), PrefixIndex(100)
    hashes = block_hashes(family("t", 1), rules.block_chars)
    index.record(2, hashes)
    workers = [holding(0, 0), holding(1, 0, "a"), holding(2, 0, "a")]
    assert choose(rules, index, workers, hashes, adapter="a").worker_id == 2  # holder with the prefix
    assert choose(rules, index, workers, hashes, pinned=0, adapter="a") == Decision(0, "session")


def test_the_router_remembers_where_it_sent_an_adapter_until_the_heartbeat_can_say() -> None:
    router = Router(policy(mode="least_loaded"))
    request = GenerationRequest("r", prompt="x", adapter=LoraAdapter("a", "/a"))
    first = router.route(
        router.query(request, None), [WorkerLoad(0, 0, CAPACITY), WorkerLoad(1, 0, CAPACITY)]
    )
    assert router.recent_adapters(first.worker_id) == {"a"}
    assert router.recent_adapters(first.worker_id, now=time.monotonic() + ADAPTER_MEMORY + 1) == set()
    router.sent_adapter(1, "b")
    router.sent_adapter(1, "c")
    router.dropped_adapter(1, "c")  # told to unload it
    assert router.recent_adapters(1) == {"b"}
    router.forget(1)  # restarted: its engine holds nothing
    assert router.recent_adapters(1) == set()
