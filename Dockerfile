# vgate for Vertex AI Prediction and GKE: vLLM engines under supervisord,
# nginx in front, the Vertex gateway beside them.
#
# BASE: vLLM's GPU image (the default: vLLM comes with it), or a bare Debian
# bookworm for the CPU image that `make image` builds and the tests run
# (EXTRAS=cpu VENV=/opt/vgate/venv: vLLM's CPU build goes into a venv).
# Bump vLLM: change the tag (and the digest: `skopeo inspect
# docker://vllm/vllm-openai:TAG | jq -r .Digest`) together with pyproject.toml's pins.
ARG BASE=vllm/vllm-openai:v0.32.0
# hadolint ignore=DL3006
FROM ${BASE}
ARG EXTRAS=""
ARG VENV=system
ARG VERSION=0.1.0
# Unset unless given: `make image` points pip at the wheels it downloaded once.
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

LABEL org.opencontainers.image.title="vgate" \
      org.opencontainers.image.description="vLLM engines per GPU group behind nginx, with a Vertex AI predict gateway" \
      org.opencontainers.image.source="https://github.com/vgate/vgate" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /tmp/vgate-src

# The system packages first: a layer that outlives changes to the code.
COPY deploy/install.sh deploy/
RUN deploy/install.sh --venv "${VENV}" --extras "${EXTRAS}" --system-only \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md LICENSE ./
COPY engine/ engine/
COPY gateway/ gateway/

# The same install script `make` uses: nginx (and Python on a bare base) from the
# system packages, then a copy of the project (not editable; the sources go, so
# nothing imports them instead). `make image` mounts the wheels it downloaded once
# at /wheels and sets PIP_FIND_LINKS/PIP_NO_INDEX.
RUN deploy/install.sh --venv "${VENV}" --extras "${EXTRAS}" --no-editable \
    && rm -rf /tmp/vgate-src /var/lib/apt/lists/* /root/.cache/pip
ENV PATH=/opt/vgate/venv/bin:${PATH}

# Nothing runs as root: vLLM, nginx (workers included), supervisord and the gateway.
# The run dir, model mirror and adapter cache default to /tmp; the uid is far from
# the base's own users.
RUN useradd --create-home --uid 10001 --user-group vgate
USER 10001
ENV HOME=/home/vgate
WORKDIR /home/vgate

# Vertex sets AIP_HTTP_PORT (default 8080) and the other AIP_* variables. Liveness
# only: readiness (/ping) is 503 for as long as the model downloads.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/live' % os.environ.get('AIP_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["vgate", "serve"]
