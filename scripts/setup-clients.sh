#!/usr/bin/env bash
# Create the virtual environment of the real clients the `clients` test stage drives against lmi-core.
#
# Usage: scripts/setup-clients.sh VENV_DIR    (measured: 256 s on 2 shared cores, 2.2 GB, torch most of it,
#        then the agent CLIs from npm: 36 s, 810 MB)
#
# Why a separate venv: these are the clients' own releases from PyPI, with their own dependency pins
# (lm-eval pulls torch, datasets and evaluate; litellm its openai), run unchanged as a user would.
# Nothing of lmi-core is installed here: the tests reach the server over HTTP only.
set -euo pipefail

VENV_DIR=$(realpath -m "${1:?usage: scripts/setup-clients.sh VENV_DIR}")
PYTHON=${PYTHON:-python3.11}
cd "$(dirname "$0")/.."  # constraints.txt

start=$(date +%s)
"$PYTHON" -m venv "$VENV_DIR"
# One command on purpose: pinning torch here (constraints.txt: the CPU wheel on local disk) keeps pip
# from resolving lm-eval's torch to a multi-GB CUDA build. Versions are the ones the tests were written
# against (lm-eval's local-completions request shapes, guidellm's CLI, litellm's openai/ route).
"$VENV_DIR/bin/python" -m pip install -q -c constraints.txt torch==2.13.0 \
    'lm-eval==0.4.13' 'guidellm==0.8.1' 'litellm==1.110.2' 'langchain-openai==1.7.4'
# The agent CLIs from the npm registry (Node.js 20 and npm come with the machine), into the same ignored
# folder: Codex CLI (Responses API) and Claude Code (Messages API). Their native binaries come inside the
# registry packages (about 810 MB together; 36 s here). tests/clients/test_agents.py runs them.
# npm's download cache is a temporary folder: the tarballs would stay in ~/.npm (the CLIs' native
# binaries, about as large as the install) and nothing reads them again.
npm_cache=$(mktemp -d)
npm install --prefix "$VENV_DIR/npm" --cache "$npm_cache" --no-audit --no-fund --no-update-notifier \
    --loglevel=error @openai/codex@0.171.0 @anthropic-ai/claude-code@2.1.332
rm -rf "$npm_cache"
echo "clients venv ready in $(($(date +%s) - start)) s: $(du -sh "$VENV_DIR" | cut -f1)"
