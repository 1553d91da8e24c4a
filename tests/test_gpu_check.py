"""The GPU check script stays runnable: its CPU dry run passes, and its NVML reading is right.

``scripts/gpu-check.sh --cpu`` runs every check of the GPU run on CPU (real servers, real mpirun);
the release-before-reload verdict, which only a GPU run reaches, is tested on recorded samples.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3


@pytest.fixture(scope="module")
def driver() -> ModuleType:
    """scripts/gpu_check.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(600)
def test_cpu_dry_run_passes_every_check_it_can_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--cpu", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=560,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    rows = re.findall(r"^\| (.+?) \| (PASS|FAIL|SKIP) \| (.*) \|$", summary, flags=re.MULTILINE)
    results = {check: result for check, result, _ in rows}
    assert "FAIL" not in results.values(), summary
    # What the dry run really runs on CPU; only NVML and the GPU-count cases are SKIP.
    for check in (
        "greedy == transformers.generate",
        "throughput c=1",
        "throughput c=32",
        "continuous batching",
        "SIGKILL mid-stream",
        "two workers, one device",
        "residency: evict under a memory budget",
        "image input (HF, tiny LLaVA)",
        "MPI mode tp=2 (gloo)",
        "start-up refusal (CPU stand-in)",
    ):
        assert results.get(check) == "PASS", summary
    assert re.search(r"gpu-check \(CPU dry run\): 12 PASS, 5 SKIP, 0 FAIL", summary), summary
    assert (tmp_path / "logs.tar.gz").stat().st_size > 0


def sample(driver: ModuleType, t: float, used_gib: float, **processes: float) -> object:
    return driver.Sample(t, int(used_gib * GIB), {int(p[1:]): int(g * GIB) for p, g in processes.items()})


def test_release_before_reload_is_read_from_nvml_processes(driver: ModuleType) -> None:
    # p10: this process (the reference model); p20 the killed worker; p30 its replacement.
    samples = [
        sample(driver, 0.0, 5.0, p10=2.0, p20=3.0),
        sample(driver, 1.1, 2.0, p10=2.0),
        sample(driver, 9.0, 2.5, p10=2.0, p30=0.5),
    ]
    verdict = driver.released_before_reload(samples, 1.0, 20, baseline=0)
    assert verdict.startswith("3.00 GiB freed 0.10 s after the kill")
    assert "first NVML process entry of the new worker at 8.00 s" in verdict


def test_a_replacement_on_the_gpu_before_the_release_fails(driver: ModuleType) -> None:
    samples = [
        sample(driver, 0.0, 5.0, p10=2.0, p20=3.0),
        sample(driver, 1.5, 5.5, p10=2.0, p20=3.0, p30=0.5),
        sample(driver, 2.0, 2.2, p10=2.0, p30=0.5),
    ]
    with pytest.raises(AssertionError, match=re.escape("before the old worker's 3.00 GiB were freed")):
        driver.released_before_reload(samples, 1.0, 20, baseline=0)


def test_memory_never_freed_fails(driver: ModuleType) -> None:
    samples = [sample(driver, 0.0, 5.0, p20=3.0), sample(driver, 2.0, 4.0, p20=2.0)]
    with pytest.raises(AssertionError, match="never freed"):
        driver.released_before_reload(samples, 1.0, 20, baseline=0)


def test_without_process_lists_the_device_total_decides(driver: ModuleType) -> None:
    # NVML lists no processes (some virtual machines): the share is the use above the baseline.
    samples = [sample(driver, 0.0, 5.0), sample(driver, 1.2, 2.1), sample(driver, 6.0, 4.0)]
    verdict = driver.released_before_reload(samples, 1.0, 20, baseline=2 * GIB)
    assert verdict.startswith("3.00 GiB freed 0.20 s after the kill")
    assert "device use rising again (NVML lists no processes here) at 5.00 s" in verdict
