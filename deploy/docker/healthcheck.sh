#!/usr/bin/env bash
# Exit 0 when this container's torchserve answers /ping "Healthy"; with --ready, also only while it is
# not draining. Docker's HEALTHCHECK and the pod's probes run it (deploy/k8s); works with TorchServe's
# token auth on (it reads key_file.json) or off.
set -euo pipefail

case "${1:-}" in
    "") ready=0 ;;
    --ready) ready=1 ;;
    *) echo "usage: deploy/docker/healthcheck.sh [--ready]" >&2; exit 2 ;;
esac
cd "${JAI_DIR:-/var/lib/jai-serve}"
home=$(cd "$(dirname "$0")/../.." && pwd)

address=$(sed -n 's/^inference_address=//p' config.properties | tail -n 1)
address=${address/0.0.0.0/127.0.0.1} # listening everywhere: ask on loopback
header=()
if [[ -f key_file.json ]]; then
    key=$("$home/.venv/bin/python" -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
    header=(-H "Authorization: Bearer $key")
fi
answer=$(curl -sS --max-time 5 "${header[@]}" "$address/ping" 2>&1) || { echo "unhealthy: $answer"; exit 1; }
[[ $answer == *'"Healthy"'* ]] || { echo "unhealthy: $answer"; exit 1; }
if ((ready)); then
    pid=$(cat "${TMPDIR:-/tmp}/.model_server.pid" 2>/dev/null || true)
    # the drain marker of handler/jaiserve/drain.py (scripts/serve.sh drain writes it)
    if [[ -n $pid && -e ${TMPDIR:-/tmp}/jai-drain.$pid/draining ]]; then echo "draining"; exit 1; fi
fi
echo "healthy"
