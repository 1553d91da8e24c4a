"""The README's quick start, run verbatim, so that it cannot rot: ``make serve`` as its first block
says, then every command of its second block against it on port 8080 (its `curl -d` once got 415).

The commands run in a private network namespace (``unshare -rn``) where the system allows one, so
that a server someone already runs on 8080 neither fails this test nor answers it. Each command must
exit 0 with curl failing on an HTTP error (``--fail-with-body``, added by a shell function: the
command's text is the README's) and print something that is not an error.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The first block's commands this test does not run, each with the reason.
NOT_RUN = {"make test": "the command running this test"}
SERVE = "make serve"


def quick_start() -> list[list[str]]:
    """The commands of each ```bash block of the README's "Quick start" section (a line ending in
    a backslash continues on the next; comments dropped)."""
    section = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = block.replace("\\\n", " ")
        commands = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
        blocks.append([c for c in commands if c and not c.startswith("#")])
    return blocks


def isolated() -> list[str]:
    """The prefix that runs a command in a network namespace of its own, if this system allows one."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    return ["unshare", "-rn"] if probe.returncode == 0 else []


def script(commands: list[str], log: Path, outputs: Path) -> str:
    """Serve as the README says, wait for it, run ``commands`` one by one (each output in its own
    file), then stop the server's whole process group."""
    lines = [
        "ip link set lo up 2>/dev/null || true",  # a fresh namespace's loopback starts down
        f"cd {ROOT}",
        "set -m",  # the server gets a process group of its own: stopped whole at the end
        f"{SERVE} > {log} 2>&1 &",
        "server=$!",
        "trap 'kill -TERM -- -$server 2>/dev/null; wait $server' EXIT",
        "for _ in $(seq 600); do command curl -sf localhost:8080/ping >/dev/null && break; sleep 0.5; done",
        'curl() { command curl --fail-with-body "$@"; }',
    ]
    for index, command in enumerate(commands):
        lines.append(f"{command} > {outputs}/{index} || {{ echo 'failed: {index}'; exit 1; }}")
    return "\n".join(lines) + "\n"


def test_the_quick_start_runs_verbatim(tmp_path: Path) -> None:
    first, second = quick_start()[:2]
    assert set(first) == {SERVE, *NOT_RUN}, first  # a new command in the first block needs a decision here
    assert second and all(c.startswith("curl ") for c in second), second
    prefix = isolated()
    if not prefix:
        import socket

        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", 8080)) == 0:
                pytest.skip("port 8080 is taken and this system has no private network namespace")
    outputs = tmp_path / "out"
    outputs.mkdir()
    log = tmp_path / "serve.log"
    run = subprocess.run(
        [*prefix, "bash", "-c", script(second, log, outputs)], capture_output=True, text=True, timeout=600
    )
    if run.returncode != 0:
        answers = "\n".join(f"{p.name}: {p.read_text()[:500]}" for p in sorted(outputs.iterdir()))
        server_log = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        pytest.fail(f"{run.stdout}\n{run.stderr}\n{answers}\n{server_log}")
    for index, command in enumerate(second):
        text = (outputs / str(index)).read_text()
        assert text.strip(), command
        for line in text.splitlines():  # JSON answers, or a stream of JSON lines: none an error
            if line.startswith(("{", "[")):
                assert "error" not in json.loads(line), (command, line)
