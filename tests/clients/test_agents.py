"""The agent CLIs against a real lmi-core: Codex CLI on the Responses API, Claude Code on the Messages API.

Both come from the npm registry (``scripts/setup-clients.sh`` puts them under ``<clients venv>/npm``)
and run unchanged, pointed only at 127.0.0.1, in a temporary HOME, with their telemetry and update
checks off. Each must complete a turn with no protocol error. Their prompts are long: Codex CLI
0.171's first request is 40 KB of JSON (about 14,500 tokens with the demo tokenizer, 21 tools),
Claude Code 2.1.332's 50 KB (about 12,300 prompt tokens; its tools are another 23,600 that the demo
template does not render). So the model is the demo model with a 32k context, built to answer
"hello world" to any prompt and stop (``build_demo_model(answer=...)``): a random model never stops
by itself, and Claude Code calls an answer cut at ``max_tokens`` an error. One server per backend is
shared by both CLIs (a prefill of 12k tokens takes about 5 s on the HF backend here).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients.test_clients import CLIENTS_VENV, run_client
from tests.conftest import ServerProcess
from tests.test_backend_parity import BACKENDS, Servers

pytestmark = [pytest.mark.clients, pytest.mark.slow, pytest.mark.timeout(900)]

ANSWER = "hello world"
CONTEXT = 32768
PROMPT = "say hi"


@pytest.fixture(scope="module")
def answer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmi_core.demo_model import build_demo_model

    path = tmp_path_factory.mktemp("models") / "answer"
    return build_demo_model(path, max_position_embeddings=CONTEXT, answer=ANSWER)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, answer_model: Path) -> Iterator[Servers]:
    properties = {
        "option.max_model_len": str(CONTEXT),
        # Both CLIs send tools with tool_choice auto: the model needs a tool-call parser.
        "option.enable_auto_tool_choice": "true",
        "option.tool_call_parser": "hermes",
    }
    pool = Servers(tmp_path_factory.mktemp("agents"), answer_model, properties)
    yield pool
    pool.close()


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, servers: Servers) -> ServerProcess:
    return servers.get(request.param)


def cli(name: str) -> Path:
    path = CLIENTS_VENV / "npm" / "node_modules" / ".bin" / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build the clients first (scripts/setup-clients.sh)")
    return path


def home(tmp_path: Path) -> dict[str, str]:
    """A fresh HOME, and an environment that reaches nothing but 127.0.0.1."""
    directory = tmp_path / "home"
    directory.mkdir()
    env = {"HOME": str(directory), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[proxy] = ""
    return env


def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


CODEX_CONFIG = """model = "demo"
model_provider = "lmi"
check_for_update_on_startup = false

[analytics]
enabled = false

[model_providers.lmi]
name = "lmi-core"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "LMI_API_KEY"
request_max_retries = 0
stream_max_retries = 0
"""


def test_codex_exec_completes_a_turn_on_the_responses_api(server: ServerProcess, tmp_path: Path) -> None:
    env = home(tmp_path)
    codex_home = Path(env["HOME"]) / ".codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(CODEX_CONFIG.format(url=server.url))
    env.update(CODEX_HOME=str(codex_home), LMI_API_KEY="unused")
    printed = run_client(
        [cli("codex"), "exec", "--skip-git-repo-check", PROMPT], workdir(tmp_path), env, stdin=""
    )
    assert printed.strip() == ANSWER  # exec prints the last answer alone on stdout


def test_claude_code_completes_a_turn_on_the_messages_api(server: ServerProcess, tmp_path: Path) -> None:
    env = home(tmp_path)
    env.update(
        ANTHROPIC_BASE_URL=server.url,
        ANTHROPIC_API_KEY="unused",
        ANTHROPIC_MODEL="demo",
        ANTHROPIC_SMALL_FAST_MODEL="demo",
        ANTHROPIC_DEFAULT_HAIKU_MODEL="demo",
        # Its default, 32,000, does not fit a 32k context with the prompt (a 400, as on vLLM).
        CLAUDE_CODE_MAX_OUTPUT_TOKENS="64",
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_ERROR_REPORTING="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    printed = run_client([cli("claude"), "-p", PROMPT], workdir(tmp_path), env, stdin="")
    assert printed.strip() == ANSWER
