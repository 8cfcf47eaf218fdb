# STAND-IN for redis:7.4-alpine, for tests/test_built_fleet.py only (no registry reachable there):
# Debian 12's redis-server on the Debian base image (deploy/images/debian-base.sh). The compose
# file keeps the official image; only the test's copy of it names this one.
ARG BASE=localhost/comfy-base/debian:bookworm
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o redis -g redis /data
LABEL org.opencontainers.image.description="STAND-IN for redis:7.4-alpine (Debian's redis-server), tests only"
WORKDIR /data
CMD ["redis-server"]
