# STAND-IN for nginx:1.28.0-alpine, for tests/test_built_fleet.py only (no registry reachable
# there): Debian 12's nginx on the Debian base image. Runs deploy/nginx/nginx.conf as mounted by
# the compose file, as uid 101 like the official image's compose service.
ARG BASE=localhost/comfy-base/debian:bookworm
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx wget \
 && rm -rf /var/lib/apt/lists/* \
 && chmod 0777 /var/log/nginx /var/lib/nginx
LABEL org.opencontainers.image.description="STAND-IN for nginx:1.28.0-alpine (Debian's nginx), tests only"
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
