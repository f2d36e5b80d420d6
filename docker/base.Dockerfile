# A Python 3.11 base image built from Debian packages only, for machines that cannot pull from
# Docker Hub: FROM an image imported from a debootstrap root file system (make docker-base).
#
#     docker build -f docker/base.Dockerfile --build-arg DEBIAN_IMAGE=local/debian-bookworm:base -t fedhlm/python:3.11-bookworm .
ARG DEBIAN_IMAGE=local/debian-bookworm:base
FROM ${DEBIAN_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python
# `python` and `pip` as in the official python images
ENV PATH=/opt/python/bin:$PATH
