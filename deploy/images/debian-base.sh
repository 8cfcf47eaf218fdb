#!/usr/bin/env bash
# Offline base images (docs/deploy.md, "Building without a registry"): when no container
# registry is reachable, make the base images the Dockerfiles name in FROM out of Debian's
# archive (the one apt already uses), so `make images OFFLINE=1` builds with --pull=never.
#
#   deploy/images/debian-base.sh [--engine podman|docker] [--check]
#
# Makes, once (kept while the engine still has them; --force rebuilds):
#   localhost/comfy-base/debian:bookworm   debootstrap --variant=minbase bookworm, the host's CA
#                                          certificates copied in (HTTPS from inside a build)
#   python:3.11.14-slim-bookworm           that plus Debian's Python 3.11 (python3, venv, pip,
#                                          python-is-python3), tagged with the FROM name of
#                                          Dockerfile.api / Dockerfile.worker. It is a STAND-IN:
#                                          Debian's python3.11 (3.11.2), not python.org's build.
# Needs root, debootstrap and the engine. Prints each image it made or reused.
set -euo pipefail

engine="${CONTAINER_ENGINE:-}"
force=0
check=0
while (($#)); do
  case "$1" in
    --engine) engine="$2"; shift 2 ;;
    --force) force=1; shift ;;
    --check) check=1; shift ;;
    *) echo "debian-base.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
engine="${engine:-podman}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
python_image="$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$repo/Dockerfile.api")"
base_image=localhost/comfy-base/debian:bookworm
mirror="${DEBIAN_MIRROR:-$(awk '$1 == "URIs:" {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"

have() { "$engine" image inspect "$1" >/dev/null 2>&1; }

if ((check)); then
  have "$base_image" && have "$python_image"
  exit
fi
[[ "$(id -u)" == 0 ]] || { echo "debian-base.sh: needs root (debootstrap)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debian-base.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

if ((force)) || ! have "$base_image"; then
  start=$SECONDS
  root="$(mktemp -d /var/tmp/comfy-base.XXXXXX)"
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
  # The host's CA bundle, so that pip (and anything else) inside a build trusts what the host trusts.
  # Also as a local CA file, so that installing Debian's ca-certificates later keeps it.
  mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host-ca-bundle.crt"
  # Same apt sources as the host (an internal mirror keeps working inside the build).
  rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
  tar -C "$root" -c . | "$engine" import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' - "$base_image" >/dev/null
  rm -rf "$root"
  trap - EXIT
  echo "made $base_image in $((SECONDS - start)) s"
else
  echo "reusing $base_image"
fi

if ((force)) || ! have "$python_image"; then
  start=$SECONDS
  "$engine" build --pull=never -t "$python_image" --build-arg "BASE=$base_image" \
    -f "$repo/deploy/images/python-debian.Dockerfile" "$repo/deploy/images" >/dev/null
  echo "made $python_image (stand-in: Debian's Python) in $((SECONDS - start)) s"
else
  echo "reusing $python_image"
fi
