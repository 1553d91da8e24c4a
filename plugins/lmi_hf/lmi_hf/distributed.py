"""MPI mode of the HF backend: tensor parallelism across the ranks of one ``mpirun`` job.

Every rank joins one ``torch.distributed`` group (gloo on CPU, nccl on GPU; rendezvous through
``MASTER_ADDR``/``MASTER_PORT``, ranks from Open MPI's environment) and loads its shard of the model
with ``tp_plan="auto"``. All ranks must run the same batches in the same order, or their collectives
pair up wrongly and hang: rank 0 decides each step (``StepPlan``) and ``MpiCoordinator`` broadcasts it.

The plan travels as msgpack bytes (no pickle) in one fixed-size tensor over a dedicated gloo group.
Per step on 2 CPU ranks (``benchmarks/bench_modes.py``): this 0.38 ms, ``broadcast_object_list``
0.7 ms, mpi4py ``bcast`` 0.01 ms. mpi4py is faster, but an idle follower inside ``MPI_Bcast``
busy-polls a whole core for as long as the server has no work, where a gloo follower sleeps in the
kernel; and each step's TP all-reduces over gloo cost ~1 ms apiece anyway.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import msgpack
import torch
import torch.distributed as dist

from lmi_core.errors import ConfigError
from lmi_hf.engine import HFEngine
from lmi_hf.step import StepPlan
from lmi_hf.vision import load_generator

if TYPE_CHECKING:
    from lmi_core.engine import WorkerContext

logger = logging.getLogger(__name__)

# One broadcast carries plans up to this size (a full batch of admissions is ~2 KiB); a larger plan
# sends the rest in a second broadcast.
FRAME_BYTES = 4096
HEADER_BYTES = 4
# Followers wait in the plan broadcast for as long as the server sends no work: gloo's default
# 30-minute collective timeout would kill an idle job.
IDLE_TIMEOUT = datetime.timedelta(days=365)


def encode_plan(plan: StepPlan) -> bytes:
    fields = [plan.admit, plan.cancel, plan.stop, plan.unload, plan.evict, plan.load, plan.fail]
    body: bytes = msgpack.packb(fields, use_bin_type=True)
    return body


def decode_plan(body: bytes) -> StepPlan:
    admit, cancel, stop, unload, evict, load, fail = msgpack.unpackb(body, raw=False)
    return StepPlan(
        admit=[(rid, seed) for rid, seed in admit],
        cancel=list(cancel),
        stop=bool(stop),
        unload=list(unload),
        evict=list(evict),
        load=[(name, path) for name, path in load],
        fail=[(rid, message) for rid, message in fail],
    )


class MpiCoordinator:
    """Rank 0 makes each step's plan; ``exchange`` hands every rank rank 0's plan."""

    def __init__(self, rank: int, group: Any) -> None:
        self.rank = rank
        self.group = group

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def exchange(self, plan: StepPlan) -> StepPlan:
        return self._send(plan) if self.leader else self._receive()

    def _send(self, plan: StepPlan) -> StepPlan:
        body = encode_plan(plan)
        data = len(body).to_bytes(HEADER_BYTES, "big") + body
        frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
        first = data[:FRAME_BYTES]
        frame[: len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        dist.broadcast(frame, src=0, group=self.group)
        if len(data) > FRAME_BYTES:
            rest = torch.frombuffer(bytearray(data[FRAME_BYTES:]), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
        return plan

    def _receive(self) -> StepPlan:
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        dist.broadcast(frame, src=0, group=self.group)
        data = frame.numpy().tobytes()
        end = HEADER_BYTES + int.from_bytes(data[:HEADER_BYTES], "big")
        if end > FRAME_BYTES:
            rest = torch.empty(end - FRAME_BYTES, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return decode_plan(data[HEADER_BYTES:end])


def check_gpus_per_rank(context: WorkerContext, local_size: int) -> None:
    """nccl runs one rank per GPU: ranks on this host beyond its visible GPUs cannot start.

    Two ranks on one GPU fail inside nccl's first collective ("Duplicate GPU detected"), after both
    have loaded torch; a rank whose ``LOCAL_RANK`` is past the GPU count fails in ``set_device``
    ("invalid device ordinal"). The server's allocator already refuses such a job
    (``plan_allocation``); this guards launchers that place ranks themselves, before the rendezvous.
    """
    count = torch.cuda.device_count()
    if local_size > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            "option.tensor_parallel_degree",
            context.tensor_parallel_degree,
            f"at most {count}: nccl runs one rank per GPU, and this host has {local_size} ranks of the job "
            f"but {count} visible GPU{'s' if count != 1 else ''} (CUDA_VISIBLE_DEVICES={visible!r})",
        )


def init_distributed(context: WorkerContext) -> Any:
    """Join the job's process group; return the CPU group that carries the step plans."""
    local_rank = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    # torch and transformers read these (transformers picks the GPU from LOCAL_RANK).
    os.environ.update(
        RANK=str(context.rank),
        WORLD_SIZE=str(context.world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"),
    )
    backend = "gloo"
    if context.device == "cuda" and torch.cuda.is_available():
        check_gpus_per_rank(context, int(os.environ["LOCAL_WORLD_SIZE"]))
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    started = time.monotonic()
    dist.init_process_group(backend, init_method="env://", rank=context.rank, world_size=context.world_size)
    group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    took = time.monotonic() - started
    logger.info(
        "rank %d of %d joined the %s group at %s in %.1f s",
        context.rank,
        context.world_size,
        backend,
        where,
        took,
    )
    return group


def load_distributed(context: WorkerContext) -> HFEngine:
    """Load this rank's shard of the model and an engine that follows rank 0's plans."""
    group = init_distributed(context)
    model, tokenizer, images = load_generator(context, tensor_parallel=True)
    return HFEngine(context, model, tokenizer, coordinator=MpiCoordinator(context.rank, group), images=images)
