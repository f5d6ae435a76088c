#!/usr/bin/env bash
# Build the OpenBeepBoop image (docs/docker.md).
#
#   docker/build.sh [-t TAG] [--base IMAGE] [--no-wheel] [any other `docker build` flags]
#
# What it adds to a plain `docker build`:
# - the llama-cpp-python wheel pip already built on this machine (`make install`) is put
#   in docker/wheels, so the image does not compile llama.cpp again (the wheel must be
#   for the image's Python and C library: a Debian bookworm image on a bookworm host);
# - this machine's pip config (/etc/pip.conf, or $PIP_CONFIG_FILE) and CA bundle
#   ($PIP_CERT, $SSL_CERT_FILE, or Debian's) go in as build secrets, never into a layer,
#   and the build uses the host's network: a build behind a TLS-inspecting proxy reaches
#   the package index the way the host does;
# - a docker CLI that builds with BuildKit (Docker 23+ with buildx, or Docker 20.10's own).
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${OBB_IMAGE:-openbeepboop:latest}"
base="${BASE_IMAGE:-}"
reuse_wheel=1
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -t|--tag) tag="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        --no-wheel) reuse_wheel=0; shift ;;  # e.g. a CUDA build: compile llama.cpp anew
        *) extra+=("$1"); shift ;;
    esac
done

docker_cli() {
    if docker buildx version >/dev/null 2>&1; then echo docker; return; fi
    for cli in docker /usr/bin/docker; do
        if DOCKER_BUILDKIT=1 "$cli" build --help 2>/dev/null | grep -q -- '--secret'; then
            echo "$cli"; return
        fi
    done
    echo "docker/build.sh: this docker CLI cannot build with BuildKit; install buildx" \
         "(Debian: docker-buildx; Docker's packages: docker-buildx-plugin)" >&2
    exit 2
}
cli="$(docker_cli)"

# the wheel pip built for this checkout's llama-cpp-python pin, when there is one
rm -f docker/wheels/*.whl
pin="$(sed -n 's/^llama-cpp-python==\([^ ;]*\).*/\1/p' requirements.lock | head -1)"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && python=.venv/bin/python
if [ -n "$pin" ] && [ "$reuse_wheel" = 1 ]; then
    wheel="$("$python" -m pip cache list "llama_cpp_python-${pin}-*linux_x86_64*" \
        --format abspath 2>/dev/null | xargs -r ls -t 2>/dev/null | head -1 || true)"
    if [ -n "$wheel" ]; then
        cp "$wheel" docker/wheels/
        echo "docker/build.sh: reusing $(basename "$wheel") from pip's cache" >&2
    else
        echo "docker/build.sh: no llama-cpp-python $pin wheel in pip's cache:" \
             "the build compiles llama.cpp (several minutes)" >&2
    fi
fi

# No base named and the default cannot be had (no registry reachable): make a Debian one
# with debootstrap instead, when this machine can (root, debootstrap)
default_base="python:3.11-slim-bookworm"
if [ -z "$base" ] && ! "$cli" image inspect "$default_base" >/dev/null 2>&1 \
    && ! "$cli" pull -q "$default_base" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null; then
        echo "docker/build.sh: cannot pull $default_base (no registry reachable?):" \
             "building on a Debian base made with docker/base-image.sh" >&2
        DOCKER="$cli" bash docker/base-image.sh openbeepboop-base:bookworm
        base=openbeepboop-base:bookworm
    else
        echo "docker/build.sh: cannot pull $default_base; make a base with" \
             "docker/base-image.sh (root, debootstrap) and pass --base" >&2
        exit 2
    fi
fi

args=(--network host -t "$tag")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
pipconf="${PIP_CONFIG_FILE:-/etc/pip.conf}"
[ -f "$pipconf" ] && args+=(--secret "id=pipconf,src=$pipconf")
for cert in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$cert" ] && [ -f "$cert" ]; then args+=(--secret "id=cacert,src=$cert"); break; fi
done

echo "docker/build.sh: $cli build ${args[*]} ${extra[*]:-} ." >&2
DOCKER_BUILDKIT=1 "$cli" build "${args[@]}" "${extra[@]}" .
