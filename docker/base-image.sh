#!/usr/bin/env bash
# Make a Debian bookworm base image without a registry (docs/docker.md):
# debootstrap --variant=minbase from the Debian mirror this machine's apt uses, then
# `docker import`. Needs root, debootstrap and a running Docker engine.
#
#   docker/base-image.sh [TAG]          # default openbeepboop-base:bookworm
#
# Then: docker/build.sh --base openbeepboop-base:bookworm
set -euo pipefail
tag="${1:-openbeepboop-base:bookworm}"
docker="${DOCKER:-docker}"

if "$docker" image inspect "$tag" >/dev/null 2>&1; then
    echo "docker/base-image.sh: $tag is there already" >&2
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "docker/base-image.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }

# the first Debian mirror apt's sources name (deb822 or one-line format)
mirror="$(sed -n 's/^URIs: *\([^ ]*\/debian\)\/\{0,1\} *$/\1/p' /etc/apt/sources.list.d/*.sources \
    2>/dev/null | head -1)"
[ -n "$mirror" ] || mirror="$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\/debian\)\/\{0,1\} .*/\2/p' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -1)"
mirror="${DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "docker/base-image.sh: debootstrap bookworm from $mirror" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# apt inside builds: no recommends, no docs
printf 'APT::Install-Recommends "false";\n' >"$root/etc/apt/apt.conf.d/90no-recommends"
tar -C "$root" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$tag" >/dev/null
echo "docker/base-image.sh: made $tag" >&2
