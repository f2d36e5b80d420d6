#!/usr/bin/env bash
# Build fedhlm:latest (docker/Dockerfile). The base image is $FEDHLM_BASE_IMAGE if set; else
# python:3.11-slim when Docker Hub answers; else a Python base built from Debian packages only
# (debootstrap + docker import + docker/base.Dockerfile; needs root and debootstrap). A CPU build of
# torch that pip can find here, and this machine's CA bundle, go into the build (docker/wheels,
# docker/certs: both kept out of git).
set -euo pipefail
cd "$(dirname "$0")/.."
base="${FEDHLM_BASE_IMAGE:-}"
if [ -z "$base" ]; then
    if docker image inspect python:3.11-slim > /dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim > /dev/null 2>&1; then
        base=python:3.11-slim
    else
        base=fedhlm/python:3.11-bookworm
        if ! docker image inspect "$base" > /dev/null 2>&1; then
            if ! docker image inspect local/debian-bookworm:base > /dev/null 2>&1; then
                echo "docker/build.sh: no Docker Hub here: building a Debian bookworm base with debootstrap" >&2
                root=$(mktemp -d)
                debootstrap --variant=minbase bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > /dev/null
                tar -C "$root" -c . | docker import - local/debian-bookworm:base > /dev/null
                rm -rf "$root"
            fi
            docker build -q -f docker/base.Dockerfile -t "$base" . > /dev/null
        fi
    fi
fi
python3 -m pip download --quiet --no-deps --only-binary :all: -d docker/wheels "torch==$(sed -n 's/^torch==//p' requirements.txt)+cpu" \
    2> /dev/null || echo "docker/build.sh: no CPU torch wheel found here; the image takes torch from PyPI" >&2
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then cp /etc/ssl/certs/ca-certificates.crt docker/certs/host-bundle.crt; fi
echo "docker/build.sh: base image $base" >&2
# the container user: yours (the bind mounts stay yours), or 1000 when you are root (root exists in the image)
uid="${FEDHLM_UID:-$(id -u)}"; gid="${FEDHLM_GID:-$(id -g)}"
if [ "$uid" = 0 ]; then uid=1000; gid=1000; fi
docker build -q -f docker/Dockerfile --build-arg BASE_IMAGE="$base" --build-arg APP_UID="$uid" --build-arg APP_GID="$gid" -t fedhlm:latest .
