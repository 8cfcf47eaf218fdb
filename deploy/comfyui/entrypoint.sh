#!/usr/bin/env bash
# Entry point of the ComfyUI image (deploy/comfyui/Dockerfile).
#
#   serve          (default) fetch and verify the models if missing, then run ComfyUI
#   fetch-models   only fetch and verify the models, then exit (first-time provisioning)
#   check-models   only verify what is there; exit 3 if a model is missing
#   anything else  is run as a command (e.g. `bash`)
#
# Settings (environment): COMFYUI_PORT (8188), COMFYUI_LISTEN (0.0.0.0), COMFYUI_EXTRA_ARGS
# (more ComfyUI flags, split on spaces), COMFYUI_FETCH_MODELS (1: download missing models at
# start; 0: only verify those present and warn loudly about missing ones),
# COMFYUI_OUTPUT_RETENTION_MINUTES (1440; 0 keeps everything: ComfyUI's own copies of the
# outputs, which workers have already stored elsewhere), and those of fetch-models.sh.
set -euo pipefail

home=/opt/comfyui/ComfyUI
models="${COMFYUI_MODELS_DIR:-$home/models}"
data="${COMFYUI_DATA_DIR:-/var/lib/comfyui}"
fetch=/opt/comfyui/fetch-models.sh
export COMFYUI_MODELS_MANIFEST="${COMFYUI_MODELS_MANIFEST:-/opt/comfyui/models.txt}"

case "${1:-serve}" in
  serve) if (($#)); then shift; fi ;;
  fetch-models) exec "$fetch" --dest "$models" ;;
  check-models) exec "$fetch" --check --dest "$models" ;;
  *) exec "$@" ;;
esac

if [[ "${COMFYUI_FETCH_MODELS:-1}" == "1" ]]; then
  "$fetch" --dest "$models"
else
  status=0
  "$fetch" --check --dest "$models" || status=$?
  case "$status" in
    0) ;;
    3) echo "entrypoint: WARNING: COMFYUI_FETCH_MODELS=0 and models are missing (listed above):" \
            "jobs naming them will fail validation" >&2 ;;
    *) exit "$status" ;;
  esac
fi

mkdir -p "$data/output" "$data/input" "$data/temp" "$data/user"

# Workers download every output through /view as soon as a prompt ends and store it in the
# service's storage; ComfyUI's own copies are only needed for minutes. Prune old ones.
retention="${COMFYUI_OUTPUT_RETENTION_MINUTES:-1440}"
if [[ "$retention" =~ ^[0-9]+$ ]] && ((retention > 0)); then
  (
    while sleep 600; do
      /opt/comfyui/prune-outputs.sh "$data" "$retention" 2>/dev/null || true
    done
  ) &
fi

extra=()
read -r -a extra <<<"${COMFYUI_EXTRA_ARGS:-}"
cd "$home"
exec python main.py --listen "${COMFYUI_LISTEN:-0.0.0.0}" --port "${COMFYUI_PORT:-8188}" \
  --disable-auto-launch \
  --output-directory "$data/output" --input-directory "$data/input" \
  --temp-directory "$data/temp" --user-directory "$data/user" \
  "${extra[@]}" "$@"
