#!/usr/bin/env bash
# Run TorchServe with JAI in the background (nohup-style): start | stop | status | logs.
set -euo pipefail

usage() { echo "usage: scripts/serve.sh start|stop|status|logs   (from anywhere; runs in the repo root)"; }

cd "$(dirname "$0")/.."
bin=.venv/bin
[[ -x $bin/torchserve ]] || bin=$(dirname "$(command -v torchserve || echo /nonexistent/torchserve)")
pid_file="${TMPDIR:-/tmp}/.model_server.pid"   # where torchserve itself records its pid

running_pid() {
    [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null && cat "$pid_file"
}

key() {  # key <inference|management>: the current token from ./key_file.json
    "$bin/python" -c 'import json,sys; print(json.load(open("key_file.json"))[sys.argv[1]]["key"])' "$1"
}

wait_ready() {  # until a worker of jai is READY, or the timeout
    local deadline=$((SECONDS + ${JAI_START_TIMEOUT:-180}))
    while ((SECONDS < deadline)); do
        if [[ -f key_file.json ]] &&
            curl -sf -H "Authorization: Bearer $(key management)" http://127.0.0.1:8081/models/jai 2>/dev/null |
            grep -q '"status": "READY"'; then
            return 0
        fi
        if [[ -z $(running_pid) ]]; then
            echo "serve.sh: torchserve exited during start-up; see logs/ts_log.log and logs/model_log.log" >&2
            return 1
        fi
        sleep 1
    done
    echo "serve.sh: jai not ready after ${JAI_START_TIMEOUT:-180}s; see logs/model_log.log" >&2
    return 1
}

case "${1:-}" in
    start)
        if pid=$(running_pid); then echo "serve.sh: already running (pid $pid)"; exit 0; fi
        [[ -f model_store/jai.mar ]] || { echo "serve.sh: model_store/jai.mar missing: run ./archive.sh" >&2; exit 1; }
        rm -f key_file.json
        "$bin/torchserve" --start --ncs --ts-config config.properties >logs.start.txt 2>&1 ||
            { cat logs.start.txt >&2; exit 1; }
        wait_ready
        echo "serve.sh: jai is serving on 127.0.0.1:8080 (pid $(running_pid)). Try:"
        echo "  TOKEN=\$(python3 -c 'import json; print(json.load(open(\"key_file.json\"))[\"inference\"][\"key\"])')"
        echo "  curl -s http://127.0.0.1:8080/predictions/jai -H \"Authorization: Bearer \$TOKEN\" \\"
        echo "    -H 'Content-Type: application/json' -d '{\"prompt\": \"서울에서 React 개발자 채용 있어?\", \"mode\": \"chat\", \"temperature\": 0}'"
        ;;
    stop)
        if [[ -z $(running_pid) ]]; then echo "serve.sh: not running"; exit 0; fi
        "$bin/torchserve" --stop
        ;;
    status)
        if pid=$(running_pid); then echo "serve.sh: running (pid $pid)"; else echo "serve.sh: stopped"; exit 3; fi
        ;;
    logs)
        exec tail -n 50 -F logs/ts_log.log logs/model_log.log
        ;;
    *) usage >&2; exit 2 ;;
esac
