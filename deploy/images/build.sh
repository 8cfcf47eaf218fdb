#!/usr/bin/env bash
# `make images`: build every image the project owns, with docker (when its daemon answers) or
# podman.
#
#   deploy/images/build.sh [--offline] [--comfyui] [--fresh] [--report] [--engine docker|podman]
#
#   comfy-service/api:dev       Dockerfile.api
#   comfy-service/worker:dev    Dockerfile.worker: the GPU worker, and in the same image the
#                               ComfyUI simulator, Flower, the webhook worker and the alert receiver
#   comfy-service/comfyui:0.8.2 deploy/comfyui (--comfyui: needs the nvidia/cuda base image and
#                               GitHub for ComfyUI's and the plugin's sources)
#
# IMAGE_PREFIX and IMAGE_TAG name them as docker-compose.yml does. Each image is also tagged
# `src-<hash>` by the content of what it is built from: when the engine still has that tag the
# build is skipped ("reused"), so an unchanged tree builds nothing.
#
# --offline: no registry. The base images are made from Debian's archive first
# (deploy/images/debian-base.sh) and every build runs with --pull=never; the normal path pulls
# the official base images named in FROM, unchanged.
# --fresh: build every image from scratch (--no-cache, no reuse): what --report should measure.
# --report: write each image's size and build time to deploy/images/build-report.json and into
# docs/deploy.md ("Image sizes and build times"), from this build (reused images keep their
# last measured figures).
set -euo pipefail
cd "$(dirname "$0")/../.."

offline=0 comfyui=0 fresh=0 report=0 engine="${CONTAINER_ENGINE:-}"
while (($#)); do
  case "$1" in
    --offline) offline=1; shift ;;
    --comfyui) comfyui=1; shift ;;
    --fresh) fresh=1; shift ;;
    --report) report=1; shift ;;
    --engine) engine="$2"; shift 2 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$engine" ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null 2>&1; then engine=podman
  else
    echo "build.sh: neither a running docker nor podman: install one (Debian: sudo deploy/setup-host.sh)" >&2
    exit 1
  fi
fi
prefix="${IMAGE_PREFIX:-comfy-service}" tag="${IMAGE_TAG:-dev}"
pull=()
if ((offline)); then
  deploy/images/debian-base.sh --engine "$engine"
  pull=(--pull=never)
fi
fmt=()
nocache=()
((fresh)) && nocache=(--no-cache)
[[ "$engine" == podman ]] && fmt=(--format docker)  # keep HEALTHCHECK (OCI images drop it)

# sha256 over the files a build reads (its Dockerfile, requirements and the code it copies).
source_hash() {
  local f
  for f in "$@"; do
    if [[ -d "$f" ]]; then find "$f" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0; else printf '%s\0' "$f"; fi
  done | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

results=()
build() {  # name dockerfile context image -- inputs...
  local name="$1" dockerfile="$2" context="$3" image="$4"
  shift 5
  local hash start seconds state
  hash="$(source_hash "$dockerfile" "$@")"
  local repo="${image%:*}"
  if ((!fresh)) && "$engine" image inspect "$repo:src-$hash" >/dev/null 2>&1; then
    "$engine" tag "$repo:src-$hash" "$image"
    state=reused seconds=null
  else
    start=$SECONDS
    "$engine" build "${pull[@]}" "${fmt[@]}" "${nocache[@]}" -f "$dockerfile" -t "$image" -t "$repo:src-$hash" "$context"
    seconds=$((SECONDS - start))
    state=built
  fi
  local size
  size=$("$engine" image inspect --format '{{.Size}}' "$image")
  if [[ "$state" == built ]]; then
    echo "build.sh: $image built in ${seconds} s, $((size / 1000000)) MB"
  else
    echo "build.sh: $image reused (src-$hash), $((size / 1000000)) MB"
  fi
  results+=("{\"image\": \"$image\", \"name\": \"$name\", \"state\": \"$state\", \"seconds\": $seconds, \"bytes\": $size, \"engine\": \"$engine\", \"offline\": $((offline)), \"hash\": \"$hash\"}")
}

code=(.dockerignore requirements.txt common workflows workers)
build api Dockerfile.api . "$prefix/api:$tag" -- "${code[@]}" app
build worker Dockerfile.worker . "$prefix/worker:$tag" -- "${code[@]}" comfyui_sim deploy/__init__.py \
  deploy/flower.py deploy/alertlog.py
if ((comfyui)); then
  build comfyui deploy/comfyui/Dockerfile deploy/comfyui "$prefix/comfyui:0.8.2" -- deploy/comfyui
fi

if ((report)); then
  printf '%s\n' "${results[@]}" | python3 deploy/images/report.py
fi
