#!/usr/bin/env bash
# What `make test` needs beyond Python, from Debian's packages. `make test` and .ci/run both run
# this script first; run it yourself to prepare a machine:
#
#   sudo deploy/setup-host.sh          # install what is missing (root with apt-get)
#   deploy/setup-host.sh --check       # only say what is missing (exit 1 if something required is)
#
# Required (tests fail without them):
#   redis-server                    every fleet test's private Redis
#   nginx                           nginx.conf checks, a real nginx in front of the API
#   promtool, prometheus            alert rule unit tests; a real Prometheus against a live fleet
#   amtool, alertmanager            Alertmanager routing tests; real alert delivery
# For the built-fleet test (tests/test_built_fleet.py; it skips, saying why, without them):
#   podman, runc, CNI plugins with dnsname, catatonit (compose `init: true`), debootstrap (base
#   images without a registry)
# Not root, or no apt-get: nothing is installed; the script names the command to run and exits 1
# when a required tool is missing.
set -euo pipefail

check_only=0
[[ "${1:-}" == "--check" ]] && check_only=1

# tool (a command on PATH, or an absolute path) -> Debian package
required=(
  "redis-server redis-server"
  "nginx nginx"
  "promtool prometheus"
  "prometheus prometheus"
  "amtool prometheus-alertmanager"
  "prometheus-alertmanager prometheus-alertmanager"
)
fleet=(
  "podman podman"
  "runc runc"
  "/usr/lib/cni/bridge containernetworking-plugins"
  "/usr/lib/cni/dnsname golang-github-containernetworking-plugin-dnsname"
  "debootstrap debootstrap"
  "/usr/libexec/podman/catatonit catatonit"
)

have() {
  if [[ "$1" == /* ]]; then [[ -e "$1" ]]; else command -v "$1" >/dev/null 2>&1; fi
}

missing_pkgs() {
  local entry tool pkg out=()
  for entry in "$@"; do
    read -r tool pkg <<<"$entry"
    have "$tool" || out+=("$pkg")
  done
  printf '%s\n' "${out[@]}" | sort -u | sed '/^$/d'
}

mapfile -t need < <(missing_pkgs "${required[@]}")
mapfile -t want < <(missing_pkgs "${fleet[@]}")

can_install=0
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then can_install=1; fi

if ((${#need[@]} + ${#want[@]})) && ((can_install)) && ((!check_only)); then
  echo "setup-host: installing from Debian: ${need[*]} ${want[*]}"
  apt-get update -qq
  # --no-install-recommends: only the tools (no node exporter, no desktop bits); in a container
  # without systemd the packages' services are not started, and the tests start their own.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need[@]}" "${want[@]}" </dev/null >/dev/null
  mapfile -t need < <(missing_pkgs "${required[@]}")
  mapfile -t want < <(missing_pkgs "${fleet[@]}")
fi

# Root podman without systemd (CI, containers): runc, cgroupfs, file events, ulimits the host
# allows (deploy/podman/containers.conf). Written only where no containers.conf exists yet.
conf=/etc/containers/containers.conf
if have podman && [[ "$(id -u)" == 0 ]] && [[ ! -e "$conf" ]] && ((!check_only)); then
  nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
  [[ "$nofile" == unlimited || "$nofile" -gt 1048576 ]] && nofile=1048576
  [[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
  mkdir -p /etc/containers
  sed -e "s/nofile=[0-9]*:[0-9]*/nofile=$nofile:$nofile/" -e "s/nproc=[0-9]*:[0-9]*/nproc=$nproc:$nproc/" \
    "$(dirname "$0")/podman/containers.conf" >"$conf"
  echo "setup-host: wrote $conf (runc, cgroupfs, file events, nofile=$nofile, nproc=$nproc)"
fi

if ((${#want[@]})); then
  echo "setup-host: the built-fleet test will be skipped: missing ${want[*]}" \
       "(install: sudo apt-get install --no-install-recommends ${want[*]})" >&2
fi
if ((${#need[@]})); then
  echo "setup-host: missing ${need[*]}. Install them with:" >&2
  echo "    sudo $(dirname "$0")/setup-host.sh" >&2
  echo "(or: sudo apt-get install --no-install-recommends ${need[*]})" >&2
  exit 1
fi
exit 0
