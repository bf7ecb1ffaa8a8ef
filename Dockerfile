# Aetheris, CPU image: `aetheris serve` (OpenAI-compatible API + the chat playground) on 0.0.0.0.
#
#   make image                                   # docker build -t aetheris:cpu .  (or podman)
#   docker run --rm -p 8000:8000 -v "$PWD/runs/demo/distill/sft/student:/model:ro" aetheris:cpu --api-key KEY
#
# Build arguments (all optional):
#   BASE             any Debian/Ubuntu-like image; one without Python gets Debian's python3 (apt)
#   TORCH_SPEC       the torch requirement, e.g. torch==2.13.0
#   TORCH_INDEX_URL  where torch comes from; default PyTorch's CPU-only index (no CUDA wheels in the
#                    image); set it empty to take torch from your pip configuration instead
#   PORT             the port the server listens on (default 8000; also settable at run time: -e PORT=...)
# Build inputs that never end up in a layer:
#   --secret id=pip.conf,src=FILE    a pip.conf (index URLs, credentials) used by the pip installs only
#   --secret id=pip-cert,src=FILE    a CA bundle for a TLS-intercepting proxy or private index; it is
#                                    at /run/secrets/pip-cert, so the pip.conf says `cert = /run/secrets/pip-cert`
#   --build-context wheels=DIR       a folder of wheels pip may install from (--find-links)
# docs/SERVING.md shows a build on a machine without registry access (podman, local wheels).
ARG BASE=python:3.11-slim-bookworm

# An empty default for the `wheels` context; `--build-context wheels=DIR` replaces it.
FROM scratch AS wheels

FROM ${BASE}
ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PORT=8000

ENV VIRTUAL_ENV=/opt/aetheris \
    PATH=/opt/aetheris/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    PORT=${PORT} \
    MODEL=/model

# Python in a venv (a base without Python, or without venv, gets Debian's), and the user it runs as.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin aetheris

# Dependencies first (torch, then the rest of pyproject.toml's dependencies + the `serve` extra), so
# that a change to the code rebuilds only the last, small layer. xgrammar pulls in triton (1 GB of GPU
# compiler) but uses it only for CUDA kernels, so the CPU image drops it.
COPY pyproject.toml /src/
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-cert \
    --mount=type=bind,from=wheels,target=/wheels \
    pip install --find-links /wheels ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
    && python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["serve"]))' > /tmp/requirements.txt \
    && pip install --find-links /wheels -r /tmp/requirements.txt \
    && pip uninstall -y triton \
    && rm /tmp/requirements.txt
COPY README.md /src/
COPY aetheris /src/aetheris
RUN pip install --no-deps --no-build-isolation /src \
    && rm -rf /src \
    && python3 -c "import xgrammar, aetheris.serve, aetheris.serve.playground; aetheris.serve.playground.page()"

USER aetheris
WORKDIR /home/aetheris
EXPOSE ${PORT}
# Mount a checkpoint folder at /model (or pass --model). Extra arguments go to `aetheris serve`
# (e.g. --api-key KEY, --served-model-name NAME); the last --model given wins.
ENTRYPOINT ["/bin/sh", "-c", "exec aetheris serve --host 0.0.0.0 --port \"$PORT\" --model \"$MODEL\" \"$@\"", "aetheris"]
