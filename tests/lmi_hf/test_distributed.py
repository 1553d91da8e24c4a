"""MPI mode on GPU: a job with more ranks on a host than GPUs is a clear error before the rendezvous.

Only the GPU count is faked (``torch.cuda.is_available``/``device_count``): the CPU wheel of torch
has no CUDA, and ``scripts/gpu-check.sh`` runs the same guard against a real GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from lmi_core.engine import WorkerContext
from lmi_core.errors import ConfigError
from lmi_hf.distributed import check_gpus_per_rank, init_distributed


def gpu_context() -> WorkerContext:
    return WorkerContext(
        model_id="unused",
        model_dir=None,
        backend="hf",
        options={},
        mode="mpi",
        rank=1,
        world_size=2,
        tensor_parallel_degree=2,
        device="cuda",
    )


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # Rank 1 of a 2-rank job on one host, as Open MPI describes it; init_distributed exports the
    # torch names, so they are set here first for monkeypatch to restore.
    for name, value in {
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "CUDA_VISIBLE_DEVICES": "0",
        "RANK": "",
        "WORLD_SIZE": "",
        "LOCAL_RANK": "",
        "LOCAL_WORLD_SIZE": "",
    }.items():
        monkeypatch.setenv(name, value)


def test_two_ranks_on_one_gpu_fail_naming_tp_and_the_gpu_count(
    one_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rendezvous(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the rank reached the rendezvous")

    monkeypatch.setattr(dist, "init_process_group", rendezvous)
    with pytest.raises(ConfigError) as info:
        init_distributed(gpu_context())
    message = str(info.value)
    assert message.startswith("invalid configuration option.tensor_parallel_degree=2: expected at most 1")
    assert "2 ranks of the job but 1 visible GPU " in message
    assert "CUDA_VISIBLE_DEVICES='0'" in message


def test_one_rank_per_gpu_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus_per_rank(gpu_context(), local_size=2)
