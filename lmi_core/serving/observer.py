"""What a model's pool and the server's residency report, for metrics: one typed method per event.

Invariant: ``WorkerPool`` tells its ``PoolObserver`` of every event below, with its model's name, on
the event loop, and ``ModelServer`` of every load and unload; an observer's methods never await and
never raise (they run inside dispatch and residency transitions).
``http.metrics.Metrics`` implements the protocol, and ``ModelServer(observe=...)`` hands it to
every pool it creates.
"""

from __future__ import annotations

from typing import Literal, Protocol

from lmi_core.serving.routing import Reason

# How a tenant's generation ended: it finished, a budget of its tenant refused it (429), it failed,
# or its client stopped listening.
TenantOutcome = Literal["served", "rejected", "error", "cancelled"]
# Why a model was unloaded: idle past its option.idle_timeout, evicted for another's load, its last
# request's keep_alive ran out, or the management API unregistered it.
UnloadReason = Literal["idle", "evicted", "keep_alive", "api"]
# How: "cold" is a full load (workers start) or unload (workers stop); "warm" a wake-up from, or a
# going to, sleep (vLLM's sleep mode: the workers stay).
Tier = Literal["cold", "warm"]


class PoolObserver(Protocol):
    def queue_time(self, model: str, seconds: float) -> None: ...  # arrival until a worker took it

    def worker_restart(self, model: str) -> None: ...  # a failed worker starts again

    def migration(self, model: str) -> None: ...  # a request moves to another worker mid-request

    def heartbeat(self, model: str, seconds: float) -> None: ...  # one rank's ping round trip

    def routed(self, model: str, reason: Reason) -> None: ...  # a dispatch, and why that worker

    # A tenant's requests waiting for a worker went up or down by ``change`` (``tenant``: its label).
    def tenant_queued(self, model: str, tenant: str, change: int) -> None: ...

    # One of a tenant's generations ended: how, and the tokens it was served.
    def tenant_finished(
        self, model: str, tenant: str, outcome: TenantOutcome, prompt_tokens: int, generated_tokens: int
    ) -> None: ...

    def model_load(self, model: str, tier: Tier, seconds: float) -> None: ...  # a load finished

    def model_unload(self, model: str, reason: UnloadReason, tier: Tier) -> None: ...  # an unload finished


class NoObserver:
    """A pool observer that records nothing (a server without metrics)."""

    def queue_time(self, model: str, seconds: float) -> None:
        pass

    def worker_restart(self, model: str) -> None:
        pass

    def migration(self, model: str) -> None:
        pass

    def heartbeat(self, model: str, seconds: float) -> None:
        pass

    def routed(self, model: str, reason: Reason) -> None:
        pass

    def tenant_queued(self, model: str, tenant: str, change: int) -> None:
        pass

    def tenant_finished(
        self, model: str, tenant: str, outcome: TenantOutcome, prompt_tokens: int, generated_tokens: int
    ) -> None:
        pass

    def model_load(self, model: str, tier: Tier, seconds: float) -> None:
        pass

    def model_unload(self, model: str, reason: UnloadReason, tier: Tier) -> None:
        pass
