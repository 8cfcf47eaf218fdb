#!/usr/bin/env bash
# fetch-models.sh: put the models a manifest lists into ComfyUI's models directory, each one
# verified against its SHA-256. Used by the ComfyUI image at start (entrypoint.sh) and by
# install.sh on a bare host. Safe to re-run and to run from several containers sharing one
# models volume at once (a lock serialises them).
#
# Nothing is used unverified: a manifest line without a real SHA-256 stops everything, a
# download whose size or checksum differs is deleted and fails, and a file already in place
# with another checksum is reported, never silently replaced.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
manifest="${COMFYUI_MODELS_MANIFEST:-$here/models.txt}"
dest="${COMFYUI_MODELS_DIR:-}"
mirror="${COMFYUI_MODELS_MIRROR:-}"
check_only=0
rehash=0

usage() {
  cat <<EOF
Usage: $(basename "$0") --dest DIR [--manifest FILE] [--check] [--rehash]

Downloads every model of the manifest that DIR lacks, checks size and SHA-256, and moves it
into place only when both match.

  --dest DIR        ComfyUI's models directory (or COMFYUI_MODELS_DIR)
  --manifest FILE   the manifest (or COMFYUI_MODELS_MANIFEST; default: models.txt here)
                    lines: <path under models/> <sha256> <size|-> <url>
  --check           download nothing: exit 3 when a model is missing, 4 when one differs
  --rehash          hash every file again, ignoring the .sha256 notes of earlier checks
  -h, --help        this text

Environment: COMFYUI_MODELS_MIRROR=<base URL> fetches each file from <base URL>/<file name>
instead of the manifest's URL; HF_TOKEN is sent (only) to huggingface.co.
Exit status: 0 all present and verified, 1 usage or manifest error, 2 download or checksum
failure, 3 missing (--check), 4 a file in place has another checksum.
EOF
}

die() { local code="$1"; shift; echo "fetch-models: ERROR: $*" >&2; exit "$code"; }
say() { echo "fetch-models: $*" >&2; }

while (($#)); do
  case "$1" in
    --dest) dest="${2:?--dest needs a directory}"; shift 2 ;;
    --manifest) manifest="${2:?--manifest needs a file}"; shift 2 ;;
    --check) check_only=1; shift ;;
    --rehash) rehash=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die 1 "unknown argument: $1" ;;
  esac
done
[[ -n "$dest" ]] || { usage >&2; die 1 "--dest (or COMFYUI_MODELS_DIR) is required"; }
[[ -r "$manifest" ]] || die 1 "manifest $manifest is not readable"
for tool in curl sha256sum flock stat df; do
  command -v "$tool" >/dev/null || die 1 "$tool is required"
done

