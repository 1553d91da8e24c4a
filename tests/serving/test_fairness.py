"""The dispatch order (``serving.fairness``), pure: priority bands, weighted fair shares, FIFO."""

from __future__ import annotations

import pytest

from lmi_core.serving import fairness
from lmi_core.serving.fairness import OUTPUT_COST, FairQueue, Ledger, PlaceShares, reserved


def order(queue: FairQueue[str], now: float = 0.0) -> list[str]:
    """Take every entry in dispatch order."""
    taken = []
    while (entry := queue.peek(now)) is not None:
        taken.append(queue.take(entry, now))
    return taken


def test_lower_priority_values_go_first_whatever_the_tenant_and_its_service() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.charge("heavy", 1e6, 0.0)
    queue.push("a-low", "light", 1.0, band=5)
    queue.push("b-urgent", "heavy", 1.0, band=-1)
    queue.push("a-default", "light", 1.0, band=0)
    queue.push("b-default", "heavy", 1.0, band=0)
    assert order(queue) == ["b-urgent", "a-default", "b-default", "a-low"]


def test_within_a_band_the_tenant_with_the_least_weighted_service_goes_first_then_fifo() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.charge("a", 300.0, 0.0)
    queue.charge("b", 200.0, 0.0)
    for i in range(3):
        queue.push(f"a{i}", "a", 2.0)  # 300 / 2 = 150 < 200: a first
        queue.push(f"b{i}", "b", 1.0)
    # Each dispatch here costs nothing: a's requests all go before b's, each tenant's in arrival order.
    assert order(queue) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_a_dispatch_charges_its_cost_so_backlogged_tenants_alternate() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(3):
        queue.push(f"a{i}", "a", 1.0, cost=10.0)
    for i in range(3):
        queue.push(f"b{i}", "b", 1.0, cost=10.0)
    # Ties go to the tenant whose oldest waiting request came first.
    assert order(queue) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_one_at_a_time_tenant_overtakes_a_flooding_ones_backlog() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(24):
        queue.push(f"flood{i}", "a", 1.0, cost=8.0)
    for _ in range(8):  # the flood's first 8 run, and are charged
        entry = queue.peek(0.0)
        assert entry is not None
        queue.take(entry, 0.0)
    queue.push("interactive", "b", 1.0, cost=8.0)
    assert order(queue)[0] == "interactive"


def test_front_entries_go_before_every_band_in_the_order_they_came() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("urgent", "a", 1.0, band=-100)
    queue.push("moved-1", "b", 1.0, front=True)
    queue.push("moved-2", "a", 1.0, front=True)
    assert order(queue) == ["moved-1", "moved-2", "urgent"]


def test_remove_and_drain_charge_nothing_and_leave_no_trace() -> None:
    queue: FairQueue[str] = FairQueue()
    kept = queue.push("kept", "a", 1.0, cost=5.0)
    gone = queue.push("gone", "b", 1.0, band=3, cost=5.0)
    moved = queue.push("moved", "b", 1.0, front=True)
    assert queue.remove(gone) and queue.remove(moved)
    assert not queue.remove(gone)  # already out
    assert len(queue) == 1 and queue.peek(0.0) is kept
    queue.push("other", "c", 1.0, band=1, cost=5.0)
    assert sorted(queue.drain()) == ["kept", "other"]
    assert len(queue) == 0 and queue.peek(0.0) is None
    assert queue.ledger.service("a", 0.0) == queue.ledger.service("c", 0.0) == 0.0


def test_service_halves_every_half_life_and_a_correction_never_goes_below_zero() -> None:
    ledger = Ledger(half_life=60.0)
    ledger.charge("a", 100.0, 0.0)
    assert ledger.service("a", 60.0) == pytest.approx(50.0)
    assert ledger.service("a", 120.0) == pytest.approx(25.0)
    ledger.charge("a", -1000.0, 120.0)
    assert ledger.service("a", 120.0) == 0.0


