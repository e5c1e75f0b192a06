# cpt's image: one Dockerfile for the CPU pool and the GPU pool.
#   docker build -t cpt:cpu  .                                   # python:3.11-slim, torch's CPU wheels
#   docker build -t cpt:cuda --build-arg BASE=cuda .             # CUDA 12.8 runtime + cuDNN, torch's cu128 wheels
# The project is installed from its wheel (deploy/install.sh, the same script tests/test_deploy.py runs), not as
# an editable checkout; it runs as a non-root user; CPT_HOME is the folder prefect.yaml's deployments run from
# (its pull step sets the working directory there) and /scratch a volume for CPT_SCRATCH (the store's local
# mirror, checkpoints and training rows): mount a large disk there. Credentials come from the environment (a
# Kubernetes Secret, deploy/k8s/base-job-template.json), never from the image.
ARG BASE=cpu

FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS base-cuda
# Python 3.11 on Ubuntu 22.04 (deadsnakes); bitsandbytes and torch bring their own CUDA libraries' bindings.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

FROM base-${BASE}
ARG EXTRAS=trackers
# A C compiler builds near-dedup's shingle kernel (optional: without one the numpy path gives the same hashes).
RUN if command -v apt-get >/dev/null && ! command -v gcc >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; fi
ENV VENV=/opt/venv \
    CPT_HOME=/opt/cpt \
    CPT_SCRATCH=/scratch \
    CPT_CACHE_HOME=/scratch/cache \
    HF_HOME=/scratch/hf \
    PYTHONUNBUFFERED=1
ENV PATH=$VENV/bin:$PATH
RUN python -m venv $VENV && $VENV/bin/pip install --no-cache-dir --upgrade pip
COPY . /tmp/cpt-src
RUN sh /tmp/cpt-src/deploy/install.sh /tmp/cpt-src $VENV/bin/python "$TORCH_INDEX_URL" "$EXTRAS" \
 && mkdir -p $CPT_HOME \
 && cp -r /tmp/cpt-src/prefect.yaml /tmp/cpt-src/configs /tmp/cpt-src/samples $CPT_HOME/ \
 && rm -rf /tmp/cpt-src /root/.cache
RUN useradd --create-home --uid 1000 cpt && mkdir -p /scratch && chown -R cpt:cpt /scratch $CPT_HOME
USER cpt
WORKDIR $CPT_HOME
VOLUME ["/scratch"]
CMD ["cpt", "--help"]
