# vgate for Vertex AI Prediction and GKE: vLLM engines under supervisord,
# nginx in front, the Vertex gateway beside them. vLLM comes from the pinned base.
FROM vllm/vllm-openai:v0.32.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/vgate

COPY pyproject.toml README.md supervisord.conf ./
COPY deploy/ deploy/
COPY nginx/ nginx/
COPY engine/ engine/
COPY gateway/ gateway/

# The same install script `make` uses: nginx from the system packages, then the
# project into the image's Python (beside its vLLM).
RUN deploy/install.sh --venv system \
    && rm -rf /var/lib/apt/lists/* /root/.cache/pip

# Nothing runs as root: vLLM, nginx (workers included), supervisord and the gateway.
# The run dir, model mirror and adapter cache default to /tmp; the uid is far from
# the base's own users.
RUN useradd --create-home --uid 10001 --user-group vgate
USER 10001
ENV HOME=/home/vgate

# Vertex sets AIP_HTTP_PORT (default 8080) and the other AIP_* variables.
EXPOSE 8080
ENTRYPOINT ["vgate", "serve"]
