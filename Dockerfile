# lmi-core's container images, one definition for both flavours (docs/deploy.md "Images"):
#
#   cpu   (default): the HF backend on CPU, from Debian bookworm; built and smoke-tested in CI
#   cuda  : the HF and vLLM backends and MPI mode (mpirun, sshd for multi-pod jobs) on a CUDA base
#
#   buildah bud --build-arg BASE=debian:bookworm-slim -t lmi-core:cpu .
#   buildah bud --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg FLAVOUR=cuda -t lmi-core:cuda .
#
# BASE must be a Debian or Ubuntu image (apt) with Python 3.10 or later in its archive. The build
# reads nothing from the host but the build context; where a registry needs a CA bundle or wheels
# come from a local folder, mount them read-only at /run/host/ca.crt and /run/host/wheels (buildah
# bud --volume ...:ro): they are used by pip in the build and never copied into the image.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
ARG FLAVOUR=cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md constraints.txt /src/
COPY lmi_core /src/lmi_core
COPY djl_python /src/djl_python
COPY plugins /src/plugins
COPY deploy/image/install.sh /src/deploy/image/install.sh
RUN sh /src/deploy/image/install.sh "$FLAVOUR" /src /opt/lmi

FROM ${BASE}
ARG FLAVOUR=cpu
# tini is PID 1: it forwards SIGTERM to lmi (which drains its requests, then stops its workers) and
# reaps every orphan, so no zombie stays. The mpi flavour adds sshd for the ranks of multi-pod jobs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini \
    $(if [ "$FLAVOUR" = cuda ]; then echo openssh-server openssh-client; fi) \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --create-home --shell /bin/sh lmi \
 && mkdir -p /models && chown lmi /models
COPY --from=build /opt/lmi /opt/lmi
COPY deploy/kubernetes/lmi-sshd.sh /usr/local/bin/lmi-sshd
ENV PATH=/opt/lmi/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    SERVING_INFERENCE_ADDRESS=http://0.0.0.0:8080
USER 1000
WORKDIR /home/lmi
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "lmi"]
CMD ["serve", "--model-dir", "/models/model"]
