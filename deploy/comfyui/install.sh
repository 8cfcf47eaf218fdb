#!/usr/bin/env bash
# install.sh: ComfyUI (source, pinned), the ComfyUI_StoryDiffusion plugin (pinned), the models
# (SHA-256 checked) and one comfy-service worker per GPU on a bare GPU host, under systemd.
# The same versions as deploy/comfyui/Dockerfile. Idempotent: every step checks first and
# does nothing when its result is already there, so re-running it is safe (and is how an
# interrupted install is finished, or a changed pin is applied). Run --help for the options.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

# Pins: keep in step with deploy/comfyui/Dockerfile and constraints.txt.
COMFYUI_REPO="${COMFYUI_REPO:-https://github.com/Comfy-Org/ComfyUI.git}"
COMFYUI_REF="${COMFYUI_REF:-v0.8.2}"
STORYDIFFUSION_REPO="${STORYDIFFUSION_REPO:-https://github.com/smthemex/ComfyUI_StoryDiffusion.git}"
STORYDIFFUSION_REF="${STORYDIFFUSION_REF:-e4e0acd}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
NVIDIA_ML_PY="nvidia-ml-py==13.580.82"

prefix=/opt/comfyui
service_dir="$repo"
user=comfy
gpus=""
worker_host="$(hostname -s 2>/dev/null || hostname)"
python="${PYTHON:-python3}"
service_python=""
etc=/etc/comfy-service
do_models=1 do_worker=1 do_systemd=1 do_start=0 allow_no_gpu=0
only=""

usage() {
  cat <<EOF
Usage: sudo $(basename "$0") [options]

Installs on this host, each step only if needed:
  1. a system user ($user) owning the services' files
  2. ComfyUI $COMFYUI_REF from source in PREFIX/ComfyUI
  3. ComfyUI_StoryDiffusion $STORYDIFFUSION_REF in PREFIX/ComfyUI/custom_nodes
  4. a virtual environment PREFIX/venv: torch for CUDA 12.8, ComfyUI's and the plugin's
     requirements under constraints.txt, omegaconf, opencv-python-headless
  5. the models of models.txt, each SHA-256 checked (fetch-models.sh)
  6. the comfy-service worker's environment in SERVICE_DIR/.venv
  7. settings: $etc/comfy-service.env (shared; fill in REDIS_URL) and
     $etc/gpu-N.env per GPU (port 8188+N, queue gpu.HOST.N); existing files are kept
  8. systemd units comfyui@.service and comfy-worker@.service, enabled for each GPU

Options:
  --gpus LIST           GPU indexes to set up, e.g. 0,1 (default: every GPU nvidia-smi lists)
  --prefix DIR          where ComfyUI and its venv go (default $prefix)
  --service-dir DIR     the comfy-service checkout the workers run from (default $repo)
  --user NAME           the service user (default $user)
  --worker-host NAME    host part of the GPU queue names (default $worker_host)
  --python PY           interpreter for ComfyUI's venv, 3.10-3.12 (default $python)
  --service-python PY   interpreter for the worker's venv (default python3.11, else python3)
  --skip-models         do not download models (the units refuse to start until they are there)
  --skip-worker         ComfyUI only: no worker venv, no worker units
  --no-systemd          install files only: no user, no units (runs without root into
                        writable directories)
  --allow-no-gpu        do not stop when nvidia-smi is missing (CPU-only trial)
  --etc DIR             where the settings files go (default $etc)
  --only STEPS          run only these steps (comma-separated: user, sources, venv, models,
                        worker, config, units), e.g. --only models after a manifest change
  --start               start (or restart) the units at the end
  -h, --help            this text

Environment: COMFYUI_REF, STORYDIFFUSION_REF, TORCH_INDEX_URL, COMFYUI_REPO,
STORYDIFFUSION_REPO override the pins; COMFYUI_MODELS_MANIFEST, COMFYUI_MODELS_MIRROR and
HF_TOKEN are passed to fetch-models.sh. Documentation: docs/deploy.md ("A bare GPU host").
EOF
}

