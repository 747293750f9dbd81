#!/usr/bin/env bash
# Run TorchServe with JAI in the background (nohup-style): start | stop | restart | status | logs.
# For a supervised service use deploy/systemd/jai-serve.service or deploy/launchd/com.jai.server.plist.
set -euo pipefail

usage() {
    cat <<USAGE
usage: scripts/serve.sh start|stop|restart|status|logs

Runs torchserve in JAI_DIR (default: the repo root) with JAI_DIR/config.properties: the model store,
metrics.yaml, logs/ and key_file.json are all relative to it. torchserve records its pid in
\${TMPDIR:-/tmp}/.model_server.pid, so one TMPDIR holds one server. JAI_START_TIMEOUT (s, default 180)
bounds the wait for a READY worker.
USAGE
}

repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$repo/.venv/bin
[[ -x $bin/torchserve ]] || bin=$(dirname "$(command -v torchserve || echo /nonexistent/torchserve)")
cd "${JAI_DIR:-$repo}"
[[ -f config.properties ]] || { echo "serve.sh: no config.properties in $PWD" >&2; exit 1; }
pid_file="${TMPDIR:-/tmp}/.model_server.pid" # where torchserve itself records its pid

property() { # property <key>: its value in config.properties
    sed -n "s/^$1=//p" config.properties | tail -n 1
}
management=$(property management_address)
management=${management:-http://127.0.0.1:8081}
inference=$(property inference_address)
inference=${inference:-http://127.0.0.1:8080}
store=$(property model_store)

agent_jar_present() { # the JVM does not start without the jar that vmargs' -javaagent: names
    local jar
    jar=$(property vmargs | grep -o -e '-javaagent:[^ =]*' | head -n 1 || true)
    jar=${jar#-javaagent:}
    [[ -z $jar || -f $jar ]] && return 0
    echo "serve.sh: $jar (vmargs in $PWD/config.properties) is missing: run 'make setup' in $repo" >&2
    echo "  (a config.properties outside the repo must name the jar by its absolute path)" >&2
    return 1
}

running_pid() {
    [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null && cat "$pid_file"
}

key() { # key <inference|management>: the current token from ./key_file.json
    "$bin/python" -c 'import json,sys; print(json.load(open("key_file.json"))[sys.argv[1]]["key"])' "$1"
}

wait_ready() { # until a worker of jai is READY, or the timeout
    local deadline=$((SECONDS + ${JAI_START_TIMEOUT:-180}))
    while ((SECONDS < deadline)); do
        if [[ -f key_file.json ]] &&
            curl -sf -H "Authorization: Bearer $(key management)" "$management/models/jai" 2>/dev/null |
            grep -q '"status": "READY"'; then
            return 0
        fi
        if [[ -z $(running_pid) ]]; then
            echo "serve.sh: torchserve exited during start-up; see $PWD/logs.start.txt, logs/ts_log.log and logs/model_log.log:" >&2
            tail -n 3 logs.start.txt >&2
            return 1
        fi
        sleep 1
    done
    echo "serve.sh: jai not ready after ${JAI_START_TIMEOUT:-180}s; see $PWD/logs/model_log.log" >&2
    return 1
}

start() {
    if pid=$(running_pid); then echo "serve.sh: already running (pid $pid)"; return 0; fi
    [[ -f ${store:-model_store}/jai.mar ]] ||
        { echo "serve.sh: ${store:-model_store}/jai.mar missing: run ./archive.sh" >&2; exit 1; }
    agent_jar_present || exit 1
    rm -f key_file.json
    "$bin/torchserve" --start --ncs --ts-config config.properties >logs.start.txt 2>&1 ||
        { cat logs.start.txt >&2; exit 1; }
    wait_ready
    echo "serve.sh: jai is serving on $inference (pid $(running_pid)). Try:"
    echo "  TOKEN=\$(python3 -c 'import json; print(json.load(open(\"$PWD/key_file.json\"))[\"inference\"][\"key\"])')"
    echo "  curl -s $inference/predictions/jai -H \"Authorization: Bearer \$TOKEN\" \\"
    echo "    -H 'Content-Type: application/json' -d '{\"prompt\": \"서울에서 React 개발자 채용 있어?\", \"mode\": \"chat\", \"temperature\": 0}'"
}

stop() {
    if [[ -z $(running_pid) ]]; then echo "serve.sh: not running"; return 0; fi
    # --foreground makes --stop wait (up to 60 s) until the frontend and its workers have exited
    "$bin/torchserve" --stop --foreground
    echo "serve.sh: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart) stop && start ;;
    status)
        if pid=$(running_pid); then echo "serve.sh: running (pid $pid) in $PWD"; else echo "serve.sh: stopped"; exit 3; fi
        ;;
    logs)
        exec tail -n 50 -F logs/ts_log.log logs/model_log.log
        ;;
    -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
esac