# Parse and validate the whole manifest before touching anything.
paths=() sums=() sizes=() urls=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
  lineno=$((lineno + 1))
  line="${line%%#*}"
  [[ "$line" =~ ^[[:space:]]*$ ]] && continue
  read -r path sum size url extra <<<"$line"
  [[ -n "${url:-}" && -z "${extra:-}" ]] || die 1 "$manifest:$lineno: expected <path> <sha256> <size> <url>"
  [[ "$path" =~ ^[A-Za-z0-9_][A-Za-z0-9._/-]*$ && "$path" != *..* ]] \
    || die 1 "$manifest:$lineno: bad path '$path' (relative, no '..')"
  sum="${sum,,}"
  [[ "$sum" =~ ^[0-9a-f]{64}$ ]] \
    || die 1 "$manifest:$lineno: '$path' has no SHA-256 ('$sum'). Put the sha256sum of a trusted copy in the manifest: weights are never used unverified."
  [[ "$size" =~ ^([0-9]+|-)$ ]] || die 1 "$manifest:$lineno: size must be a byte count or '-'"
  [[ "$url" =~ ^https?:// ]] || die 1 "$manifest:$lineno: '$url' is not an http(s) URL"
  if [[ -n "$mirror" ]]; then
    url="${mirror%/}/$(basename "$path")"
  fi
  paths+=("$path") sums+=("$sum") sizes+=("$size") urls+=("$url")
done <"$manifest"
((${#paths[@]})) || die 1 "$manifest lists no model"

mkdir -p "$dest"
exec 9>"$dest/.fetch-models.lock"
if ! flock -n 9; then
  say "another fetch holds $dest/.fetch-models.lock; waiting for it"
  flock 9
fi

# A note beside each verified file: "<sha256> <size> <mtime>". While it matches the file and
# the manifest, the 7 GB file is not hashed again at every start.
note_ok() {
  local file="$1" sum="$2" note="$1.sha256"
  [[ -f "$note" ]] || return 1
  [[ "$(cat "$note")" == "$sum $(stat -c '%s %Y' "$file")" ]]
}
write_note() { echo "$2 $(stat -c '%s %Y' "$1")" >"$1.sha256"; }

download() {
  local url="$1" out="$2" size="$3"
  local args=(--fail --location --silent --show-error --retry 5 --retry-delay 10 --retry-all-errors
              --connect-timeout 30 --continue-at - --output "$out")
  local need avail
  if [[ "$size" != "-" ]]; then
    need=$((size - $(stat -c %s "$out" 2>/dev/null || echo 0)))
    avail=$(df --output=avail -B1 "$(dirname "$out")" | tail -n 1)
    ((avail > need)) || die 2 "$(dirname "$out") has $avail bytes free, $need needed"
  fi
  if [[ -n "${HF_TOKEN:-}" && "$url" =~ ^https://huggingface\.co/ ]]; then
    # From a file descriptor, not the command line: the token stays out of `ps`.
    curl "${args[@]}" --header @<(printf 'Authorization: Bearer %s\n' "$HF_TOKEN") "$url"
  else
    curl "${args[@]}" "$url"
  fi
}

missing=0 differs=0
for i in "${!paths[@]}"; do
  path="${paths[$i]}" sum="${sums[$i]}" size="${sizes[$i]}" url="${urls[$i]}"
  target="$dest/$path"
  if [[ -f "$target" ]]; then
    if ((rehash == 0)) && note_ok "$target" "$sum"; then
      say "$path: present, verified earlier"
      continue
    fi
    say "$path: present, checking its SHA-256"
    actual="$(sha256sum "$target" | cut -d' ' -f1)"
    if [[ "$actual" == "$sum" ]]; then
      write_note "$target" "$sum"
      say "$path: verified"
    else
      echo "fetch-models: ERROR: $target has SHA-256 $actual, the manifest says $sum." \
           "Remove the file (it is then fetched again) or correct the manifest." >&2
      differs=1
    fi
    continue
  fi
  if ((check_only)); then
    echo "fetch-models: MISSING: $path (run fetch-models to download it)" >&2
    missing=1
    continue
  fi
  mkdir -p "$(dirname "$target")"
  part="$target.part"
  if [[ "$size" != "-" && -f "$part" && "$(stat -c %s "$part")" == "$size" ]]; then
    say "$path: a complete download is already there ($part)"
  else
    say "$path: downloading $url"
    download "$url" "$part" "$size" || die 2 "$path: download failed (kept $part to resume)"
  fi
  got="$(stat -c %s "$part")"
  if [[ "$size" != "-" && "$got" != "$size" ]]; then
    rm -f "$part"
    die 2 "$path: got $got bytes, the manifest says $size; deleted the download"
  fi
  actual="$(sha256sum "$part" | cut -d' ' -f1)"
  if [[ "$actual" != "$sum" ]]; then
    rm -f "$part"
    die 2 "$path: SHA-256 $actual does not match the manifest's $sum; deleted the download"
  fi
  mv -f "$part" "$target"
  write_note "$target" "$sum"
  say "$path: downloaded and verified"
done

((differs == 0)) || exit 4
((missing == 0)) || exit 3
say "all ${#paths[@]} model(s) present and verified in $dest"