log() { printf '\n==> %s\n' "$*" >&2; }
ok() { printf '    ok: %s\n' "$*" >&2; }
die() { printf 'install.sh: ERROR: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case "$1" in
    --gpus) gpus="${2:?--gpus needs a list}"; shift 2 ;;
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --service-dir) service_dir="${2:?--service-dir needs a directory}"; shift 2 ;;
    --user) user="${2:?--user needs a name}"; shift 2 ;;
    --worker-host) worker_host="${2:?--worker-host needs a name}"; shift 2 ;;
    --python) python="${2:?--python needs an interpreter}"; shift 2 ;;
    --service-python) service_python="${2:?--service-python needs an interpreter}"; shift 2 ;;
    --skip-models) do_models=0; shift ;;
    --skip-worker) do_worker=0; shift ;;
    --no-systemd) do_systemd=0; shift ;;
    --allow-no-gpu) allow_no_gpu=1; shift ;;
    --etc) etc="${2:?--etc needs a directory}"; shift 2 ;;
    --only) only="${2:?--only needs a list of steps}"; shift 2 ;;
    --start) do_start=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

prefix="${prefix%/}"
service_dir="$(cd "$service_dir" && pwd)" || die "--service-dir: no such directory"
[[ "$worker_host" =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] || die "--worker-host '$worker_host': letters, digits and '-' only"

# ---------------------------------------------------------------------------------------------
preflight() {
  log "checking this host"
  if ((do_systemd)); then
    ((EUID == 0)) || die "run as root (sudo): it creates a user and systemd units (or use --no-systemd)"
    command -v systemctl >/dev/null || die "systemctl not found (use --no-systemd)"
  fi
  local tool
  for tool in git curl sha256sum flock "$python"; do
    command -v "$tool" >/dev/null || die "$tool is required (Debian/Ubuntu: apt-get install git curl coreutils util-linux python3 python3-venv)"
  done
  "$python" -c 'import sys, venv; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))' \
    || die "$python must be Python 3.10-3.12 with the venv module (torch 2.9 and ComfyUI 0.8)"
  if [[ -z "$service_python" ]]; then
    service_python="$(command -v python3.11 || command -v python3)"
  fi
  [[ -f "$service_dir/workers/__main__.py" && -f "$service_dir/requirements.txt" ]] \
    || die "$service_dir is not a comfy-service checkout (--service-dir)"
  if ((do_systemd && do_worker)) && [[ "$service_dir" == /home/* || "$service_dir" == /root/* ]]; then
    die "the worker units cannot read $service_dir (ProtectHome): clone the service to /opt/comfy-service and pass --service-dir /opt/comfy-service"
  fi
  if command -v nvidia-smi >/dev/null; then
    local listed
    listed="$(nvidia-smi --query-gpu=index --format=csv,noheader | tr -d ' ' | paste -sd, -)" \
      || die "nvidia-smi failed: is the NVIDIA driver loaded?"
    ok "GPUs: ${listed:-none}; driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
    gpus="${gpus:-$listed}"
  elif ((allow_no_gpu)); then
    echo "    WARNING: nvidia-smi not found; continuing (--allow-no-gpu)" >&2
  else
    die "nvidia-smi not found: install the NVIDIA driver (>= 570 for CUDA 12.8) first, or pass --allow-no-gpu"
  fi
  [[ -n "$gpus" ]] || gpus=0
  [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus '$gpus': a comma-separated list of GPU indexes"
  ok "setting up GPU(s) $gpus as gpu.$worker_host.<index>"
}

as_user() {  # run a command as the service user (or as ourselves with --no-systemd)
  if ((do_systemd)) && [[ "$(id -un)" != "$user" ]]; then
    runuser -u "$user" -- "$@"
  else
    "$@"
  fi
}

step_user() {
  ((do_systemd)) || return 0
  log "service user $user"
  if id -u "$user" >/dev/null 2>&1; then
    ok "exists"
  else
    useradd --system --home-dir /var/lib/comfyui --shell /usr/sbin/nologin "$user"
    ok "created"
  fi
  install -d -o "$user" -g "$user" /var/lib/comfyui
}

# g DIR ARGS...: git in DIR, also when DIR belongs to the service user (git's safe.directory).
g() { git -c safe.directory="$1" -C "$1" "${@:2}"; }

# checkout DIR REPO REF: DIR at REF, cloning or moving it as needed; never over local changes.
checkout() {
  local dir="$1" url="$2" ref="$3" want have
  if [[ -d "$dir/.git" ]]; then
    have="$(g "$dir" rev-parse HEAD)"
    want="$(g "$dir" rev-parse --verify --quiet "$ref^{commit}" || true)"
    if [[ -n "$want" && "$have" == "$want" ]]; then
      ok "$(basename "$dir") at $ref (${have:0:12})"
      return 0
    fi
    [[ -z "$(g "$dir" status --porcelain --untracked-files=no)" ]] \
      || die "$dir has local changes; commit or discard them before moving it to $ref"
    g "$dir" fetch --quiet --tags origin
  elif [[ -e "$dir" ]]; then
    die "$dir exists but is not a git checkout; move it away first"
  else
    git clone --quiet --filter=blob:none --no-checkout "$url" "$dir"
  fi
  g "$dir" -c advice.detachedHead=false checkout --quiet "$ref"
  ok "$(basename "$dir") checked out at $ref ($(g "$dir" rev-parse --short=12 HEAD))"
}

step_sources() {
  log "ComfyUI $COMFYUI_REF and ComfyUI_StoryDiffusion $STORYDIFFUSION_REF in $prefix"
  install -d "$prefix"
  checkout "$prefix/ComfyUI" "$COMFYUI_REPO" "$COMFYUI_REF"
  local version
  version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$prefix/ComfyUI/comfyui_version.py")"
  [[ "$version" == 0.8.* ]] || die "ComfyUI at $COMFYUI_REF is version '$version'; the service speaks ComfyUI 0.8's protocol"
  checkout "$prefix/ComfyUI/custom_nodes/ComfyUI_StoryDiffusion" "$STORYDIFFUSION_REPO" "$STORYDIFFUSION_REF"
  local plugin
  plugin="$(g "$prefix/ComfyUI/custom_nodes/ComfyUI_StoryDiffusion" rev-parse HEAD)"
  if [[ "$STORYDIFFUSION_REF" =~ ^[0-9a-f]{7,40}$ && "$plugin" != "$STORYDIFFUSION_REF"* ]]; then
    die "ComfyUI_StoryDiffusion is at $plugin, not $STORYDIFFUSION_REF"
  fi
  install -m 0755 "$here/fetch-models.sh" "$prefix/fetch-models.sh"
  install -m 0755 "$here/prune-outputs.sh" "$prefix/prune-outputs.sh"
  install -m 0644 "$here/models.txt" "$prefix/models.txt"
  install -m 0644 "$here/constraints.txt" "$prefix/constraints.txt"
}

step_comfyui_venv() {
  log "ComfyUI's Python environment $prefix/venv"
  local venv="$prefix/venv" stamp want
  want="$(cat "$prefix/constraints.txt" "$prefix/ComfyUI/requirements.txt" \
            "$prefix/ComfyUI/custom_nodes/ComfyUI_StoryDiffusion/requirements.txt" \
          | { cat; echo "$TORCH_INDEX_URL $("$python" -V 2>&1)"; } | sha256sum | cut -d' ' -f1)"
  stamp="$venv/.comfy-service-stamp"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    ok "up to date"
    return 0
  fi
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet --index-url "$TORCH_INDEX_URL" -c "$prefix/constraints.txt" \
    torch torchvision torchaudio
  local filtered
  filtered="$(mktemp)"
  grep -vE '^[[:space:]]*opencv-(contrib-)?python([[:space:]]*[<>=!~;].*)?[[:space:]]*$' \
    "$prefix/ComfyUI/custom_nodes/ComfyUI_StoryDiffusion/requirements.txt" >"$filtered" || true
  "$venv/bin/pip" install --quiet -c "$prefix/constraints.txt" -r "$prefix/ComfyUI/requirements.txt" \
    -r "$filtered" omegaconf opencv-python-headless
  rm -f "$filtered"
  "$venv/bin/pip" check
  "$venv/bin/python" -c "import torch, cv2, omegaconf, diffusers, peft; print('    torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"
  echo "$want" >"$stamp"
  ok "installed"
}

step_models() {
  ((do_models)) || { log "models: skipped (--skip-models)"; return 0; }
  log "models (SHA-256 checked) in $prefix/ComfyUI/models"
  if ((do_systemd)); then chown -R "$user:$user" "$prefix/ComfyUI/models"; fi
  as_user "$prefix/fetch-models.sh" --dest "$prefix/ComfyUI/models"
}

step_worker_venv() {
  ((do_worker)) || return 0
  log "the worker's Python environment $service_dir/.venv"
  local venv="$service_dir/.venv" stamp want runtime
  runtime="$(sed '/^# Tests/,$d' "$service_dir/requirements.txt")"
  want="$(printf '%s\n%s\n%s\n' "$runtime" "$NVIDIA_ML_PY" "$("$service_python" -V 2>&1)" | sha256sum | cut -d' ' -f1)"
  stamp="$venv/.worker-stamp"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    ok "up to date"
    return 0
  fi
  [[ -x "$venv/bin/python" ]] || "$service_python" -m venv "$venv"
  "$venv/bin/pip" install --quiet -r <(printf '%s\n' "$runtime") "$NVIDIA_ML_PY"
  (cd "$service_dir" && "$venv/bin/python" -c "import workers.celery_app, workers.tasks")
  echo "$want" >"$stamp"
  ok "installed"
}

# write_once FILE MODE CONTENT: create FILE only if it does not exist (operators edit it).
write_once() {
  local file="$1" mode="$2" content="$3"
  if [[ -e "$file" ]]; then
    ok "$file kept"
  else
    printf '%s\n' "$content" >"$file"
    chmod "$mode" "$file"
    if ((do_systemd)); then chgrp "$user" "$file"; fi
    ok "$file written"
  fi
}

step_config() {
  log "settings in $etc"
  install -d -m 0755 "$etc"
  write_once "$etc/comfy-service.env" 0640 "# Shared by every comfy-service unit on this host. Every variable: README.md, \"Settings\".
# The Redis all hosts share (rediss:// for TLS); the password is URL-encoded.
REDIS_URL=
# Outputs: S3 when workers run on several hosts (docs/deploy.md).
STORAGE_BACKEND=local
STORAGE_DIR=/var/lib/comfyui/outputs
# S3_BUCKET=
# S3_ENDPOINT_URL=
# AWS_ACCESS_KEY_ID=
# AWS_SECRET_ACCESS_KEY=
# LOGDY_ADDRESS=logs.example:8233
LOG_DIR="
  local gpu
  for gpu in ${gpus//,/ }; do
    write_once "$etc/gpu-$gpu.env" 0644 "# GPU $gpu: comfyui@$gpu and comfy-worker@$gpu.
GPU_INDEX=$gpu
GPU_QUEUE=gpu.$worker_host.$gpu
WORKER_HOST=$worker_host
COMFYUI_LISTEN=127.0.0.1
COMFYUI_PORT=$((8188 + gpu))
COMFYUI_URL=http://127.0.0.1:$((8188 + gpu))"
  done
  if ((do_worker)) && ! grep -qE '^REDIS_URL=.+' "$etc/comfy-service.env"; then
    echo "    NOTE: set REDIS_URL in $etc/comfy-service.env before starting the workers" >&2
  fi
}

# render UNIT: the unit file with this install's paths and user.
render() {
  sed -e "s#/opt/comfyui#$prefix#g" -e "s#/opt/comfy-service#$service_dir#g" \
      -e "s#^User=comfy\$#User=$user#" -e "s#^Group=comfy\$#Group=$user#" "$here/$1"
}

step_units() {
  ((do_systemd)) || { log "systemd: skipped (--no-systemd)"; return 0; }
  log "systemd units"
  local unit changed=0 units=("comfyui@.service" "comfyui-prune@.service" "comfyui-prune@.timer")
  if ((do_worker)); then units+=("comfy-worker@.service"); fi
  for unit in "${units[@]}"; do
    if render "$unit" | cmp -s - "/etc/systemd/system/$unit"; then
      ok "$unit unchanged"
    else
      render "$unit" >"/etc/systemd/system/$unit"
      changed=1
      ok "$unit installed"
    fi
  done
  if ((changed)); then systemctl daemon-reload; fi
  local gpu names=()
  for gpu in ${gpus//,/ }; do
    names+=("comfyui@$gpu.service" "comfyui-prune@$gpu.timer")
    if ((do_worker)); then names+=("comfy-worker@$gpu.service"); fi
  done
  systemctl enable --quiet "${names[@]}"
  ok "enabled: ${names[*]}"
  if ((do_start)); then
    systemctl restart "${names[@]}"
    ok "started; follow with: journalctl -fu 'comfyui@*' -u 'comfy-worker@*'"
  else
    echo "    start with: systemctl start ${names[*]}" >&2
  fi
}

# run STEP FUNCTION: the step, unless --only leaves it out.
run() {
  if [[ -z "$only" || ",$only," == *",$1,"* ]]; then "$2"; fi
}
if [[ -n "$only" && ! "$only" =~ ^(user|sources|venv|models|worker|config|units)(,(user|sources|venv|models|worker|config|units))*$ ]]; then
  die "--only '$only': steps are user, sources, venv, models, worker, config, units"
fi
preflight
run user step_user
run sources step_sources
run venv step_comfyui_venv
run models step_models
run worker step_worker_venv
run config step_config
run units step_units
if ((do_systemd)) && [[ -d "$prefix/ComfyUI/custom_nodes/ComfyUI_StoryDiffusion" ]]; then
  chown -R "$user:$user" "$prefix/ComfyUI/models" "$prefix/ComfyUI/custom_nodes/ComfyUI_StoryDiffusion"
fi
log "done"
