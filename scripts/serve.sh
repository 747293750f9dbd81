#!/usr/bin/env bash
# Run TorchServe with JAI in the background (nohup-style): start | stop | restart | drain | status | logs |
# rotate-key.
# For a supervised service use deploy/systemd/jai-serve.service or deploy/launchd/com.jai.server.plist;
# they, the container (deploy/docker) and the pod's preStop (deploy/k8s) call `drain` before stopping.
set -euo pipefail

usage() {
    cat <<USAGE
usage: scripts/serve.sh start|stop|restart|drain|status|logs|rotate-key

Runs torchserve in JAI_DIR (default: the repo root) with JAI_DIR/config.properties: the model store,
metrics.yaml, logs/ and key_file.json are all relative to it. torchserve records its pid in
\${TMPDIR:-/tmp}/.model_server.pid and its worker sockets go there too, so one TMPDIR holds one server.
JAI_START_TIMEOUT (s, default 180) bounds the wait for a READY worker.

drain: new requests get a 503 {"type": "Draining"} (a balancer re-sends them elsewhere) while the
running ones finish, for at most JAI_DRAIN_TIMEOUT seconds (default 120; 0: do not wait); the server
keeps running, draining, until it is stopped. stop drains first, then stops torchserve.

rotate-key: a new inference key in key_file.json, in force at once: the old key is refused from then on
(TorchServe's POST /token?type=inference on the management address, with the file's API key). Keys are
kept across restarts and do not expire unless config.properties sets token_expiration_min (docs/front-door.md).
USAGE
}

repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$repo/.venv/bin
[[ -x $bin/torchserve ]] || bin=$(dirname "$(command -v torchserve || echo /nonexistent/torchserve)")
cd "${JAI_DIR:-$repo}"
[[ -f config.properties ]] || { echo "serve.sh: no config.properties in $PWD" >&2; exit 1; }
pid_file="${TMPDIR:-/tmp}/.model_server.pid" # where torchserve itself records its pid
# The frontend (Java) puts its worker sockets in java.io.tmpdir, which torchserve sets from TEMP: follow
# TMPDIR, so that two servers in two TMPDIRs do not take each other's sockets.
export TEMP=${TEMP:-${TMPDIR:-/tmp}}
drain_timeout=${JAI_DRAIN_TIMEOUT:-120}

