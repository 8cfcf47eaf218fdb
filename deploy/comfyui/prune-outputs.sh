#!/usr/bin/env bash
# Delete ComfyUI's own copies of outputs (and temp files) older than the retention: workers
# download every output through /view as soon as a prompt ends and store it in the service's
# storage, so ComfyUI's copies are only needed for minutes.
#
#   prune-outputs.sh DATA_DIR [MINUTES]
#
# DATA_DIR holds output/ and temp/ (the image: /var/lib/comfyui; systemd: /var/lib/comfyui/gpu-N).
# MINUTES defaults to COMFYUI_OUTPUT_RETENTION_MINUTES, else 1440; 0 keeps everything.
# Used by the image's entrypoint (every 10 minutes) and by comfyui-prune@.timer on a bare host.
set -euo pipefail
data="${1:?usage: prune-outputs.sh DATA_DIR [MINUTES]}"
minutes="${2:-${COMFYUI_OUTPUT_RETENTION_MINUTES:-1440}}"
[[ "$minutes" =~ ^[0-9]+$ ]] || { echo "prune-outputs: retention '$minutes' is not a number of minutes" >&2; exit 2; }
((minutes > 0)) || exit 0
for dir in "$data/output" "$data/temp"; do
  [[ -d "$dir" ]] || continue
  find "$dir" -type f -mmin "+$minutes" -delete
  # Empty subfolders left behind (never the folder itself).
  find "$dir" -mindepth 1 -type d -empty -delete
done
