#!/usr/bin/env bash
# Install the Debian packages the demo and the test suite use, if any is missing:
# Slurm (slurmctld, slurmd, client), munge and sudo for the real Slurm fixture, and Node.js
# with npm for JupyterHub's configurable-http-proxy; with --browser also Debian's chromium
# (the browser test drives it with Playwright; nothing is downloaded by Playwright itself).
# Runs only as root (else it says what to install). No daemon is started: a temporary
# policy-rc.d blocks the packages' init scripts.
set -euo pipefail

declare -A need=(
  [slurmctld]=slurmctld [slurmd]=slurmd [sbatch]=slurm-client [munged]=munge
  [sudo]=sudo [node]=nodejs [npm]=npm
)
[ "${1:-}" = "--browser" ] && need[chromium]=chromium
missing=()
for bin in "${!need[@]}"; do
  PATH=$PATH:/usr/sbin:/sbin command -v "$bin" >/dev/null 2>&1 || missing+=("${need[$bin]}")
done
# readable text in the browser test's screenshots
if [ "${1:-}" = "--browser" ] && [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  missing+=(fonts-dejavu-core)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" != 0 ]; then
  echo "install-system-deps: missing Debian packages: ${missing[*]}" >&2
  echo "  run as root: apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "install-system-deps: apt-get install ${missing[*]}" >&2
created=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  created=1
fi
trap '[ $created = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
