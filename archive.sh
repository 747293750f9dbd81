#!/usr/bin/env bash
# Pack a trained JAI checkpoint and its tokenizer into model_store/jai.mar for TorchServe.
set -euo pipefail

usage() {
    cat <<USAGE
usage: ./archive.sh [--checkpoint PATH] [--tokenizer PATH] [--model-store DIR] [--config YAML]

Packs the checkpoint (default checkpoints/ckpt.pt), the tokenizer (default data/tokenizer.json),
the handler (handler/jai_handler.py and the handler/jaiserve package) and the model config (default
model-config.yaml) into DIR/jai.mar (default model_store/jai.mar), replacing an older one. Relative
paths are taken from the current directory, defaults from the repo root. The checkpoint is loaded
once first, so a file that cannot serve fails here rather than in a TorchServe worker.
USAGE
}

repo=$(cd "$(dirname "$0")" && pwd)
checkpoint=$repo/checkpoints/ckpt.pt
tokenizer=$repo/data/tokenizer.json
store=$repo/model_store
config=$repo/model-config.yaml
while [[ $# -gt 0 ]]; do
    case "$1" in
        --checkpoint) checkpoint=${2:?--checkpoint needs a path}; shift 2 ;;
        --tokenizer) tokenizer=${2:?--tokenizer needs a path}; shift 2 ;;
        --model-store) store=${2:?--model-store needs a directory}; shift 2 ;;
        --config) config=${2:?--config needs a yaml file}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "archive.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
checkpoint=$(realpath -m "$checkpoint") tokenizer=$(realpath -m "$tokenizer")
store=$(realpath -m "$store") config=$(realpath -m "$config")
cd "$repo"
for file in "$checkpoint" "$tokenizer" "$config"; do
    if [[ ! -f "$file" ]]; then
        echo "archive.sh: $file not found (see --help; the shipped demo model is demo/ckpt.pt and demo/tokenizer.json)" >&2
        exit 1
    fi
done

bin=.venv/bin
[[ -x $bin/python ]] || bin=$(dirname "$(command -v python3)")

"$bin/python" - "$checkpoint" "$tokenizer" <<'PY'
import sys
sys.path.insert(0, "handler")
from jaiserve import CheckpointError, load_model, load_tokenizer
try:
    model = load_model(sys.argv[1])
    load_tokenizer(sys.argv[2], model.config.vocab_size)
except CheckpointError as exc:
    sys.exit(f"archive.sh: {exc}")
print(f"archive.sh: {sys.argv[1]} OK: {model.num_parameters() / 1e6:.1f}M parameters, {model.config}")
PY

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/src" "$store"
cp "$checkpoint" "$stage/ckpt.pt"          # names the handler reads (model-config.yaml handler:)
cp "$tokenizer" "$stage/tokenizer.json"
cp -r handler/jaiserve "$stage/src/jaiserve"          # --extra-files copies a folder's contents: src/ -> jaiserve/
find "$stage/src" -name __pycache__ -prune -exec rm -rf {} +

TMPDIR=$stage "$bin/torch-model-archiver" \
    --model-name jai \
    --version 1.0 \
    --handler handler/jai_handler.py \
    --extra-files "$stage/ckpt.pt,$stage/tokenizer.json,$stage/src" \
    --config-file "$config" \
    --export-path "$store" \
    --force
echo "archive.sh: wrote $store/jai.mar ($(du -h "$store/jai.mar" | cut -f1))"
