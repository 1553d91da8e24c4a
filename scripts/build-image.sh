#!/usr/bin/env bash
# Build lmi-core's container image with buildah: no daemon, no registry needed.
#
# Usage: scripts/build-image.sh [FLAVOUR [TAG]]     FLAVOUR cpu (default) or cuda; see Dockerfile
#
# The base is BASE when set (any image reference buildah can pull, e.g. debian:bookworm-slim or
# nvidia/cuda:12.8.1-runtime-ubuntu24.04); without it, Debian bookworm made here with debootstrap
# from the host's Debian mirror (made once, then reused as localhost/debian-bookworm-minbase), which
# is how CI builds with no image registry in reach. The host's CA bundle (PIP_CERT) and wheel folder
# (PIP_FIND_LINKS: the CPU build of torch) are mounted read-only for the build's pip and stay out of
# the image. Measured on the shared 2-core machine: debootstrap 25 s to 3 min, the build 5-11 min,
# the CPU image 1.5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:-cpu}
tag=${2:-localhost/lmi-core:0.1.0-${flavour}}
buildah=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")

base=${BASE:-}
if [[ -z ${base} ]]; then
    base=localhost/debian-bookworm-minbase
    if ! "${buildah[@]}" inspect --type image "${base}" >/dev/null 2>&1; then
        mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        rootfs=$(mktemp -d)
        trap 'rm -rf "${rootfs}"' EXIT
        debootstrap --variant=minbase bookworm "${rootfs}" "${mirror:-http://deb.debian.org/debian}" >/dev/null
        container=$("${buildah[@]}" from scratch)
        cp -a "${rootfs}/." "$("${buildah[@]}" mount "${container}")/"
        "${buildah[@]}" umount "${container}" >/dev/null
        "${buildah[@]}" commit -q "${container}" "${base}" >/dev/null
        "${buildah[@]}" rm "${container}" >/dev/null
        echo "base image ${base} made with debootstrap"
    fi
fi

mounts=()
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[[ -f ${ca} ]] && mounts+=(--volume "${ca}:/run/host/ca.crt:ro")
[[ -n ${PIP_FIND_LINKS:-} && -d ${PIP_FIND_LINKS} ]] && mounts+=(--volume "${PIP_FIND_LINKS}:/run/host/wheels:ro")

start=${SECONDS}
"${buildah[@]}" bud --isolation chroot --build-arg "BASE=${base}" --build-arg "FLAVOUR=${flavour}" \
    "${mounts[@]}" --tag "${tag}" .
echo "built ${tag} in $((SECONDS - start)) s: $("${buildah[@]}" images --format '{{.Size}}' "${tag}")"
