#!/usr/bin/env bash
# The container's entry point (deploy/docker/Dockerfile): lay out a runtime folder, run torchserve in the
# foreground, and on SIGTERM drain (scripts/serve.sh stop) before it stops. CI runs it outside a
# container (tests/test_deploy.py).
set -euo pipefail

usage() {
    cat <<USAGE
usage: deploy/docker/entrypoint.sh

Environment (all optional):
  JAI_DIR               runtime folder: config.properties, metrics.yaml, model_store/, logs/ (default
                        /var/lib/jai-serve; must be writable)
  JAI_CONFIG_OVERRIDES  properties appended to the repo's config.properties, later keys winning
                        (default deploy/docker/container.properties)
  JAI_MODEL_ARCHIVE     a jai.mar to serve as it is (e.g. on a mounted volume); otherwise one is packed
                        at start by archive.sh from:
  JAI_CHECKPOINT        (default checkpoints/ckpt.pt when the image has one: yours; else the shipped
                        demo model, demo/ckpt.pt)
  JAI_TOKENIZER         (default data/tokenizer.json with your checkpoint, else demo/tokenizer.json)
  JAI_MODEL_CONFIG      (default model-config.yaml; the Kubernetes ConfigMap's model-config.yaml)
  JAI_DRAIN_TIMEOUT     seconds a stop waits for running requests (scripts/serve.sh; default 120)
USAGE
}
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
[[ $# -eq 0 ]] || { usage >&2; exit 2; }

home=$(cd "$(dirname "$0")/../.." && pwd)
export JAI_DIR=${JAI_DIR:-/var/lib/jai-serve}
export TEMP=${TEMP:-${TMPDIR:-/tmp}} # the frontend's java.io.tmpdir (worker sockets, unpacked archive)
mkdir -p "$JAI_DIR/model_store"

# config.properties: the repo's, then the overrides; relative -javaagent: paths are the repo's
overrides=${JAI_CONFIG_OVERRIDES:-$home/deploy/docker/container.properties}
{
    "$home/.venv/bin/python" "$home/scripts/common.py" absolute-agent "$home/config.properties"
    printf '\n# ---- %s (later keys win) ----\n' "$overrides"
    cat "$overrides"
} >"$JAI_DIR/config.properties"
cp "$home/metrics.yaml" "$JAI_DIR/metrics.yaml"

if [[ -n ${JAI_MODEL_ARCHIVE:-} ]]; then
    ln -sfn "$JAI_MODEL_ARCHIVE" "$JAI_DIR/model_store/jai.mar"
else
    checkpoint=$home/demo/ckpt.pt tokenizer=$home/demo/tokenizer.json # the shipped demo model, unless
    if [[ -f $home/checkpoints/ckpt.pt ]]; then                       # the image was built with yours
        checkpoint=$home/checkpoints/ckpt.pt tokenizer=$home/data/tokenizer.json
    fi
    "$home/archive.sh" --checkpoint "${JAI_CHECKPOINT:-$checkpoint}" --tokenizer "${JAI_TOKENIZER:-$tokenizer}" \
        --config "${JAI_MODEL_CONFIG:-$home/model-config.yaml}" --model-store "$JAI_DIR/model_store"
fi

cd "$JAI_DIR"
"$home/.venv/bin/torchserve" --foreground --ncs --ts-config config.properties &
server=$!
stopping=0
# docker stop / the kubelet send SIGTERM (after the pod's preStop drain): drain, then stop torchserve
trap 'stopping=1; "$home/scripts/serve.sh" stop || true' TERM INT
status=0
while kill -0 "$server" 2>/dev/null; do
    wait "$server" || status=$? # returns early when the trap runs; loop until torchserve has exited
done
if ((stopping)); then exit 0; fi
echo "entrypoint.sh: torchserve exited ($status); see $JAI_DIR/logs/ts_log.log" >&2
exit "$((status == 0 ? 1 : status))"
