# gatekeeper in a CUDA-capable image. Build from the repository root:
#   docker build -t gatekeeper:0.1.0 .
#   docker run --rm --gpus all -v "$PWD:/work" -w /work gatekeeper:0.1.0 \
#     scan models/my-model --policy default --out gatekeeper-report
# The base is pinned by tag; pin it by digest (FROM ...@sha256:...) once you have pulled it.
# Its torch (2.10, CUDA 12.8) satisfies gatekeeper's torch>=2.10, so pip keeps it.
FROM pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime

LABEL org.opencontainers.image.title="gatekeeper" \
      org.opencontainers.image.description="Deployment gate: detects backdoors in prompt-tuned CLIP models (CLIP-Inspector)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    HF_HUB_DISABLE_TELEMETRY=1

COPY . /tmp/gatekeeper-src
# One layer: install, then drop the sources. /cache is world-writable (sticky) so the image also
# runs as the caller's uid (docker run --user "$(id -u):$(id -g)", as the GitHub Action does).
RUN pip install --no-cache-dir /tmp/gatekeeper-src \
    && rm -rf /tmp/gatekeeper-src \
    && gatekeeper --version \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin gatekeeper \
    && mkdir -p /cache/huggingface /work \
    && chmod 1777 /cache /cache/huggingface /work

# Hub downloads (models, open_clip backbones): mount a host folder here to reuse them between runs.
VOLUME ["/cache/huggingface"]
USER 10001
WORKDIR /work
ENTRYPOINT ["gatekeeper"]
CMD ["--help"]