def test_the_ledger_forgets_faded_tenants_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fairness, "MAX_TRACKED", 3)
    ledger = Ledger(half_life=1.0)
    ledger.charge("old", 4.0, 0.0)  # below one token after 3 half-lives
    ledger.charge("busy", 1000.0, 9.0)
    ledger.charge("new-1", 1.0, 10.0)
    ledger.charge("new-2", 1.0, 10.0)
    assert len(ledger) == 3 and ledger.service("old", 10.0) == 0.0  # forgotten: starts afresh


def simulate(
    weights: dict[str, float], seconds: float, slots: int, prompt: int, output: int
) -> dict[str, int]:
    """Tenants that keep ``slots`` requests each waiting, on ``slots`` places; each request is
    ``prompt`` tokens, then ``output`` tokens at one per 10 ms. Tokens served (prompt + output) per
    tenant over ``seconds``: a deterministic stand-in for a fixed-speed engine."""
    step = 0.01
    queue: FairQueue[str] = FairQueue()
    for tenant, weight in weights.items():
        for _ in range(slots):
            queue.push(tenant, tenant, weight, cost=prompt)
    running: list[tuple[str, int]] = []  # (tenant, tokens left)
    served = dict.fromkeys(weights, 0)
    now = 0.0
    while now < seconds:
        while len(running) < slots and (entry := queue.peek(now)) is not None:
            tenant = queue.take(entry, now)
            served[tenant] += prompt
            running.append((tenant, output))
            queue.push(tenant, tenant, weights[tenant], cost=prompt)  # the tenant's next request
        still = []
        for tenant, left in running:
            queue.charge(tenant, OUTPUT_COST, now)
            served[tenant] += 1
            if left > 1:
                still.append((tenant, left - 1))
        running = still
        now += step
    return served


def test_backlogged_tenants_are_served_tokens_in_proportion_to_their_weights_over_a_minute() -> None:
    served = simulate({"a": 2.0, "b": 1.0}, seconds=60.0, slots=8, prompt=32, output=64)
    assert served["a"] / served["b"] == pytest.approx(2.0, rel=0.10)
    served = simulate({"a": 1.0, "b": 1.0, "c": 1.0}, seconds=60.0, slots=8, prompt=32, output=64)
    assert max(served.values()) / min(served.values()) == pytest.approx(1.0, rel=0.10)


def test_a_tenant_at_its_share_leaves_the_reserved_places_to_the_other_active_tenants() -> None:
    shares = PlaceShares(recent=30.0)
    assert reserved(8) == 1 and reserved(32) == 2 and reserved(1) == 1
    shares.came("a", 1.0, 0.0)
    for _ in range(7):
        shares.took("a")
    assert shares.may_take("a", free=1, total=8, now=1.0)  # alone: it may fill every place
    shares.came("b", 1.0, 1.0)
    assert not shares.may_take("a", free=1, total=8, now=1.0)  # 7 held >= its share of 4
    assert shares.may_take("a", free=2, total=8, now=1.0)  # above the reserve: anyone
    assert shares.may_take("b", free=1, total=8, now=1.0)  # holds nothing: always below its share
    shares.took("b")
    shares.released("b", 2.0)
    assert not shares.may_take("a", free=1, total=8, now=31.0)  # b came within ``recent``
    assert shares.may_take("a", free=1, total=8, now=32.5)  # b gone for longer: a alone again


def test_weights_set_each_tenants_share_of_the_places() -> None:
    shares = PlaceShares()
    shares.came("a", 3.0, 0.0)
    shares.came("b", 1.0, 0.0)
    for _ in range(5):
        shares.took("a")
    assert shares.may_take("a", free=1, total=8, now=0.0)  # 5 < 8 x 3/4
    shares.took("a")
    assert not shares.may_take("a", free=1, total=8, now=0.0)  # 6 = its share


def test_the_share_map_forgets_tenants_that_hold_nothing_past_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fairness, "MAX_TRACKED", 10)
    shares = PlaceShares(recent=1.0)
    shares.came("held", 1.0, 0.0)
    shares.took("held")
    for i in range(50):
        shares.came(f"flow-{i}", 1.0, float(i))
    assert len(shares) <= 12
    shares.came("other", 1.0, 60.0)
    assert not shares.may_take("held", free=1, total=2, now=60.0)  # still known: 1 held of its share 1
