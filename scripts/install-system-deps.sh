#!/usr/bin/env bash
# Install the Debian packages that are missing, for what is asked:
#   --demo     what `make demo` needs: python3-venv (for .venv) and Node.js with npm (for
#              JupyterHub's configurable-http-proxy). No Slurm: the demo offers Slurm
#              partitions only where it finds a Slurm.
#   --test     the demo's packages and the real Slurm fixture's: slurmctld, slurmd, the
#              client, munge and sudo (jobs run as another user); iproute2 and util-linux
#              for the multi-node Slurm (ip, nsenter, unshare: a namespace per node)
#   --browser  Debian's chromium and a font (the browser test drives it with Playwright;
#              Playwright downloads nothing)
# Runs only as root (else it says what to install). No daemon is started: a temporary
# policy-rc.d blocks the packages' init scripts.
set -euo pipefail

declare -A need=()
for mode in "$@"; do
  case "$mode" in
    --demo) need+=([node]=nodejs [npm]=npm) ;;
    --test) need+=([node]=nodejs [npm]=npm [slurmctld]=slurmctld [slurmd]=slurmd
                   [sbatch]=slurm-client [munged]=munge [sudo]=sudo [ip]=iproute2
                   [nsenter]=util-linux [unshare]=util-linux) ;;
    --browser) need+=([chromium]=chromium) ;;
    *) echo "install-system-deps: unknown option $mode (--demo, --test, --browser)" >&2
       exit 2 ;;
  esac
done
missing=()
for bin in "${!need[@]}"; do
  PATH=$PATH:/usr/sbin:/sbin command -v "$bin" >/dev/null 2>&1 || missing+=("${need[$bin]}")
done
# `python3 -m venv` needs Debian's python3-venv (ensurepip), for the demo and the tests alike
if [[ " $* " == *" --demo "* || " $* " == *" --test "* ]] \
    && ! "${PYTHON:-python3}" -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=("python3-venv")
fi
# readable text in the browser test's screenshots
if [[ " $* " == *" --browser "* ]] && [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
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
