# Stand-in for python:3.11-slim-bookworm made from Debian's packages (deploy/images/debian-base.sh):
# only for building the images where no registry is reachable.
ARG BASE=localhost/comfy-base/debian:bookworm
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# pip and requests trust the host's CAs (copied into the base by debian-base.sh).
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.description="STAND-IN for python:3.11-slim-bookworm: Debian 12's Python 3.11"
CMD ["python3"]