property() { # property <key>: its value in config.properties
    sed -n "s/^$1=//p" config.properties | tail -n 1
}
management=$(property management_address)
management=${management:-http://127.0.0.1:8081}
inference=$(property inference_address)
inference=${inference:-http://127.0.0.1:8080}
store=$(property model_store)

common() { # scripts/common.py: what serve.sh shares with multi.py, the container and the tests
    "$bin/python" "$repo/scripts/common.py" "$@"
}

agent_jar_present() { # the JVM does not start without the jar that vmargs' -javaagent: names
    local jar
    jar=$(common missing-agent config.properties)
    [[ -z $jar ]] && return 0
    echo "serve.sh: $jar (vmargs in $PWD/config.properties) is missing: run 'make setup' in $repo" >&2
    echo "  (a config.properties outside the repo must name the jar by its absolute path)" >&2
    return 1
}

alive() { # alive <pid>: the process runs (a killed one stays a zombie until its parent reaps it)
    common alive "$1"
}

running_pid() {
    [[ -f $pid_file ]] && alive "$(cat "$pid_file")" && cat "$pid_file"
}

key() { # key <inference|management>: the current token from ./key_file.json
    "$bin/python" -c 'import json,sys; print(json.load(open("key_file.json"))[sys.argv[1]]["key"])' "$1"
}

describe() { # GET /models/jai on the management API, with the key when token auth is on (key_file.json)
    local header=()
    if [[ -f key_file.json ]]; then header=(-H "Authorization: Bearer $(key management)"); fi
    curl -sf "${header[@]}" "$management/models/jai" 2>/dev/null
}

token_auth() { # whether config.properties leaves TorchServe's token authorization on (its default)
    [[ $(property disable_token_authorization) != true ]]
}

wait_ready() { # until a worker of jai is READY, or the timeout
    local deadline=$((SECONDS + ${JAI_START_TIMEOUT:-180}))
    while ((SECONDS < deadline)); do
        # with token auth on, wait for the key file: a call without a key would only be refused
        if { ! token_auth || [[ -f key_file.json ]]; } && describe | grep -q '"status": "READY"'; then
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
    # key_file.json is kept: the agent reads its keys back (torchserve-patch KeyPatches), so clients' keys
    # survive a restart
    "$bin/torchserve" --start --ncs --ts-config config.properties >logs.start.txt 2>&1 ||
        { cat logs.start.txt >&2; exit 1; }
    wait_ready
    echo "serve.sh: jai is serving on $inference (pid $(running_pid)). Try:"
    local auth=""
    if token_auth; then
        echo "  TOKEN=\$(python3 -c 'import json; print(json.load(open(\"$PWD/key_file.json\"))[\"inference\"][\"key\"])')"
        auth=" -H \"Authorization: Bearer \$TOKEN\""
    fi
    echo "  curl -s $inference/predictions/jai$auth \\"
    echo "    -H 'Content-Type: application/json' -d '{\"prompt\": \"서울에서 React 개발자 채용 있어?\", \"mode\": \"chat\", \"temperature\": 0}'"
}

in_flight() { # in_flight <drain folder>: requests queued in the frontend + admitted by a live worker
    local queued count=0 file
    # pendingRequests: jobs no worker has taken yet (a draining worker takes them only to refuse them)
    queued=$(describe | "$bin/python" -c 'import json, sys
print(sum(m["jobQueueStatus"]["pendingRequests"] for m in json.load(sys.stdin)))' 2>/dev/null) || return 1
    for file in "$1"/active.*; do # one per worker (handler/jaiserve/drain.py); a dead worker's is ignored
        if [[ -f $file ]] && alive "${file##*.}"; then count=$((count + $(<"$file"))); fi
    done
    echo $((queued + count))
}

drain() { # new requests get a 503 while the running ones finish, for at most $drain_timeout s
    local pid folder deadline n last="" zeros=0
    if ! pid=$(running_pid); then echo "serve.sh: not running"; return 0; fi
    folder=${TMPDIR:-/tmp}/jai-drain.$pid # the workers' folder, named after their frontend's pid
    mkdir -p "$folder" && touch "$folder/draining"
    deadline=$((SECONDS + drain_timeout))
    while true; do
        n=$(in_flight "$folder") || n="an unknown number of"
        # zero twice in a row, half a second apart: a worker counts a request finished just before it
        # hands the last bytes to the frontend, which then still has to write them to the client
        if [[ $n == 0 ]] && ((++zeros >= 2)); then echo "serve.sh: drained"; return 0; fi
        [[ $n == 0 ]] || zeros=0
        ((SECONDS < deadline)) || break
        if [[ $n != "$last" && $n != 0 ]]; then echo "serve.sh: draining: waiting for $n request(s)"; fi
        last=$n
        sleep 0.5
    done
    if [[ $n == 0 ]]; then echo "serve.sh: drained"; return 0; fi # JAI_DRAIN_TIMEOUT=0 waits for nothing
    echo "serve.sh: still $n request(s) running after ${drain_timeout}s (JAI_DRAIN_TIMEOUT); stopping anyway" >&2
}

stop() {
    local pid
    if ! pid=$(running_pid); then echo "serve.sh: not running"; return 0; fi
    drain
    # What `torchserve --stop --foreground` does (SIGTERM, wait up to 60 s for the frontend and its workers),
    # except that it also deletes ./key_file.json, whose keys clients keep using across restarts
    kill -TERM "$pid"
    local deadline=$((SECONDS + 60))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$pid"; then echo "serve.sh: torchserve (pid $pid) still runs 60 s after SIGTERM" >&2; return 1; fi
    rm -f "$pid_file"
    rm -rf "${TMPDIR:-/tmp}/jai-drain.$pid"
    echo "serve.sh: stopped"
}

rotate_key() {
    [[ -n $(running_pid) ]] || { echo "serve.sh: not running (the key is rotated by the running server)" >&2; exit 1; }
    token_auth && [[ -f key_file.json ]] || { echo "serve.sh: token authorization is off: there is no key" >&2; exit 1; }
    local old
    old=$(key inference)
    curl -sf -X POST -H "Authorization: Bearer $(key API)" "$management/token?type=inference" >/dev/null ||
        { echo "serve.sh: the management API refused the rotation (is key_file.json this server's?)" >&2; exit 1; }
    [[ $(key inference) != "$old" ]] || { echo "serve.sh: key_file.json still holds the old key" >&2; exit 1; }
    echo "serve.sh: new inference key in $PWD/key_file.json; the old one is refused from now on"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart) stop && start ;;
    drain) drain ;;
    rotate-key) rotate_key ;;
    status)
        if pid=$(running_pid); then echo "serve.sh: running (pid $pid) in $PWD"; else echo "serve.sh: stopped"; exit 3; fi
        ;;
    logs)
        exec tail -n 50 -F logs/ts_log.log logs/model_log.log
        ;;
    -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
esac
